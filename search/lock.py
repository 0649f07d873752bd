"""One driver per experiment directory: a lock held from before Ray starts until exit.

Two drivers on one directory would both train and overwrite each other's Parquet files.
The lock is an OS file lock (``filelock``: ``flock`` on POSIX), so the kernel releases it
when its holder dies, even by ``kill -9``: a stale lock is simply taken over. Who holds it
(pid, host, command) is written beside it, so a refused second run can name the holder.
Remote (URI) storage has no lock: the README says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from search.contract import LOCK_FILE, LOCK_OWNER_FILE

__all__ = ["ExperimentLock", "LockedError"]


class LockedError(Exception):
    """Another live driver holds the experiment's lock."""


class ExperimentLock:
    """The lock of experiment directory ``directory`` (which must exist)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock = FileLock(self.directory / LOCK_FILE, timeout=0)

    def acquire(self) -> None:
        """Takes the lock at once, or raises :class:`LockedError` naming its holder."""
        try:
            self._lock.acquire()
        except Timeout:
            raise LockedError(f"experiment directory {self.directory} is in use by "
                              f"{self._holder()}; wait for it to end (or stop it), then "
                              f"run again") from None
        self._write_owner()

    def check_free(self) -> None:
        """Raises :class:`LockedError` if a live driver holds the lock; creates nothing."""
        if (self.directory / LOCK_FILE).exists():
            self.acquire()
            self.release()

    def _write_owner(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "command": " ".join(["ftsearch", *sys.argv[1:]])[:500],
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (self.directory / LOCK_OWNER_FILE).write_text(json.dumps(owner))

    def release(self) -> None:
        """Gives the lock back (a dead holder's is given back by the kernel)."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / LOCK_OWNER_FILE).unlink()
        self._lock.release()

    def __enter__(self) -> ExperimentLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _holder(self) -> str:
        try:
            owner = json.loads((self.directory / LOCK_OWNER_FILE).read_text())
            return (f"pid {owner['pid']} on host {owner['host']} "
                    f"(`{owner['command']}`, since {owner['since']})")
        except (OSError, ValueError, KeyError, TypeError):
            # The holder is between taking the lock and writing who it is.
            return "another ftsearch process (its pid is not recorded yet)"
