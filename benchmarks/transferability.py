"""Issue 13: ``ftsearch rank`` on the demo config against the demo search itself, wall time.

Both as a user runs them, each in a fresh process from a shell without Ray variables, each
on a fresh experiment directory (so the rank's frozen-stage cache is cold): ``ftsearch rank
configs/demo.yaml`` three times (median), then ``ftsearch run configs/demo.yaml`` once. The
figure is their ratio; the goal is at most 5 %.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, Figure, Section, load_average, median

__all__ = ["run"]

GOAL = 0.05
DEMO = ROOT / "configs" / "demo.yaml"
# Smoke mode: every code path, a search of two trials of two one-step epochs (the
# demo's ASHA grace period is 2).
_SMOKE = ["--set", "search.num_samples=2", "--set", "train.epochs=2",
          "--set", "train.max_steps_per_epoch=1", "--set", "search.points_to_evaluate=[]"]


def _wall(args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ftsearch {' '.join(args)} exited {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds


def run(*, smoke: bool = False) -> Section:
    """Times the rank and the search."""
    section = Section("transferability", "Issue 13: ranking cost against the demo search",
                      ref="13")
    extra = _SMOKE if smoke else []
    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = [_wall(["rank", str(DEMO), "--storage", str(Path(tmp) / f"rank{i}"), *extra])
                 for i in range(1 if smoke else 3)]
        search = _wall(["run", str(DEMO), "--storage", str(Path(tmp) / "search"), *extra])
    rank = median(ranks)
    section.figures.append(Figure.check(
        "ftsearch rank configs/demo.yaml / the demo search, wall time", rank / search,
        goal=GOAL, at_least=False, fmt="{:.1%}"))
    section.figures.append(Figure("ftsearch rank configs/demo.yaml, wall s (cold cache)",
                                  f"{rank:.1f} s"))
    section.body = "\n".join([
        __doc__.split("\n\n", 1)[1].strip(), "",
        f"rank: {', '.join(f'{s:.1f}' for s in ranks)} s (median {rank:.1f} s); search: "
        f"{search:.1f} s; ratio {rank / search:.1%}. Load average before: {before}, after: "
        f"{load_average()}.",
    ])
    return section
