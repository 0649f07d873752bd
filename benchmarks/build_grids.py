"""Rebuild the grid experiments that ``ftsearch replay`` and BENCHMARKS.md section 3 read.

Each grid (benchmarks/grids/<name>.yaml) is run to its end by ``ftsearch run`` into a
temporary results directory, then ranked by ``ftsearch rank`` with a cold frozen-stage
cache (so the ranking's recorded seconds include computing the stage features), and the
four files replay needs are copied to benchmarks/grids/<name>/. Takes about an hour per
grid on 2 cores; run it only when a grid's definition or the trainables change:

    python -m benchmarks.build_grids [digits-10 digits-100]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT
from benchmarks.search_efficiency import GRIDS
from search.contract import EPOCHS_FILE, TRANSFERABILITY_FILE, TRIALS_FILE

KEPT = ("config.yaml", TRIALS_FILE, EPOCHS_FILE, TRANSFERABILITY_FILE)


def _ftsearch(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "search.cli", *args], check=True, cwd=ROOT)


def build(name: str) -> Path:
    config = ROOT / "benchmarks" / "grids" / f"{name}.yaml"
    target = ROOT / "benchmarks" / "grids" / name
    with tempfile.TemporaryDirectory(prefix=f"grid-{name}-") as tmp:
        storage, cold_cache = Path(tmp) / "runs", Path(tmp) / "cold-cache"
        _ftsearch("run", str(config), "--name", name, "--storage", str(storage))
        _ftsearch("rank", str(storage / name), "--set", f"train.cache_dir={cold_cache}")
        target.mkdir(parents=True, exist_ok=True)
        for file in KEPT:
            shutil.copy2(storage / name / file, target / file)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="*", default=list(GRIDS), choices=GRIDS)
    for name in parser.parse_args(argv).grids:
        print(f"{name}: {build(name)}")


if __name__ == "__main__":
    main()
