"""Ends what is left of a local run's Ray once its driver is gone, however it went.

Ray ties the GCS and the raylet to the driver (they die with it, even on SIGKILL), but the
raylet's own children (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and any process a
worker started outlive them for minutes. The driver therefore tags its environment with
``FTSEARCH_RUN_TAG=<uuid>`` before starting Ray, so every process of the run inherits the
tag, and starts ``python -m search.reaper <tag>`` in its own session with a pipe on stdin.
The reaper blocks reading that pipe; the kernel closes the driver's end when the driver
exits for any reason (return, exception, SIGTERM, SIGKILL), and the reaper then ends every
process that still carries the tag: SIGTERM, a short grace, SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil

__all__ = ["TAG_VAR", "reap", "spawn_reaper", "tagged_processes"]

TAG_VAR = "FTSEARCH_RUN_TAG"
GRACE_S = 3.0
# A process alive at one sweep may have started another just before dying; a few sweeps
# catch those without looping forever on something that cannot be killed.
SWEEPS = 3


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every process, other than this one, whose environment holds ``TAG_VAR=tag``.

    Args:
        tag: the run's tag.

    Returns:
        The processes found; those of other users (unreadable) and those that end while
        being read are left out.
    """
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _signal_all(procs: Sequence[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def reap(tag: str, grace_s: float = GRACE_S) -> list[int]:
    """Ends every process tagged ``tag``: SIGTERM, up to ``grace_s`` seconds, then SIGKILL.

    Args:
        tag: the run's tag.
        grace_s: how long the processes get to exit after SIGTERM.

    Returns:
        The ids of the processes signalled.
    """
    signalled: list[int] = []
    for _ in range(SWEEPS):
        procs = tagged_processes(tag)
        if not procs:
            break
        signalled += [p.pid for p in procs]
        _signal_all(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        _signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace_s)
    return signalled


def spawn_reaper(tag: str) -> subprocess.Popen:
    """Starts the reaper of ``tag``; it acts once the returned process's stdin is closed.

    The caller keeps ``stdin`` open for as long as the run lives and never writes to it.
    The reaper runs in its own session, so a Ctrl-C (or a hang-up) of the terminal reaches
    the driver and Ray but not the reaper that cleans up after them.

    Args:
        tag: the run's tag, already in ``os.environ[TAG_VAR]``.

    Returns:
        The reaper process.
    """
    env = dict(os.environ)
    # The reaper itself carries no tag: a search for the tag lists only the run's processes.
    env.pop(TAG_VAR, None)
    # `-m search.reaper` must import from wherever this package was, whatever the cwd.
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "search.reaper", tag], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m search.reaper TAG``: waits for EOF on stdin, then reaps ``TAG``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0]:
        print("usage: python -m search.reaper TAG", file=sys.stderr)
        return 2
    # Only the driver's exit may start the sweep, never a signal meant for the driver.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):
        pass
    reap(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
