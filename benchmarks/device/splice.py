"""Puts a GPU session's figures (benchmarks/device/gpu_session.sh) into BENCHMARKS.md.

    python -m benchmarks.device.splice runs/bench-gpu/results.jsonl [--into BENCHMARKS.md]

Replaces what the CPU report leaves open and nothing else: the GPU row and paragraph of
section 1, section 6 whole, the GPU rows and lines of section 4, and a section "GPU checks"
(bf16 vs fp32, the CUDA-only tests, memory in a reused actor). Every number comes from the
session's records; a step that failed or did not run leaves its figures open, with the
reason. The header says where and when the GPU figures were measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import MISS, OPEN, PASS, ROOT, Figure, Section
from benchmarks.run_all import join_report, split_report

__all__ = ["load_records", "splice"]

GPU_SECTION = "GPU checks: bf16 vs fp32, the CUDA-only tests, memory in a reused actor"


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of each step (``fastpath:resnet50`` for per-backbone steps)."""
    records: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[r["step"] + (f":{r['backbone']}" if r.get("backbone") else "")] = r
    return records


def _why(record: dict[str, Any] | None) -> str:
    if record is None:
        return "did not run (the session's time ran out first)"
    error = (record.get("error") or "").strip()
    if "stopped by signal" in error:
        return f"stopped at its time limit after {record['seconds']:.0f} s, unfinished"
    lines = [line for line in error.splitlines() if "Error" in line] or error.splitlines()
    return "failed: " + (lines[-1].strip()[:300] if lines else "no error text")


def _ok(records: dict[str, Any], key: str) -> dict[str, Any] | None:
    r = records.get(key)
    return r["data"] if r and r.get("ok") else None


def _row(ref: str, f: Figure) -> str:
    return f"| {ref} | {f.name} | {f.value} | {f.goal or '-'} | {f.status} |"


def _section_one(entry: tuple[str, list[str], str], records: dict[str, Any], gpu: str
                 ) -> tuple[str, list[str], str]:
    from benchmarks import trial_overhead

    ref, rows, chunk = entry
    data = _ok(records, "overhead")
    if data is None:
        figure = Figure("GPU: tuned / bare training images/s", "not measured",
                        f"≥ {trial_overhead.GOAL}", OPEN)
        lines = [f"GPU: open: not measured on {gpu}: the step {_why(records.get('overhead'))}. "
                 f"The GPU mode (`{trial_overhead._describe(trial_overhead.GPU_TRIAL)}`, "
                 "`gpu: 1`) runs wherever one is visible (`make bench-gpu`)."]
    else:
        figure, lines = trial_overhead.gpu_part(data["result"], data["trial"], gpu)
    rows = [_row(ref, figure) if " | GPU" in r and "tuned / bare" in r else r for r in rows]
    kept = [line for line in chunk.splitlines() if not line.startswith(("GPU: open",
                                                                        "GPU trial ("))]
    while kept and not kept[-1].strip():
        kept.pop()
    return ref, rows, "\n".join([*kept, "", *lines])


def _section_four(entry: tuple[str, list[str], str], records: dict[str, Any], gpu: str
                  ) -> tuple[str, list[str], str]:
    from benchmarks import frozen_cache

    ref, rows, chunk = entry
    data = _ok(records, "cache")
    if data is None:
        return entry
    figures, lines = frozen_cache.gpu_part(data["full"], data["half"], gpu)
    rows = [r for r in rows if not r.startswith(f"| {ref} | GPU")] + [_row(ref, f)
                                                                      for f in figures]
    kept = chunk.split("\n\nGPU (")[0].rstrip()
    return ref, rows, "\n".join([kept, "", *lines])


def _section_six(records: dict[str, Any], gpu: str, note: str) -> tuple[str, list[str], str]:
    from benchmarks import gpu_fast_path as fp

    ratios, missing = [], []
    for key in ("fastpath", "compile"):
        for backbone in fp.BACKBONES:
            data = _ok(records, f"{key}:{backbone}")
            if data is None:
                missing.append(f"{backbone}{' compiled' if key == 'compile' else ''}: "
                               f"{_why(records.get(f'{key}:{backbone}'))}")
            else:
                ratios += data["rows"]
    pack = _ok(records, "packing")
    notes = [f"Not measured in this session: {m}." for m in missing]
    if pack is None:
        notes.append(f"Packing not measured: {_why(records.get('packing'))}.")
    load = records.get("fastpath:resnet50", {}).get("load_before", "?")
    section = fp.render(ratios, pack, device_name=gpu, load=str(load), cuda=True,
                        notes=notes or None)
    for backbone in fp.BACKBONES:
        if not any(r["backbone"] == backbone and not r["compile"] for r in ratios):
            section.figures.insert(0, Figure(f"{backbone} at 224 px: trial / bare images/s",
                                             "not measured", f"≥ {fp.GOAL_RATIO}", OPEN))
    if pack is None:
        section.figures.append(Figure("4 trials per GPU (gpu 0.25) / 1 per GPU, aggregate "
                                      "images/s", "not measured", f"≥ {fp.GOAL_PACKING}",
                                      OPEN))
    seconds = sum(records[k]["seconds"] for k in records
                  if k.split(":")[0] in ("fastpath", "compile", "packing"))
    chunk = "\n".join([f"## {section.title}", "", f"_{seconds:.0f} s{note}._", "",
                       section.body.strip()])
    return section.ref, [_row(section.ref, f) for f in section.figures], chunk


def _checks(records: dict[str, Any], gpu: str, note: str, command: str
            ) -> tuple[str, list[str], str]:
    from benchmarks.device import gpu_checks as gc

    section = Section("gpu_checks", GPU_SECTION, ref="gpu")
    lines = [
        f"Measured by `{command}` (benchmarks/device/gpu_checks.py and the test files), "
        f"on {gpu}.", ""]
    amp = _ok(records, "amp")
    if amp is None:
        section.figures.append(Figure("digits trial, bf16 + channels_last vs fp32: max |Δ "
                                      "top-1| over seeds", "not measured", "≤ 1 point", OPEN))
        lines += [f"bf16 vs fp32: {_why(records.get('amp'))}.", ""]
    else:
        t = amp["trial"]
        section.figures.append(Figure.check(
            f"digits trial, bf16 + channels_last vs fp32 (TF32 off): max |Δ top-1| over "
            f"{len(amp['seeds'])} seeds", amp["max_abs_diff"], goal=gc.AMP_TOLERANCE,
            at_least=False, fmt="{:.2f}", unit=" points"))
        lines += [
            f"bf16 vs fp32: `{t['backbone']}` ({t['weights']} weights), {t['resolution']} px, "
            f"digits at {t['data']['samples_per_class']} training images per class "
            f"(validation {t['data']['val_fraction']:.0%} of the set), {t['epochs']} epochs, "
            f"every stage trained; the same trial with `amp: true, channels_last: true` and "
            f"with `amp: false, channels_last: false` and TF32 off for convolutions and "
            f"matrix products. Top-1 is the last epoch's.", "",
            "| seed | bf16 top-1 % | fp32 top-1 % | Δ | bf16 / fp32 training images/s |",
            "|---|---|---|---|---|",
            *(f"| {r['seed']} | {r['bf16_top1']:.2f} | {r['fp32_top1']:.2f} | "
              f"{r['bf16_top1'] - r['fp32_top1']:+.2f} | {r['bf16_samples_per_s']:.0f} / "
              f"{r['fp32_samples_per_s']:.0f} |" for r in amp["seeds"]),
            "", f"Mean Δ {amp['mean_diff']:+.2f} points.", ""]
    for key, label in (("heads_cuda", "tests/trainables/test_heads.py (its CUDA-only test "
                                      "included)"),
                       ("trainables_tests", "tests/trainables on the GPU machine")):
        data = _ok(records, key)
        if data is None:
            section.figures.append(Figure(label, "not run", "all pass", OPEN))
            lines += [f"{label}: {_why(records.get(key))}.", ""]
            continue
        cuda_skipped = [s for s in data["skipped"] if "CUDA" in s]
        status = PASS if data["returncode"] == 0 and not cuda_skipped else MISS
        section.figures.append(Figure(label, data["summary"].split(" in ")[0], "all pass",
                                      status))
        lines += [f"{label}: `pytest {' '.join(data['args'])}`: {data['summary']}"
                  + (f"; skipped: {'; '.join(data['skipped'])}" if data["skipped"] else "")
                  + ".", ""]
    mem = _ok(records, "memory")
    if mem is None:
        section.figures += [
            Figure("reused actor on the GPU: peak_gpu_mb growth, trial 2 → later",
                   "not measured", f"≤ {gc.PEAK_GROWTH_MB:.0f} MB", OPEN),
            Figure("reused actor on the GPU: memory_reserved after a trial − after the first",
                   "not measured", f"≤ {gc.RESERVED_TOLERANCE_MB:.0f} MB", OPEN)]
        lines += [f"Memory: {_why(records.get('memory'))}."]
    else:
        t = mem["train"]
        section.figures += [
            Figure.check("reused actor on the GPU: peak_gpu_mb growth, trial 2 → later",
                         mem["peak_growth_mb"], goal=gc.PEAK_GROWTH_MB, at_least=False,
                         fmt="{:.0f}", unit=" MB"),
            Figure.check("reused actor on the GPU: memory_reserved after a trial − after the "
                         "first", mem["reserved_growth_mb"], goal=gc.RESERVED_TOLERANCE_MB,
                         at_least=False, fmt="{:.0f}", unit=" MB"),
        ]
        if len(mem["pids"]) != 1:
            section.figures.append(Figure("reused actor on the GPU: one process for all "
                                          "trials", f"{len(mem['pids'])} processes", "1", MISS))
        lines += [
            f"Memory: {mem['trials']} trials (`{t['backbone']}`, {t['resolution']} px, batch "
            f"{t['batch_size']}, {t['epochs']} epochs, `gpu: 1`) one after another in one "
            f"reused actor (pid {', '.join(map(str, mem['pids']))}); `tune_trainable` wrapped "
            "to read the CUDA caching allocator before and after each trial.", "",
            "| trial | peak_gpu_mb | reserved MB before / after | allocated MB after |",
            "|---|---|---|---|",
            *(f"| {i + 1} | {peak:.0f} | {p['reserved_before_mb']:.0f} / "
              f"{p['reserved_after_mb']:.0f} | {p['allocated_after_mb']:.0f} |"
              for i, (peak, p) in enumerate(zip(mem["peak_gpu_mb"], mem["probes"],
                                                strict=False))),
        ]
    seconds = sum(records[k]["seconds"] for k in ("amp", "heads_cuda", "trainables_tests",
                                                  "memory") if k in records)
    chunk = "\n".join([f"## {section.title}", "", f"_{seconds:.0f} s{note}._", "",
                       "\n".join(lines).strip()])
    return section.ref, [_row(section.ref, f) for f in section.figures], chunk


def _smi(line: str) -> str:
    """nvidia-smi's CSV line (steps.py's query) in words."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 7:
        return line
    _, driver, memory, sm, sm_max, power, temp = parts
    return (f"driver {driver}, {memory}, SM clock {sm} at the start (max {sm_max}), power "
            f"limit {power}, {temp} °C")


def splice(old: str, records: dict[str, dict[str, Any]], *, command: str,
           notes: dict[str, str] | None = None) -> str:
    """``old`` with the session's GPU figures in place of the open ones.

    ``notes``: a paragraph to add after the header's GPU line (key ``header``) or at the end
    of a section (key: its ref, ``1``, ``4``, ``6`` or ``gpu``): what a session's records
    cannot say themselves, such as the cause of a failed step or a fix made since.
    """
    notes = notes or {}
    env = _ok(records, "env")
    if env is None or env.get("gpu", "none") == "none":
        raise ValueError("the session saw no GPU: nothing to put in")
    gpu = env["gpu"]
    when = records["env"]["started"]
    note = f"; {when[:16]}, `{command}` on {gpu}"
    head, entries = split_report(old)
    gpu_line = (
        f"**GPU figures** (sections 1, 4, 6 and \"GPU checks\"): measured {when[:16]} by "
        f"`{command}` on {gpu} ({_smi(env.get('nvidia_smi', ''))}; {env.get('cores')} CPU cores, "
        f"{env.get('memory')} memory), Python {env.get('python')}, torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), ray {env.get('ray')}, optuna "
        f"{env.get('optuna')}. The other figures are the CPU machine's above.")
    head = [line for line in head if not line.startswith("**GPU figures")]
    while head and not head[-1].strip():
        head.pop()
    head += ["", gpu_line + (f" {notes['header']}" if "header" in notes else "")]
    out = []
    for ref, rows, chunk in entries:
        if ref == "1":
            out.append(_section_one((ref, rows, chunk), records, gpu))
        elif ref == "4":
            out.append(_section_four((ref, rows, chunk), records, gpu))
        elif ref == "6":
            out.append(_section_six(records, gpu, note))
        elif ref != "gpu":
            out.append((ref, rows, chunk))
    checks = _checks(records, gpu, note, command)
    at = next((i for i, e in enumerate(out) if not e[0][:1].isdigit()), len(out))
    out.insert(at, checks)
    out = [(ref, rows, chunk + f"\n\n{notes[ref]}" if ref in notes and ref != "header"
            else chunk) for ref, rows, chunk in out]
    return join_report(head, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.jsonl of a GPU session")
    parser.add_argument("--into", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--command", default="make bench-gpu")
    parser.add_argument("--notes", type=Path,
                        help="JSON {header|1|4|6|gpu: paragraph} to add (see splice())")
    args = parser.parse_args(argv)
    notes = json.loads(args.notes.read_text()) if args.notes else None
    text = splice(args.into.read_text(), load_records(args.results), command=args.command,
                  notes=notes)
    args.into.write_text(text)
    print(f"wrote {args.into}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
