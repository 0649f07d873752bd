"""An experiment's life: one driver at a time, resumable after any kill, copies resume
into themselves, resume refuses changed trials and unsigned state, no foreign cluster."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from search.cli import main
from search.contract import CONFIG_FILE, CONFIG_HISTORY_FILE, LOCK_OWNER_FILE, TRIALS_FILE
from tests.conftest import FTSEARCH, ROOT, TINY, ftsearch_env, run_ftsearch, write_config

pytestmark = pytest.mark.slow

# One ResNet-18 trial of one epoch: the smallest search that still runs Ray and Tune.
ONE_TRIAL = {**TINY, "name": "one",
             "train": {**{k: v for k, v in TINY["train"].items() if k != "weights"},
                       "epochs": 1},
             "space": {"backbone": "resnet18",
                       "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}},
             "search": {"num_samples": 1}, "scheduler": {"type": "none"}}


def _copy(experiment: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "runs" / name
    shutil.copytree(experiment, copy, symlinks=True)
    return copy


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftsearch: "), lines
    return lines[0]


def test_a_second_driver_on_one_experiment_is_refused_naming_the_first(tmp_path, capsys):
    config = write_config(tmp_path / "one.yaml", {**ONE_TRIAL, "storage": str(tmp_path / "runs")})
    directory = tmp_path / "runs" / "one"
    first = subprocess.Popen([*FTSEARCH, "run", str(config)], cwd=ROOT, env=ftsearch_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (directory / LOCK_OWNER_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert main(["run", str(config)]) == 2
        assert f"in use by pid {first.pid}" in _one_error_line(capsys)
        assert main(["resume", str(directory)]) == 2
        assert f"in use by pid {first.pid}" in _one_error_line(capsys)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_an_experiment_that_never_started_is_neither_taken_nor_resumed_blindly(tmp_path,
                                                                               capsys):
    storage = tmp_path / "runs"
    directory = storage / "one"
    # Disk full at start: an empty config.yaml, and a tuner.pkl Tune wrote but nobody signed.
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_text("")
    (directory / "tuner.pkl").write_bytes(b"not a pickle")
    assert main(["resume", str(directory)]) == 2
    line = _one_error_line(capsys)
    assert "no trial ever ran" in line and "ftsearch run" in line
    # `run` with the same name does not call it taken: here pre-flight is what refuses it.
    config = write_config(tmp_path / "one.yaml", {**ONE_TRIAL, "storage": str(storage),
                                                  "resources": {"cpu": 4096}})
    assert main(["run", str(config)]) == 2
    assert _one_error_line(capsys).startswith("ftsearch: resources.cpu")


def test_killed_before_tune_saved_state_resumes_in_its_own_ray(tmp_path):
    # A driver killed right after writing config.yaml (Tune's unsigned tuner.pkl beside
    # it): resume starts the search. It runs with a private RAY_TMPDIR naming a dead
    # cluster, as `ray start` leaves behind: a local run must start its own Ray, not try to
    # join that one. (A short path: Ray's socket paths must fit in 107 characters.)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
        storage = tmp_path / "runs"
        directory = storage / "one"
        directory.mkdir(parents=True)
        from search.changes import write_config as save_config
        from search.config import load_config

        config = write_config(tmp_path / "one.yaml", {**ONE_TRIAL, "storage": str(storage)})
        save_config(load_config(config))
        (directory / "tuner.pkl").write_bytes(b"not a pickle")
        env = {**ftsearch_env(), "RAY_TMPDIR": str(ray_tmp)}
        proc = subprocess.run([*FTSEARCH, "resume", str(directory)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "never started" in proc.stdout
        assert "Connecting to existing Ray cluster" not in proc.stdout + proc.stderr
        assert len(pd.read_parquet(directory / TRIALS_FILE)) == 1
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_resume_refuses_changes_to_what_a_trial_is(tiny_experiment, capsys):
    before = (tiny_experiment / CONFIG_FILE).read_text()
    for change, field in (("train.epochs=5", "train.epochs"),
                          ("space.lr.high=0.5", "space.lr.high"),
                          ("search.objectives=[{metric: top5, mode: max}]", "search.objectives"),
                          ("search.num_samples=2", "search.num_samples")):
        assert main(["resume", str(tiny_experiment), "--set", change]) == 2
        assert _one_error_line(capsys).startswith(f"ftsearch: {field}")
    assert (tiny_experiment / CONFIG_FILE).read_text() == before


def test_a_tampered_or_planted_pickle_is_refused_and_never_runs(tiny_experiment, tmp_path,
                                                               capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("tuner.pkl", "searcher-state-2099-01-01_00-00-00.pkl"):
        copy = _copy(tiny_experiment, tmp_path, f"tampered-{name[:5]}")
        (copy / name).write_bytes(pickle.dumps(Payload()))
        assert main(["resume", str(copy)]) == 2
        line = _one_error_line(capsys)
        assert f"{copy / name}: not signed" in line and "--trust" in line
    assert not marker.exists()


def test_a_copied_experiment_resumes_into_itself_with_more_samples(tiny_experiment, tmp_path):
    original = {p.name: p.stat().st_mtime_ns for p in tiny_experiment.glob("*.parquet")}
    copy = _copy(tiny_experiment, tmp_path, "copy")
    proc = run_ftsearch("resume", str(copy), "--set", "search.num_samples=7")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "search.num_samples: 6 -> 7" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in tiny_experiment.glob("*.parquet")} == original
    trials = pd.read_parquet(copy / TRIALS_FILE)
    assert len(trials) == 7 and trials.trial_id.is_unique
    assert len(pd.read_parquet(tiny_experiment / TRIALS_FILE)) == 6
    assert "num_samples: 7" in (copy / CONFIG_FILE).read_text()
    assert '"search.num_samples": {"from": 6, "to": 7}' in (copy / CONFIG_HISTORY_FILE).read_text()
