"""A search whose every trial fails the same way stops at the first failure, saying why once."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from tests.conftest import TINY, run_ftsearch, write_config

pytestmark = pytest.mark.slow


def _unreadable_folder(root):
    # Class folders whose files are listed (pre-flight passes) but none decodes: every
    # trial's data load fails, in every retry.
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"{i}.png").write_bytes(b"not a png at all " * 8)
    return root


def test_setup_failure_stops_the_search_and_prints_the_cause_once(tmp_path):
    folder = _unreadable_folder(tmp_path / "images")
    cfg = {**TINY, "name": "hopeless", "storage": str(tmp_path / "runs"),
           "data": {"source": "imagefolder", "path": str(folder), "on_bad_file": "error"},
           "train": {**TINY["train"], "weights": "none"},
           "space": {"backbone": "resnet18",
                     "lr": {"type": "loguniform", "low": 0.001, "high": 0.1}},
           "search": {"num_samples": 8, "max_concurrent": 2},
           "failure": {"max_failures": 2}}
    config = write_config(tmp_path / "hopeless.yaml", cfg)
    started = time.monotonic()
    proc = run_ftsearch("run", str(config), timeout=300)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"
    # The cause, once: the data error names the unreadable files' problem.
    assert output.count("cannot be loaded") == 1, output[-3000:]
    assert "search stopped" in proc.stdout
    assert "Traceback" not in output, output[-3000:]
    trials = pd.read_parquet(tmp_path / "runs" / "hopeless" / "trials.parquet")
    # Stopped long before the 8 trials x 3 attempts a retrying search would spend.
    assert len(trials) <= 3
    assert "RUNNING" not in set(trials.status)
    assert (trials.status == "ERROR").any()
