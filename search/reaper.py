"""Ends what is left of a local run's Ray once its driver is gone, however it went.

Ray ties the GCS and the raylet to the driver (they die with it, even on SIGKILL), but the
raylet's own children (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and any process a
worker started outlive them for minutes. So the driver tags its environment with
``FTSEARCH_RUN_TAG=<uuid>`` before starting Ray, and starts ``python -m search.reaper <tag>``
in its own session with a pipe on stdin. The kernel closes the driver's end of the pipe
when the driver exits for any reason (return, exception, SIGTERM, SIGKILL); the reaper then
ends the run's processes that are still alive: SIGTERM, a short grace, SIGKILL.

The run's processes are those that carry the tag in their environment, and every process
below one of them. The tag alone is not enough: a process that sets its title (the agents
do, ``ray::DashboardAgent``) overwrites the environment the kernel shows for it. So while
the driver lives, the reaper also remembers, every 2 s, the tagged processes under the
driver and everything below them; a remembered process is the same one (psutil checks its
start time), never a later process that reused its pid.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

__all__ = ["TAG_VAR", "reap", "run_processes", "spawn_reaper", "tagged_processes"]

TAG_VAR = "FTSEARCH_RUN_TAG"
GRACE_S = 3.0
# Ray starts its agents with the run and they live as long: a look every 2 s finds them.
WATCH_EVERY_S = 2.0
# A process alive at one sweep may have started another just before dying; a few sweeps
# catch those without looping forever on something that cannot be killed.
SWEEPS = 3

Processes = dict[int, psutil.Process]


def _has_tag(proc: psutil.Process, tag: str) -> bool:
    try:
        return proc.environ().get(TAG_VAR) == tag
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _children_map() -> dict[int, list[psutil.Process]]:
    """Parent pid -> its children, from one pass over the process table."""
    children: dict[int, list[psutil.Process]] = defaultdict(list)
    for proc in psutil.process_iter(["ppid"]):
        children[proc.info["ppid"]].append(proc)
    return children


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every process, other than this one, whose environment holds ``TAG_VAR=tag``.

    Args:
        tag: the run's tag.

    Returns:
        The processes found; those of other users (unreadable), those that end while being
        read and those whose title overwrote their environment are left out.
    """
    return [p for p in psutil.process_iter() if p.pid != os.getpid() and _has_tag(p, tag)]


def _with_descendants(roots: Iterable[psutil.Process],
                      children: dict[int, list[psutil.Process]]) -> Processes:
    found: Processes = {}
    stack = list(roots)
    while stack:
        proc = stack.pop()
        if proc.pid in found or proc.pid == os.getpid():
            continue
        found[proc.pid] = proc
        stack.extend(children.get(proc.pid, ()))
    return found


def run_processes(tag: str) -> Processes:
    """The run's processes: those tagged ``tag``, and every process below one of them.

    Args:
        tag: the run's tag.

    Returns:
        pid -> process.
    """
    return _with_descendants(tagged_processes(tag), _children_map())


def _run_below(tag: str, driver: int) -> Processes:
    """The run's processes among ``driver``'s descendants: tagged, or below a tagged one.

    Cheaper than ``run_processes`` (it reads the environment of the driver's few
    descendants, not of every process), so the reaper can afford it every second or two.
    """
    try:
        below = {p.pid: p for p in psutil.Process(driver).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}
    tagged = {pid for pid, proc in below.items() if _has_tag(proc, tag)}

    def in_run(proc: psutil.Process) -> bool:
        pid = proc.pid
        while pid in below:
            if pid in tagged:
                return True
            try:
                pid = below[pid].ppid()
            except psutil.NoSuchProcess:
                return False
        return False

    return {pid: proc for pid, proc in below.items() if pid != os.getpid() and in_run(proc)}


def _is_alive(proc: psutil.Process) -> bool:
    try:
        # is_running() compares start times: a pid reused by another process is not ours.
        # A zombie has ended; only its parent (or init, for an orphan) can clear it.
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if _is_alive(p)]


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits until ``procs`` have ended, ``timeout`` at most; returns those still alive."""
    deadline = time.monotonic() + timeout
    alive = _alive(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _alive(alive)
    return alive


def _signal_all(procs: Sequence[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil refuses a pid reused by another process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def reap(tag: str, known: Iterable[psutil.Process] = (), grace_s: float = GRACE_S
         ) -> list[int]:
    """Ends the run's processes: SIGTERM, up to ``grace_s`` seconds, then SIGKILL.

    Args:
        tag: the run's tag.
        known: processes of the run seen earlier (those whose environment no longer shows
            the tag among them); those since ended or replaced are skipped.
        grace_s: how long the processes get to exit after SIGTERM.

    Returns:
        The ids of the processes signalled.
    """
    signalled: list[int] = []
    known = _alive(known)
    for _ in range(SWEEPS):
        procs = _with_descendants([*_alive(known), *tagged_processes(tag)], _children_map())
        targets = _alive(procs.values())
        if not targets:
            break
        signalled += [p.pid for p in targets]
        _signal_all(targets, signal.SIGTERM)
        alive = _wait_gone(targets, grace_s)
        _signal_all(alive, signal.SIGKILL)
        _wait_gone(alive, grace_s)
    return signalled


def _watch(tag: str, driver: int, pipe: int) -> Processes:
    """Remembers the run's processes under ``driver`` until ``pipe`` reaches end of file."""
    seen: Processes = {}
    while True:
        readable, _, _ = select.select([pipe], [], [], WATCH_EVERY_S)
        if readable and not os.read(pipe, 65536):
            return seen
        # Forget those that ended: the run's trial workers come and go.
        seen = {pid: p for pid, p in seen.items() if _is_alive(p)}
        seen.update(_run_below(tag, driver))


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
    seen = _watch(args[0], driver=os.getppid(), pipe=sys.stdin.fileno())
    reap(args[0], known=seen.values())
    return 0


if __name__ == "__main__":
    sys.exit(main())
