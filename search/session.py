"""The Ray a search runs on: a local Ray on loopback, or an existing cluster.

Everything that must happen around ``ray.init`` lives here: the environment Ray reads at
import time, the address to join, the checks that need the running cluster (resources,
shared storage), and shutting it down.
"""

from __future__ import annotations

import os
from typing import Any

from search.storage import shared_storage

__all__ = ["cluster_problems", "job_address", "start_ray", "stop_ray"]


def job_address() -> str | None:
    """The cluster a driver started by Ray Jobs must join, from ``RAY_ADDRESS``.

    Inside a Ray job (``ftsearch submit``, ``ray job submit``) Ray points ``RAY_ADDRESS`` at
    the cluster's GCS; an ``http://`` one is a dashboard, for the jobs CLI only.
    """
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address and not address.startswith(("http://", "https://")) else None


def _quiet_ray() -> None:
    # ftsearch prints its own one-line progress; Ray's tables and per-checkpoint
    # warnings would drown it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Each failed trial's traceback is in trials.parquet (`error`) and its error.txt.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")


def start_ray(*, address: str | None) -> None:
    """Joins ``address``, or starts a local Ray bound to loopback."""
    _quiet_ray()
    if address:
        import ray

        ray.init(address=address, log_to_driver=True)
        return
    # Read by Ray when it is first imported: every local process binds to 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=True)


def stop_ray() -> None:
    """Shuts the Ray this driver started (or disconnects from a cluster)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_problems(cfg: Any) -> str | None:
    """What the running cluster cannot do for ``cfg``: resources, shared storage."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if cfg.resources.gpu > 0 and cfg.resources.gpu > gpus:
        return (f"resources.gpu: {cfg.resources.gpu} GPU per trial, but the cluster has "
                f"{gpus:g} GPU(s); use at most {gpus:g} (0 for CPU-only)")
    if cfg.resources.cpu > cpus:
        return (f"resources.cpu: {cfg.resources.cpu} CPU per trial, but the cluster has "
                f"{cpus:g} CPU(s)")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    mine = next((n["Resources"] for n in nodes if n["NodeID"] == here), {})
    fits_here = (mine.get("CPU", 0) >= cfg.resources.cpu
                 and mine.get("GPU", 0) >= cfg.resources.gpu)
    if (len(nodes) < 2 and fits_here) or shared_storage(cfg.storage,
                                                        declared=cfg.storage_shared):
        return None
    where = (f"this Ray cluster has {len(nodes)} nodes" if len(nodes) > 1 else
             "the trials cannot run on the driver's node, so they run on others")
    # Tune writes checkpoints from the trial's node and restores a retried trial from
    # them: a node-local directory would scatter them and lose them with the node.
    return (f"storage: {cfg.storage!r} is a node-local path, but {where}; give a path on a "
            f"filesystem every node mounts at the same place (NFS, EFS, Lustre...), an "
            f"s3:// or gs:// URI, or set storage_shared: true if {cfg.storage!r} is shared "
            f"in a way ftsearch cannot detect")
