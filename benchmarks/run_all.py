"""Runs every benchmark and rewrites BENCHMARKS.md (``make bench``).

    python -m benchmarks.run_all            # the CPU benchmarks, ~10-15 min on 2 cores
    python -m benchmarks.run_all --smoke    # every code path at toy sizes (the test suite)

GPU figures are measured only where CUDA is visible; elsewhere they are marked open.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import traceback
import warnings
from datetime import datetime
from pathlib import Path

from benchmarks.common import ROOT, Figure, Section, load_average, machine, stop_ray

__all__ = ["BENCHMARKS", "main", "render"]

# Timing-sensitive ones first. Scheduling leads: like `ftsearch run`, its searches then get
# a fresh driver and Ray, not one that has trained models in-process.
BENCHMARKS = (
    "scheduling",
    "trial_overhead",
    "frozen_cache",
    "data_path",
    "gpu_fast_path",
    "search_efficiency",
    "pretrained_vs_scratch",
)


def _run_one(name: str, *, smoke: bool) -> Section:
    t0 = time.perf_counter()
    try:
        section = importlib.import_module(f"benchmarks.{name}").run(smoke=smoke)
    except Exception:  # one broken benchmark must not hide the others' figures
        return Section(name, f"{name}: failed", [Figure(name, "failed", "", "ERROR")],
                       "```\n" + traceback.format_exc()[-3000:] + "\n```",
                       time.perf_counter() - t0, ref="?")
    section.seconds = time.perf_counter() - t0
    return section


def render(sections: list[Section], *, command: str, seconds: float, smoke: bool,
           load: tuple[str, str]) -> str:
    """BENCHMARKS.md from the sections."""
    info = machine()
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m benchmarks.run_all`); do not edit by hand. Each "
        "figure is a ratio or a cost measured side by side in one run on the machine below. "
        "Other processes may share it: each section gives the load average around it.",
        "",
        f"- Date: {datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"- Command: `{command}`" + (" (smoke mode: toy sizes, not figures)" if smoke else ""),
        f"- Total time: {seconds / 60:.1f} min; load average at start {load[0]}, at end "
        f"{load[1]}",
        f"- Machine: {info['platform']}; CPU: {info['cpu']}, {info['cores']} cores; memory "
        f"{info['memory']}; GPU: {info['gpu']}",
        f"- Software: Python {info['python']}, torch {info['torch']}, ray {info['ray']}, "
        f"optuna {info['optuna']}",
        "",
    ]
    if info["gpu"] == "none":
        lines += ["**GPU figures are open**: no GPU has been used yet. Run `make bench` on a "
                  "CUDA machine to measure them (the GPU modes are implemented and exercised "
                  "on CPU in CI).", ""]
    lines += ["## Summary", "", "| # | figure | measured | goal | status |",
              "|---|---|---|---|---|"]
    # Numbered as the issue numbers its goals, whatever order they ran in.
    sections = sorted(sections, key=lambda s: (not s.ref[:1].isdigit(), s.ref))
    for section in sections:
        for f in section.figures:
            lines.append(f"| {section.ref} | {f.name} | {f.value} | {f.goal or '-'} | "
                         f"{f.status} |")
    for section in sections:
        lines += ["", f"## {section.title}", "", f"_{section.seconds:.0f} s._", "",
                  section.body.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks it all runs")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="where to write the report (default: BENCHMARKS.md)")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    command = "python -m benchmarks.run_all" + ("".join(f" {a}" for a in (argv or sys.argv[1:])))
    t0 = time.perf_counter()
    load_start = load_average()
    sections = []
    try:
        for name in names:
            print(f"== {name} ({load_average()})", flush=True)
            section = _run_one(name, smoke=args.smoke)
            sections.append(section)
            for f in section.figures:
                print(f"   {f.status:5} {f.name}: {f.value} (goal {f.goal or '-'})", flush=True)
    finally:
        stop_ray()
    text = render(sections, command=command, seconds=time.perf_counter() - t0,
                  smoke=args.smoke, load=(load_start, load_average()))
    args.out.write_text(text)
    print(f"wrote {args.out} in {(time.perf_counter() - t0) / 60:.1f} min")
    failed = [s.key for s in sections if any(f.status == "ERROR" for f in s.figures)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
