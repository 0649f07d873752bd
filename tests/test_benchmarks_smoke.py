"""`make bench` keeps working: every benchmark in smoke mode, report written (CI)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.run_all import BENCHMARKS
from tests.conftest import ROOT, ftsearch_env

pytestmark = pytest.mark.slow


def test_every_benchmark_runs_in_smoke_mode_and_writes_the_report(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--smoke", "--out",
                           str(out)], cwd=ROOT, env=ftsearch_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "smoke mode" in text and "Machine:" in text and "Command:" in text
    summary = [line for line in text.splitlines() if line.startswith("| ")
               and line.rstrip().endswith(("PASS |", "MISS |", "OPEN |", "INFO |", "ERROR |"))]
    assert not [line for line in summary if line.endswith("ERROR |")]
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert len(titles) == len(BENCHMARKS) + 1  # + the summary
    for goal in ("tuned / bare", "s per trial", "peak RSS growth", "grid's best",
                 "feature extraction", "half depth", "data time / step time",
                 "trial / bare images/s", "aggregate images/s", "from scratch",
                 "top-1 − the linear head's top-1", "s per trial / the linear head's",
                 "Kendall tau", "tpe+asha+prior", "best lr_scale", "ftsearch rank",
                 "make demo"):
        assert any(goal in line for line in summary), goal
    if not torch.cuda.is_available():
        assert "GPU figures are open" in text
        gpu = [line for line in summary if "GPU" in line or "trial / bare" in line]
        assert gpu and all(line.endswith("OPEN |") for line in gpu)
