"""benchmarks.device.splice: the GPU session's records into BENCHMARKS.md (runs on a CPU)."""

from __future__ import annotations

import json

from benchmarks.device.splice import load_records, splice
from benchmarks.run_all import merge
from tests.conftest import ROOT

RESULTS = ROOT / "benchmarks" / "device" / "results-nvidia-h200-2026-12-04.jsonl"
NOTES = ROOT / "benchmarks" / "device" / "notes-nvidia-h200-2026-12-04.json"
COMMAND = "bash benchmarks/device/gpu_session.sh (BUDGET_S=430; make bench-gpu runs it)"


def _spliced() -> str:
    return splice((ROOT / "BENCHMARKS.md").read_text(), load_records(RESULTS), command=COMMAND,
                  notes=json.loads(NOTES.read_text()))


def test_splicing_twice_changes_nothing():
    once = _spliced()
    again = splice(once, load_records(RESULTS), command=COMMAND,
                   notes=json.loads(NOTES.read_text()))
    assert again == once


def test_measured_figures_replace_open_ones_and_failed_steps_stay_open():
    rows = [line for line in _spliced().splitlines() if line.startswith("| ")]
    row = {line.split(" | ")[1]: line for line in rows}
    assert row["resnet50 at 224 px: trial / bare images/s"].endswith("| 0.82 | ≥ 0.90 | MISS |")
    assert "| 0.96 | ≥ 0.90 | PASS |" in row["efficientnet_b0 at 224 px: trial / bare images/s"]
    # Steps that could not start Ray measured nothing: open, with the reason in the text.
    assert row["GPU: tuned / bare training images/s"].endswith("not measured | ≥ 0.97 | OPEN |")
    assert row["4 trials per GPU (gpu 0.25) / 1 per GPU, aggregate images/s"].endswith(
        "OPEN |")
    assert "Permission denied" in _spliced()


def test_the_spliced_report_still_merges():
    from benchmarks.common import Section

    text = merge(_spliced(), [Section("x", "x", body="x", ref="x")], command="c", seconds=1.0,
                 load=("0", "0"))
    assert "## GPU checks" in text and "## 6. GPU fast path" in text
