"""The Ray a search runs on: a local Ray on loopback, or an existing cluster.

Everything that must happen around ``ray.init`` lives here: the environment Ray reads at
import time, the address to join, the checks that need the running cluster (resources,
shared storage), and shutting it down (with ``search.reaper`` as the backstop for a driver
that dies without doing so).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from search.storage import shared_storage

__all__ = ["cluster_problems", "job_address", "start_ray", "stop_ray"]

_CLUSTER_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The reaper's sweep: a SIGTERM grace of a few seconds at most, when anything is left.
_REAPER_WAIT_S = 10.0


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
    # A trial stopped after its task already failed leaves a result nobody reads; Ray would
    # print that failure's traceback again ("Unhandled error") though Tune recorded it.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    import optuna

    # "A new study created in memory with name: optuna": the study is Tune's, not the user's.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class _RayChatter(logging.Filter):
    """Keeps Ray's start-up chatter off the console and puts it in the session's logs.

    Only the lines listed in ``_CHATTER`` are held back; every other record of these
    loggers, and every record of any other logger, reaches the console as before. The held
    lines are written to ``<session>/logs/ftsearch-driver.log`` once Ray has a session.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.sink: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        prefixes = _CHATTER.get(record.name, ())
        if not record.getMessage().startswith(prefixes):
            return True
        if self.sink is not None:
            self.sink.handle(record)
        else:
            self.held.append(record)
        return False

    def install(self) -> None:
        # On the loggers themselves, not on Ray's console handler: ray.init may replace
        # its handlers, never these logger objects.
        for name in _CHATTER:
            logging.getLogger(name).addFilter(self)

    def open_sink(self, logs_dir: str | None) -> None:
        if logs_dir is None:  # nowhere to keep them: they stay off the console all the same
            self.held.clear()
            self.sink = logging.NullHandler()
            return
        self.sink = logging.FileHandler(os.path.join(logs_dir, "ftsearch-driver.log"))
        self.sink.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- "
                                                 "%(message)s"))
        for record in self.held:
            self.sink.handle(record)
        self.held.clear()

    def remove(self) -> None:
        for name in _CHATTER:
            logging.getLogger(name).removeFilter(self)
        if self.sink is not None:
            self.sink.close()


# Logger -> message prefixes it logs on every local start. Token authentication is Ray's
# default for a local cluster and says nothing an ftsearch user can act on; the start and
# end lines are ftsearch's own business. Any other warning of these loggers still shows.
_CHATTER: dict[str, tuple[str, ...]] = {
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled", "Generated new authentication token"),
    "ray._private.worker": ("Started a local Ray instance",),
    # Printed at the end of every fit; the summary names the experiment directory and
    # counts the errored trials.
    "ray.tune.tune": ("Wrote the latest version of all result files",
                      "Trials did not complete",
                      # Names Tuner.restore; the summary names `ftsearch resume` instead.
                      "Experiment has been interrupted, but the most recent state was saved"),
    # On every resume: ftsearch says it resumes; trials killed before their first result
    # have no metrics yet, which the resumed search does not need.
    "ray.tune.execution.tune_controller": ("Restoring the run from the latest experiment",),
    "ray.tune.analysis.experiment_analysis": ("Failed to fetch metrics for",),
}


class _StateSaveFailures(logging.Filter):
    """Tune's failed copies of its experiment state, one line per kind of error.

    Tune saves its state beside the driver and copies it into the experiment directory in
    the background; when that copy fails for a reason of the storage's own (an ``OSError``:
    a full disk, a lost mount), Ray logs its whole traceback, and again at every later copy.
    That is noise around a message the user can act on, which is what the console keeps.
    Any other exception keeps Ray's traceback: it would be a bug to report.
    """

    # Logger -> the message it logs when the copy failed (ray 2.40..2.60).
    _FAILURES = {
        "ray.train._internal.syncer": "Last sync command failed",
        "ray.tune.execution.experiment_state": "Saving experiment state to storage",
    }

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[str] = set()  # kinds of error already on the console

    def filter(self, record: logging.LogRecord) -> bool:
        prefix = self._FAILURES.get(record.name)
        if prefix is None or not record.getMessage().startswith(prefix):
            return True
        # The syncer formats the traceback into its message from inside its `except`.
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if not isinstance(error, OSError):
            return True
        # Once per kind (a full disk fails every file of a copy, each with its own path).
        kind = f"{type(error).__name__} {getattr(error, 'errno', None)}"
        if kind in self.shown:
            return False
        self.shown.add(kind)
        record.msg = (f"ftsearch: Tune could not copy its experiment state to or from the "
                      f"experiment directory: {error}. The results written so far are kept; "
                      f"`ftsearch resume` starts from the last state Tune saved.")
        record.args, record.exc_info, record.exc_text = (), None, None
        return True

    def install(self) -> None:
        self.shown.clear()
        for name in self._FAILURES:
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)


_state_save_failures = _StateSaveFailures()


@dataclass
class _LocalRun:
    """What ``start_ray`` set up around a local Ray, for ``stop_ray`` to undo."""

    reaper: subprocess.Popen
    chatter: _RayChatter
    previous_sigterm: Any = None


_local: _LocalRun | None = None


def _bind_to_loopback() -> None:
    """Makes the Ray about to start, and every process it starts, listen on loopback only.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported
    in a process: with it "0", the driver resolves its node address to 127.0.0.1 (so the
    GCS and the raylet bind there, not on ``::``) and the processes Ray starts, which
    inherit the variable, bind their agents there too (not on 0.0.0.0).

    Raises:
        RuntimeError: ``ray`` was imported earlier in this process with clusters enabled,
            so Ray would listen on every interface. A bug in ftsearch, not the user's.
    """
    os.environ[_CLUSTER_VAR] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(f"ray was imported before {_CLUSTER_VAR}=0 was set, so a "
                               f"local Ray would listen on every interface; start_ray must "
                               f"run before anything imports ray")


def _session_logs_dir() -> str | None:
    """The running local Ray's log directory (Ray has no public API for it)."""
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:
        return None


def _sigterm_as_sigint(signum: int, frame: Any) -> None:
    # `kill PID` (a scheduler, systemd, a timeout) then stops the search as Ctrl-C does:
    # Tune ends the trials and saves the experiment so that `ftsearch resume` continues
    # it; a second SIGTERM, like a second Ctrl-C, stops at once.
    signal.raise_signal(signal.SIGINT)


def _start_local() -> None:
    global _local
    _bind_to_loopback()
    from search.reaper import TAG_VAR, spawn_reaper

    # Every process Ray starts inherits the tag: the reaper ends those the driver leaves.
    tag = str(uuid.uuid4())
    os.environ[TAG_VAR] = tag
    chatter = _RayChatter()
    chatter.install()
    _local = _LocalRun(reaper=spawn_reaper(tag), chatter=chatter)
    import ray

    # address="local" starts a new Ray whatever RAY_ADDRESS says: an exported
    # RAY_ADDRESS=http://HEAD:8265 (the jobs CLI's) is ignored here, not joined.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=True)
    chatter.open_sink(_session_logs_dir())
    # After ray.init, which installs its own SIGTERM handler (exit at once).
    if threading.current_thread() is threading.main_thread():
        _local.previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_sigint)


def start_ray(*, address: str | None) -> None:
    """Joins the cluster at ``address``, or starts a local Ray bound to loopback.

    A local Ray listens on 127.0.0.1 only, whatever the environment says; its processes
    are ended by a reaper (``search.reaper``) if the driver dies without stopping them; and
    SIGTERM to the driver stops the search as Ctrl-C does.

    Args:
        address: a Ray cluster's address, or None for a local Ray.

    Raises:
        RuntimeError: for a local Ray, ``ray`` was already imported in a way that would
            bind it to every interface.
    """
    _quiet_ray()
    _state_save_failures.install()
    if address:
        import ray

        ray.init(address=address, log_to_driver=True)
        return
    _start_local()


def stop_ray() -> None:
    """Shuts the Ray this driver started (or disconnects from a cluster).

    For a local Ray, also lets the reaper sweep whatever Ray left running, and restores the
    SIGTERM handler that ``start_ray`` replaced.
    """
    global _local
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _local is None:
        return
    local, _local = _local, None
    if local.previous_sigterm is not None:
        signal.signal(signal.SIGTERM, local.previous_sigterm)
    local.chatter.remove()
    local.reaper.stdin.close()
    # Normally nothing is left and it is done at once: a run that returns has left nothing
    # behind. If it takes longer, it finishes on its own, in its own session.
    with contextlib.suppress(subprocess.TimeoutExpired):
        local.reaper.wait(timeout=_REAPER_WAIT_S)


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
