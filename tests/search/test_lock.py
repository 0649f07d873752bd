from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from search.contract import LOCK_OWNER_FILE
from search.lock import ExperimentLock, LockedError

HOLD = """
import sys, time
from search.lock import ExperimentLock
lock = ExperimentLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(60)
"""


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_naming_the_first(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockedError) as info:
            ExperimentLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    proc.kill()  # kill -9: the kernel releases its lock, its owner file stays
    proc.wait()
    assert (tmp_path / LOCK_OWNER_FILE).exists()
    start = time.monotonic()
    with ExperimentLock(tmp_path):
        owner = json.loads((tmp_path / LOCK_OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid()
    assert time.monotonic() - start < 2
    assert not (tmp_path / LOCK_OWNER_FILE).exists()
