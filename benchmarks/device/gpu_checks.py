"""GPU correctness and memory checks (``make bench-gpu``; tests/gpu asserts the same).

* ``amp``: a digits fine-tuning trial with bf16 autocast + channels_last against the same trial
  in plain fp32 (TF32 off), per seed: top-1 within 1 point.
* ``memory``: several real trials one after another in one reused Ray actor holding the GPU:
  each trial's ``peak_gpu_mb`` must not grow, and ``torch.cuda.memory_reserved`` after each
  trial must return to within 100 MB of its value after the first.

    python -m benchmarks.device.gpu_checks amp [--smoke]
    python -m benchmarks.device.gpu_checks memory [--smoke]

Each prints one JSON object (the figures and their PASS/MISS) on its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

__all__ = ["amp_vs_fp32", "memprobe_trainable", "reused_actor_gpu_memory"]

AMP_TOLERANCE = 1.0  # points of top-1
RESERVED_TOLERANCE_MB = 100.0
PEAK_GROWTH_MB = 60.0  # the bound section 7 holds peak RSS to
AMP_TRIAL: dict[str, Any] = {
    "backbone": "efficientnet_lite0", "weights": "packaged", "resolution": 64, "epochs": 6,
    "batch_size": 32, "freeze_depth": 0, "lr": 0.05, "lr_scale": 0.1, "cache_dir": None,
    "data": {"source": "digits", "samples_per_class": 100, "val_fraction": 0.3},
}
_SMOKE_DATA = {"source": "digits", "samples_per_class": 4, "val_fraction": 0.05}


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """Plain fp32 on CUDA: TF32 off for cuDNN convolutions and cuBLAS matrix products."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _trial(config: dict[str, Any]) -> list[dict[str, Any]]:
    from trainables.finetune import run_trial

    reports: list[dict[str, Any]] = []
    run_trial(config, report=lambda m, s: reports.append(m))
    return reports


def amp_vs_fp32(*, seeds: tuple[int, ...] = (0, 1, 2), smoke: bool = False) -> dict[str, Any]:
    """Top-1 of the same digits trial in bf16 + channels_last and in fp32, per seed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {**AMP_TRIAL, "device": device}
    if smoke:
        base.update(resolution=32, epochs=2, max_steps_per_epoch=2, data=_SMOKE_DATA)
        seeds = seeds[:1]
    rows = []
    t0 = time.perf_counter()
    for seed in seeds:
        fast = _trial({**base, "seed": seed, "amp": True, "channels_last": True})
        with _strict_fp32():
            plain = _trial({**base, "seed": seed, "amp": False, "channels_last": False})
        rows.append({
            "seed": seed,
            "bf16_top1": fast[-1]["top1"], "fp32_top1": plain[-1]["top1"],
            "bf16_best": max(r["top1"] for r in fast), "fp32_best": max(r["top1"] for r in plain),
            "bf16_epochs": [r["top1"] for r in fast], "fp32_epochs": [r["top1"] for r in plain],
            "bf16_samples_per_s": fast[-1]["samples_per_s"],
            "fp32_samples_per_s": plain[-1]["samples_per_s"],
        })
    worst = max(abs(r["bf16_top1"] - r["fp32_top1"]) for r in rows)
    mean_diff = sum(r["bf16_top1"] - r["fp32_top1"] for r in rows) / len(rows)
    return {"check": "amp", "device": device, "trial": base, "seeds": rows,
            "max_abs_diff": worst, "mean_diff": mean_diff, "tolerance": AMP_TOLERANCE,
            "status": ("PASS" if worst <= AMP_TOLERANCE else "MISS") if device == "cuda"
            else "OPEN", "seconds": time.perf_counter() - t0}


def _reserved_mb() -> tuple[float, float]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0, 0.0
    return (torch.cuda.memory_reserved() / 2**20, torch.cuda.memory_allocated() / 2**20)


def memprobe_trainable(config: dict[str, Any]) -> None:
    """``tune_trainable``, recording the CUDA caching allocator before and after the trial.

    One JSON line per trial is appended to the file ``$FTSEARCH_MEMPROBE`` names: the
    process, and reserved / allocated MB before and after (after ``tune_trainable``'s own
    release of the trial's memory, so what the next trial in this actor starts with).
    """
    from trainables.finetune import tune_trainable

    before = _reserved_mb()
    t0 = time.time()
    try:
        tune_trainable(config)
    finally:
        after = _reserved_mb()
        record = {"pid": os.getpid(), "start": t0, "lr": config.get("lr"),
                  "reserved_before_mb": before[0], "allocated_before_mb": before[1],
                  "reserved_after_mb": after[0], "allocated_after_mb": after[1]}
        with open(os.environ["FTSEARCH_MEMPROBE"], "a") as handle:
            handle.write(json.dumps(record) + "\n")


def reused_actor_gpu_memory(*, trials: int = 5, smoke: bool = False) -> dict[str, Any]:
    """``trials`` ResNet-50 trials at 224 px, one at a time in one reused actor with the GPU."""
    import search.tuner
    from benchmarks.common import experiment, local_ray

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "memprobe.jsonl"
        os.environ["FTSEARCH_MEMPROBE"] = str(probe)  # before Ray starts: workers inherit it
        local_ray()
        train = ({"backbone": "resnet18", "weights": "none", "resolution": 32, "epochs": 1,
                  "batch_size": 8, "max_steps_per_epoch": 2, "eval_batch_size": 64}
                 if smoke else
                 {"backbone": "resnet50", "weights": "none", "resolution": 224, "epochs": 2,
                  "batch_size": 64, "eval_batch_size": 128})
        data = (_SMOKE_DATA if smoke else
                {"source": "fake", "fake_size": 640, "fake_classes": 10, "val_fraction": 0.2})
        cfg = experiment(Path(tmp), "gpumemory", data=data, train=train,
                         space={"lr": {"type": "loguniform", "low": 0.001, "high": 0.1}},
                         search={"algorithm": "random", "num_samples": 2 if smoke else trials,
                                 "max_concurrent": 1},
                         resources={"cpu": 1 if smoke else 4, "gpu": 1 if cuda else 0})
        with mock.patch.object(search.tuner, "tune_trainable", memprobe_trainable):
            tuner = search.tuner.build_tuner(cfg)
        results = tuner.fit()
        if results.errors:
            raise RuntimeError(f"a memory trial failed: {results.errors[0]}")
        ordered = sorted((r.metrics for r in results),
                         key=lambda m: int(m["experiment_tag"].split("_")[0]))
        probes = sorted((json.loads(line) for line in probe.read_text().splitlines()),
                        key=lambda r: r["start"])
    pids = {m["pid"] for m in ordered} | {p["pid"] for p in probes}
    peaks = [float(m["peak_gpu_mb"]) for m in ordered]
    reserved = [p["reserved_after_mb"] for p in probes]
    growth = max(peaks[2:] or peaks[1:]) - peaks[1] if len(peaks) > 1 else 0.0
    reserved_growth = max(reserved) - reserved[0] if reserved else 0.0
    ok = len(pids) == 1 and growth <= PEAK_GROWTH_MB and reserved_growth <= RESERVED_TOLERANCE_MB
    return {"check": "memory", "device": "cuda" if cuda else "cpu", "train": train,
            "data": data, "trials": len(ordered), "pids": sorted(pids),
            "peak_gpu_mb": peaks, "peak_growth_mb": growth, "probes": probes,
            "reserved_after_mb": reserved, "reserved_growth_mb": reserved_growth,
            "status": ("PASS" if ok else "MISS") if cuda else "OPEN",
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("amp", "memory"))
    parser.add_argument("--smoke", action="store_true", help="toy sizes (runs on a CPU)")
    args = parser.parse_args(argv)
    if args.check == "amp":
        out = amp_vs_fp32(smoke=args.smoke)
    else:
        from benchmarks.common import stop_ray

        try:
            out = reused_actor_gpu_memory(smoke=args.smoke)
        finally:
            stop_ray()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
