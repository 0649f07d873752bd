"""Runs every benchmark and rewrites BENCHMARKS.md (``make bench``).

    python -m benchmarks.run_all            # the CPU benchmarks, ~10-15 min on 2 cores
    python -m benchmarks.run_all --smoke    # every code path at toy sizes (the test suite)
    python -m benchmarks.run_all --only classical_heads --merge
                                            # re-runs one, replacing only its section

GPU figures are measured only where CUDA is visible; elsewhere they are marked open.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import time
import traceback
import warnings
from datetime import datetime
from pathlib import Path

from benchmarks.common import ROOT, Figure, Section, load_average, machine, stop_ray

__all__ = ["BENCHMARKS", "main", "merge", "render"]

# Timing-sensitive ones first. Scheduling leads: like `ftsearch run`, its searches then get
# a fresh driver and Ray, not one that has trained models in-process.
BENCHMARKS = (
    "scheduling",
    "trial_overhead",
    "cpu_layout",
    "frozen_cache",
    "classical_heads",
    "data_path",
    "gpu_fast_path",
    "search_efficiency",
    "pretrained_vs_scratch",
    "demo",
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


def _order(ref: str) -> tuple[bool, int, str]:
    # Numbered as the issue numbers its goals (2 before 13), whatever order they ran in.
    number = re.search(r"\d+", ref)
    return number is None, int(number[0]) if number else 0, ref


def _rows(section: Section) -> list[str]:
    """The section's lines of the summary table."""
    return [f"| {section.ref} | {f.name} | {f.value} | {f.goal or '-'} | {f.status} |"
            for f in section.figures]


def _chunk(section: Section, note: str = "") -> str:
    """The section's part of the file, from its heading on."""
    return "\n".join([f"## {section.title}", "", f"_{section.seconds:.0f} s{note}._", "",
                      section.body.strip()])


def _machine_line(info: dict[str, str]) -> str:
    return (f"{info['platform']}; CPU: {info['cpu']}, {info['cores']} cores; memory "
            f"{info['memory']}; GPU: {info['gpu']}")


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
        f"- Machine: {_machine_line(info)}",
        f"- Software: Python {info['python']}, torch {info['torch']}, ray {info['ray']}, "
        f"optuna {info['optuna']}",
        "",
    ]
    if info["gpu"] == "none":
        lines += ["**GPU figures are open**: no GPU has been used yet. Run `make bench-gpu` on a "
                  "CUDA machine to measure them (the GPU modes are implemented and exercised "
                  "on CPU in CI).", ""]
    lines += ["## Summary", "", "| # | figure | measured | goal | status |",
              "|---|---|---|---|---|"]
    sections = sorted(sections, key=lambda s: _order(s.ref))
    for section in sections:
        lines += _rows(section)
    for section in sections:
        lines += ["", _chunk(section)]
    return "\n".join(lines) + "\n"


def split_report(text: str) -> tuple[list[str], list[tuple[str, list[str], str]]]:
    """A BENCHMARKS.md :func:`render` wrote, split into its header lines and, per section
    in order, (ref, its summary rows, its text from the ``## `` heading on).

    Raises:
        ValueError: ``text`` is not such a file, or its summary and sections disagree.
    """
    head, found, rest = text.partition("\n## Summary\n")
    if not found:
        raise ValueError("no '## Summary' heading: not a BENCHMARKS.md written by run_all")
    table, _, tail = rest.partition("\n## ")
    rows = [line for line in table.splitlines()
            if line.startswith("| ") and not line.startswith(("| # |", "|---"))]
    chunks = ["## " + c.strip("\n") for c in ("\n" + tail).split("\n## ") if c.strip()]
    refs = list(dict.fromkeys(row[2:].split(" | ", 1)[0] for row in rows))
    if len(refs) != len(chunks):
        raise ValueError(f"{len(chunks)} sections but {len(refs)} refs in the summary: "
                         f"re-run every benchmark instead")
    entries = [(ref, [r for r in rows if r[2:].split(" | ", 1)[0] == ref], chunk)
               for ref, chunk in zip(refs, chunks, strict=True)]
    return head.rstrip("\n").splitlines(), entries


def merge(old: str, sections: list[Section], *, command: str, seconds: float,
          load: tuple[str, str]) -> str:
    """``old`` (a BENCHMARKS.md) with ``sections`` put in place of theirs, the rest kept.

    A section replaces the one with its title (or a failed run of its benchmark) and its
    summary rows replace the rows of its ``ref``; a new one is inserted in ``ref`` order.
    The header keeps the full run's date and machine and gains a line naming this run's.

    Raises:
        ValueError: ``old`` is not a file :func:`render` wrote.
    """
    head, kept = split_report(old)
    new_refs = {s.ref for s in sections}
    new_titles = {s.title for s in sections} | {f"{s.key}: failed" for s in sections}
    entries = [(ref, rows, chunk) for ref, rows, chunk in kept
               if ref not in new_refs and chunk.splitlines()[0][3:] not in new_titles]
    info = machine()
    when = datetime.now().astimezone().isoformat(timespec="minutes")
    note = f"; {when}, `{command}`"
    entries += [(s.ref, _rows(s), _chunk(s, note)) for s in sections]
    entries.sort(key=lambda e: _order(e[0]))
    update = (f"- Updated {when}: `{command}` re-ran {', '.join(s.key for s in sections)} "
              f"({seconds / 60:.1f} min; load average at start {load[0]}, at end {load[1]}) on "
              f"{_machine_line(info)}; those sections carry this date, the others are from the run "
              f"above")
    rerun = {s.key for s in sections}
    lines = [line for line in head if not _superseded(line, rerun)]
    at = max((i for i, line in enumerate(lines) if line.startswith("- ")), default=len(lines) - 1)
    lines.insert(at + 1, update)
    return join_report(lines, entries)


def join_report(head: list[str], entries: list[tuple[str, list[str], str]]) -> str:
    """The inverse of :func:`split_report`: the header, the summary table, the sections."""
    lines = [*head, "", "## Summary", "", "| # | figure | measured | goal | status |",
             "|---|---|---|---|---|"]
    for _, rows, _ in entries:
        lines += rows
    for _, _, chunk in entries:
        lines += ["", chunk]
    return "\n".join(lines) + "\n"


def _superseded(line: str, rerun: set[str]) -> bool:
    """Whether ``line`` is an earlier merge's "Updated" line for benchmarks re-run now."""
    found = re.match(r"- Updated .*? re-ran (.+?) \(", line)
    return bool(found) and set(found.group(1).split(", ")) <= rerun


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks it all runs")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="where to write the report (default: BENCHMARKS.md)")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--merge", action="store_true",
                        help="replace only these benchmarks' sections and summary rows in the "
                             "existing report, keeping the others (with --only)")
    args = parser.parse_args(argv)
    if args.merge and not args.out.exists():
        parser.error(f"--merge needs an existing report at {args.out}")
    if args.merge and args.smoke != ("smoke mode" in args.out.read_text()):
        parser.error("--merge would mix smoke-mode and real figures in one report")
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
    timing = {"command": command, "seconds": time.perf_counter() - t0,
              "load": (load_start, load_average())}
    if args.merge:
        text = merge(args.out.read_text(), sections, **timing)
    else:
        text = render(sections, smoke=args.smoke, **timing)
    args.out.write_text(text)
    print(f"wrote {args.out} in {(time.perf_counter() - t0) / 60:.1f} min")
    failed = [s.key for s in sections if any(f.status == "ERROR" for f in s.figures)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
