"""Kill the driver at random moments and during a Parquet replace; resume; nothing is lost.

Every kill is ``kill -9`` of the run's whole process group (the driver and the Ray it
started), as a crashed machine would do it. After the last resume, every result a trial
reported (read back from Tune's own per-trial ``result.json``) is in epochs.parquet exactly
once, no temp file is left, without a scheduler every trial ended TERMINATED, and the
Optuna study journal holds each trial and each epoch once.

The test runs a CI-sized version; the issue's acceptance size (5 random kills and 3 during
a replace, then a full disk) runs with
``python -m tests.search.test_crash_resume --kills 5 --replace-kills 3 --disk-full``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from search.contract import EPOCHS_FILE, JOURNAL_FILE, TRIALS_FILE
from search.study_journal import FORGOTTEN_ATTR
from tests.conftest import FTSEARCH, ROOT, TINY, fill, ftsearch_env, run_ftsearch, write_config
from tests.search.test_dashboard import assert_mirrors_results, journal_ops

pytestmark = pytest.mark.slow

_TRIALS = 3
_EPOCHS = 3


def _config(storage: Path) -> dict:
    # Lite0 with its packaged weights at 64 px: an epoch takes about a second on one core
    # (long enough to be killed in, and for the full-disk resume to have work left) and a
    # checkpoint is small enough for a small disk; without a scheduler every trial must
    # end TERMINATED.
    return {**TINY, "name": "crashes", "storage": str(storage),
            "data": {**TINY["data"], "val_fraction": 0.2},
            "train": {**TINY["train"], "weights": "packaged", "epochs": _EPOCHS,
                      "resolution": 64, "max_steps_per_epoch": 2},
            "space": {"backbone": "efficientnet_lite0",
                      "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}},
            "search": {"num_samples": _TRIALS, "max_concurrent": 2},
            "scheduler": {"type": "none"}}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen([*FTSEARCH, *args], cwd=ROOT, env=ftsearch_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:  # it ended by itself: a refusal or a crash, not our kill
        raise AssertionError(f"ftsearch exited {proc.returncode} before the kill:\n"
                             + proc.log.read_text()[-3000:])  # type: ignore[attr-defined]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _epochs_on_disk(directory: Path) -> int:
    try:
        return len(pd.read_parquet(directory / EPOCHS_FILE))
    except (FileNotFoundError, OSError, ValueError):
        return 0


def _temp_file_seen(directory: Path) -> bool:
    try:
        return any(n.endswith(".tmp") and n.startswith(".") and ".parquet." in n
                   for n in os.listdir(directory))
    except FileNotFoundError:
        return False


def _kill_at_random(proc: subprocess.Popen, directory: Path, rng: random.Random) -> str:
    # A random moment once the search has made some progress (or right at the start).
    _wait_for_config(proc, directory)
    progress = _epochs_on_disk(directory)
    deadline = time.monotonic() + 120
    delay = rng.uniform(0.0, 6.0)
    while time.monotonic() < deadline and proc.poll() is None:
        if _epochs_on_disk(directory) > progress or delay < 1.0:
            time.sleep(delay)
            break
        time.sleep(0.2)
    _kill(proc)
    return f"random kill after {delay:.1f} s"


def _wait_for_config(proc: subprocess.Popen, directory: Path) -> None:
    # Before config.yaml there is no experiment to resume: that is `run`'s refusal to test.
    deadline = time.monotonic() + 60
    while not (directory / "config.yaml").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ftsearch exited {proc.returncode} before starting")
        time.sleep(0.05)


def _kill_during_replace(proc: subprocess.Popen, directory: Path) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if _temp_file_seen(directory):
            _kill(proc)
            return "kill while a Parquet temp file existed"
        time.sleep(0.0005)
    _kill(proc)
    return "kill during replace: no temp file seen (search ended or stalled)"


def _run_out_of_disk(directory: Path, disk: Path) -> str:
    """Resumes the search, fills ``disk`` once it made progress, frees it after the run."""
    proc = _start(["resume", str(directory)], directory.parent.parent / "full.log")
    progress = _epochs_on_disk(directory)
    deadline = time.monotonic() + 180
    while _epochs_on_disk(directory) <= progress and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    filler = fill(disk)
    try:
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            _kill(proc)
        filler.unlink()
    output = proc.log.read_text()  # type: ignore[attr-defined]
    assert proc.returncode != 0 and "Traceback" not in output, output[-3000:]
    statuses = set(pd.read_parquet(directory / TRIALS_FILE).status)
    assert "RUNNING" not in statuses, statuses
    return "disk full: the run failed, no trial left RUNNING"


def _reported(directory: Path, trials: set[str]) -> dict[tuple[str, int], int]:
    """(trial, epoch) -> times reported, from Tune's result.json of each kept trial."""
    seen: dict[tuple[str, int], int] = {}
    for result_file in directory.glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            try:
                result = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if "epoch" in result and result.get("trial_id") in trials:
                key = (result["trial_id"], int(result["epoch"]))
                seen[key] = seen.get(key, 0) + 1
    return seen


def crash_and_resume(storage: Path, *, kills: int, replace_kills: int, seed: int = 0,
                     fill_disk: Path | None = None) -> list[str]:
    """Runs the search with ``kills`` random and ``replace_kills`` mid-replace kills, then
    (with ``fill_disk``, the mount ``storage`` is on) a resume that fills the disk, then
    resumes it to the end; asserts exactly-once results. Returns what each step did."""
    rng = random.Random(seed)
    config = write_config(storage.parent / "crashes.yaml", _config(storage))
    directory = storage / "crashes"
    plan = ["random"] * kills + ["replace"] * replace_kills
    rng.shuffle(plan)
    log = []
    for n, kind in enumerate(plan):
        proc = _start(["run", str(config)] if n == 0 else ["resume", str(directory)],
                      storage.parent / f"driver-{n}.log")
        log.append(_kill_at_random(proc, directory, rng) if kind == "random"
                   else _kill_during_replace(proc, directory))
    if fill_disk is not None:
        log.append(_run_out_of_disk(directory, fill_disk))
    final = run_ftsearch("resume", str(directory), timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]

    trials = pd.read_parquet(directory / TRIALS_FILE)
    epochs = pd.read_parquet(directory / EPOCHS_FILE)
    assert len(trials) == _TRIALS and trials.trial_id.is_unique
    assert set(trials.status) == {"TERMINATED"}, trials[["trial_id", "status", "epochs"]]
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for trial_id, ran in epochs.groupby("trial_id").epoch:
        assert sorted(ran) == list(range(1, _EPOCHS + 1)), trial_id
    kept = set(trials.trial_id)
    reported = set(_reported(directory, kept))
    in_files = set(zip(epochs.trial_id, epochs.epoch, strict=True))
    assert reported <= in_files, sorted(reported - in_files)
    assert set(epochs.trial_id) == kept
    leftovers = [p.name for p in directory.iterdir()
                 if p.name.endswith(".tmp") or p.name == JOURNAL_FILE]
    assert not leftovers
    # The Optuna study journal (what optuna-dashboard shows) came through the kills too:
    # each trial created once, each epoch reported once, none left RUNNING.
    study = assert_mirrors_results(directory, ["top1"], exact_curves=False)
    assert {t.state for t in study.trials
            if not t.user_attrs.get(FORGOTTEN_ATTR)} == {TrialState.COMPLETE}
    created, reports = journal_ops(directory)
    assert set(created.values()) == {1}, created
    assert set(reports.values()) == {1}, reports
    return log


def test_killed_driver_and_full_disk_lose_no_result(small_disk, tmp_path):
    log = crash_and_resume((small_disk or tmp_path) / "runs", kills=1, replace_kills=1,
                           seed=1, fill_disk=small_disk)
    assert sum("temp file existed" in line for line in log) == 1, log
    if small_disk is not None:
        assert log[-1] == "disk full: the run failed, no trial left RUNNING"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--replace-kills", type=int, default=3)
    parser.add_argument("--disk-full", action="store_true",
                        help="then fill the disk mid-run (mounts a 256 MB tmpfs: needs root)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        disk = None
        if args.disk_full:
            disk = Path(root, "small")
            disk.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)],
                           check=True)
        try:
            for line in crash_and_resume((disk or Path(root)) / "runs", kills=args.kills,
                                         replace_kills=args.replace_kills, seed=args.seed,
                                         fill_disk=disk):
                print(line)
        finally:
            if disk is not None:
                subprocess.run(["umount", "-l", str(disk)], check=False)
    print("every reported epoch present exactly once; no temp file; all TERMINATED")
    sys.exit(0)
