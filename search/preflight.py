"""Everything checked before Ray starts: storage, resources, weights, data.

The config is already valid (:mod:`search.config`); these checks look at the machine:
can the results be written, does a local run fit this machine, can every weights file the
space can sample be read, are the data paths there. Each problem is one line naming the
field; :func:`preflight_problems` returns them all.
"""

from __future__ import annotations

import os

from search.config import ExperimentConfig
from search.storage import is_uri, probe_writable

__all__ = ["preflight_problems"]


def _storage_problems(cfg: ExperimentConfig) -> list[str]:
    if is_uri(cfg.storage):
        return []  # remote URIs are checked when first written
    why = probe_writable(cfg.storage)
    return [f"storage: {cfg.storage!r}: {why}"] if why else []


def _local_resource_problems(cfg: ExperimentConfig) -> list[str]:
    problems = []
    cores = os.cpu_count() or 1
    if cfg.resources.cpu > cores:
        problems.append(f"resources.cpu: {cfg.resources.cpu:g} CPU per trial, but this machine "
                        f"has {cores} cores; use at most {cores}, or join a cluster with "
                        f"--address")
    if cfg.resources.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if cfg.resources.gpu > gpus:
            problems.append(f"resources.gpu: {cfg.resources.gpu:g} GPU per trial, but this "
                            f"machine has {gpus} usable GPU(s); use at most {gpus} (0 for "
                            f"CPU-only), or join a GPU cluster with --address")
    return problems


def preflight_problems(cfg: ExperimentConfig, *, local: bool) -> list[str]:
    """Every reason ``cfg`` cannot run here, one line each; empty when it can.

    Args:
        cfg: A valid config.
        local: The run starts its own Ray on this machine (no ``--address``), so its
            resources must fit this machine.
    """
    problems = _storage_problems(cfg)
    if local:
        problems += _local_resource_problems(cfg)
    return problems
