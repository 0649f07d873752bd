"""Goal 1, trial overhead: the same fine-tuning loop bare and as a Ray Tune trial via ftsearch.

Bare is :func:`trainables.finetune.run_trial` called in this process on one thread; tuned is
the same trial config run by ``search.tuner.build_tuner`` (Optuna searcher, Parquet results,
a checkpoint every epoch) on a local Ray with ``cpu: 1``. The figure is the ratio of their
median training throughput (``samples_per_s``) over epochs 2.., bare and tuned interleaved so
that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.common import (
    DEMO_DATA,
    DEMO_RESOLUTION,
    MISS,
    OPEN,
    PASS,
    Figure,
    Section,
    experiment,
    load_average,
    local_ray,
    median,
    single_thread,
    timed,
)

__all__ = ["CPU_TRIAL", "GPU_TRIAL", "gpu_part", "measure", "measure_gpu", "run"]

GOAL = 0.97
# The demo's pretrained backbone, all stages trained (the heaviest loop of the demo).
CPU_TRIAL: dict[str, Any] = {
    "backbone": "efficientnet_lite0", "weights": "packaged",
    "resolution": DEMO_RESOLUTION, "epochs": 3,
    "batch_size": 32, "freeze_depth": 0, "lr": 0.01, "lr_scale": 0.1, "data": DEMO_DATA,
    "cache_dir": None, "device": "cpu",
}
GPU_TRIAL: dict[str, Any] = {
    "backbone": "resnet50", "weights": "none", "resolution": 224, "epochs": 3,
    "batch_size": 128, "freeze_depth": 0, "lr": 0.1, "lr_scale": 1.0,
    "data": {"source": "fake", "fake_size": 4096, "val_fraction": 0.1},
    "cache_dir": None, "device": "cuda",
}
_SMOKE = {"backbone": "resnet18", "weights": "none", "resolution": 32, "epochs": 2,
          "max_steps_per_epoch": 1, "eval_batch_size": 512,
          "data": {"source": "digits", "samples_per_class": 4, "val_fraction": 0.05}}


def _bare(trial: dict[str, Any]) -> list[float]:
    from trainables.finetune import run_trial

    reports: list[dict[str, Any]] = []
    with single_thread():
        run_trial(trial, report=lambda m, s: reports.append(m))
    return [r["samples_per_s"] for r in reports[1:]]


def _tuned(trial: dict[str, Any], storage: Path, name: str, *, gpu: float) -> pd.DataFrame:
    from search.tuner import build_tuner

    train = {k: v for k, v in trial.items() if k not in ("data", "lr")}
    cfg = experiment(storage, name, data=trial["data"], train=train,
                     space={"lr": {"type": "choice", "values": [trial["lr"]]}},
                     resources={"cpu": 1 if gpu == 0 else 4, "gpu": gpu})
    results = build_tuner(cfg).fit()
    if results.errors:
        raise RuntimeError(f"tuned trial failed: {results.errors[0]}")
    return pd.read_parquet(storage / name / "epochs.parquet")


def measure(trial: dict[str, Any], *, reps: int, gpu: float = 0.0) -> dict[str, Any]:
    """Bare and tuned throughput of ``trial``, ``reps`` times each, interleaved."""
    local_ray()
    bare: list[float] = []
    tuned: list[float] = []
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            bare += _bare(trial)
            epochs = _tuned(trial, Path(tmp), f"overhead{rep}", gpu=gpu)
            tuned += epochs.loc[epochs.epoch > 1, "samples_per_s"].tolist()
            peaks = {"peak_rss_mb": float(epochs.peak_rss_mb.max()),
                     "peak_gpu_mb": float(epochs.peak_gpu_mb.max())}
    return {"bare": bare, "tuned": tuned, "ratio": median(tuned) / median(bare), **peaks}


def gpu_part(gpu: dict[str, Any], trial: dict[str, Any], device_name: str
             ) -> tuple[Figure, list[str]]:
    """The GPU figure and its lines in the section, from :func:`measure` on the GPU trial."""
    figure = Figure.check(f"GPU ({device_name}): tuned / bare training images/s",
                          gpu["ratio"], goal=GOAL, at_least=True)
    lines = [f"GPU trial ({device_name}, `gpu: 1`, 4 CPUs): `{_describe(trial)}`: bare "
             f"{_list(gpu['bare'])} (median {median(gpu['bare']):.1f}), tuned "
             f"{_list(gpu['tuned'])} (median {median(gpu['tuned']):.1f}) images/s; the tuned "
             f"trial's `peak_gpu_mb` {gpu['peak_gpu_mb']:.0f} MB."]
    return figure, lines


def measure_gpu(*, smoke: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`measure` of the GPU trial (CUDA must be visible): (result, trial)."""
    gpu_trial = {**GPU_TRIAL, **_SMOKE, "device": "cuda"} if smoke else GPU_TRIAL
    # Without CUDA (a smoke run of the code path) Ray has no GPU to give: ask for none.
    gpu = 1.0 if torch.cuda.is_available() else 0.0
    return measure(gpu_trial, reps=1 if smoke else 2, gpu=gpu), gpu_trial


def run(*, smoke: bool = False, cpu_part: bool = True) -> Section:
    """Runs the benchmark; the GPU half only where CUDA is visible.

    ``cpu_part=False`` (``--gpu-only``) measures the GPU half alone, for a GPU machine whose
    CPU figure is not wanted (``make bench-gpu``).
    """
    section = Section("trial_overhead", "1. Trial overhead (tuned / bare epoch throughput)",
                      ref="1")
    trial = {**CPU_TRIAL, **_SMOKE} if smoke else CPU_TRIAL
    lines = [__doc__.split("\n\n", 1)[1].strip(), ""]
    seconds = 0.0
    if cpu_part:
        load_before = load_average()
        cpu, seconds = timed(lambda: measure(trial, reps=1 if smoke else 2))
        section.figures.append(Figure.check("CPU: tuned / bare training images/s",
                                            cpu["ratio"], goal=GOAL, at_least=True))
        section.figures.append(Figure(
            "7: epochs.parquet `peak_rss_mb` / `peak_gpu_mb` of the tuned trial",
            f"{cpu['peak_rss_mb']:.0f} MB / {cpu['peak_gpu_mb']:.0f} MB", "reported per trial",
            PASS if cpu["peak_rss_mb"] > 0 else MISS))
        lines += [
            f"CPU trial: `{_describe(trial)}`; load average before: {load_before}, "
            f"after: {load_average()}.",
            "",
            "| run | training images/s per epoch (epochs 2..) | median |",
            "|---|---|---|",
            f"| bare `run_trial` | {_list(cpu['bare'])} | {median(cpu['bare']):.1f} |",
            f"| ftsearch trial on Ray | {_list(cpu['tuned'])} | {median(cpu['tuned']):.1f} |",
            "",
            f"The tuned trial's epochs.parquet rows carry `peak_rss_mb` "
            f"(max {cpu['peak_rss_mb']:.0f} MB) and `peak_gpu_mb` ({cpu['peak_gpu_mb']:.0f} on "
            f"CPU).",
        ]
    if torch.cuda.is_available():
        (gpu, gpu_trial), gpu_seconds = timed(lambda: measure_gpu(smoke=smoke))
        seconds += gpu_seconds
        figure, gpu_lines = gpu_part(gpu, gpu_trial, torch.cuda.get_device_name(0))
        section.figures.append(figure)
        lines += ["", *gpu_lines]
    else:
        section.figures.append(Figure("GPU: tuned / bare training images/s", "not measured",
                                      f"≥ {GOAL}", OPEN))
        lines += ["", "GPU: open: no CUDA device on this machine. The GPU mode "
                      f"(`{_describe(GPU_TRIAL)}`, `gpu: 1`) runs wherever one is visible "
                      "(`make bench-gpu`)."]
    section.body = "\n".join(lines)
    section.seconds = seconds
    return section


def _describe(trial: dict[str, Any]) -> str:
    keys = ("backbone", "weights", "resolution", "batch_size", "freeze_depth", "epochs",
            "max_steps_per_epoch")
    parts = [f"{k}={trial[k]}" for k in keys if trial.get(k) is not None]
    data = trial["data"]
    return ", ".join(parts + [f"data={data['source']}"])


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--gpu-only", action="store_true",
                        help="the GPU half alone (needs CUDA)")
    args = parser.parse_args()
    section = run(smoke=args.smoke, cpu_part=not args.gpu_only)
    print(section.body)
    for figure in section.figures:
        print(figure)


if __name__ == "__main__":
    main()
