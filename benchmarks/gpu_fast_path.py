"""Goal 6, GPU fast path: a trial against a bare optimized loop, and fractional GPU packing.

Trial: ``run_trial`` on the GPU with its fast path on (bf16 autocast, channels_last, the
dataset resident on the GPU, resizing there; optionally ``torch.compile``), on ``fake`` data
upsampled to 224 px; training images/s is its ``samples_per_s`` (median over epochs 2..).
Bare: the practical limit on the same GPU: the same network, synthetic batches already on the
GPU, bf16 autocast, channels_last, SGD, nothing else. Goal: trial / bare ≥ 0.9 for resnet50
and efficientnet_b0.

Packing: four small trials sharing a GPU (``resources.gpu: 0.25``) against one trial holding
it (``gpu: 1``), both through ``search.tuner.build_tuner``; aggregate images/s is the sum of
the concurrent trials' median throughput. Goal: ≥ 2.5×.

Without CUDA nothing is measured and the figures stay open; ``--smoke`` still runs every
code path on the CPU at toy sizes so it keeps working.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from benchmarks.common import (
    OPEN,
    Figure,
    Section,
    experiment,
    load_average,
    local_ray,
    median,
    run_as_script,
)

__all__ = ["bare_loop", "packing", "run", "trial_throughput"]

GOAL_RATIO, GOAL_PACKING = 0.9, 2.5
BACKBONES = ("resnet50", "efficientnet_b0")
FAKE = {"source": "fake", "fake_size": 4096, "fake_classes": 10, "val_fraction": 0.05}
SMALL_TRIAL: dict[str, Any] = {
    "backbone": "resnet18", "weights": "none", "resolution": 64, "batch_size": 64,
    "epochs": 6, "lr": 0.1, "lr_scale": 1.0, "cache_dir": None,
}


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(backbone: str, *, resolution: int = 224, batch: int = 128, steps: int = 50,
              device: str = "cuda", compile: bool = False, warmup: int = 10) -> float:
    """Training images/s of a bare bf16 + channels_last loop on synthetic GPU batches."""
    from trainables.models import build_backbone

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_backbone(backbone, num_classes=FAKE["fake_classes"], weights="none").to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, resolution, resolution, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, FAKE["fake_classes"], (batch,), device=dev)

    def step() -> None:
        with _autocast(dev):
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return batch * steps / (time.perf_counter() - t0)


def trial_throughput(backbone: str, *, resolution: int = 224, batch: int = 128,
                     epochs: int = 3, device: str = "cuda", compile: bool = False,
                     data: dict[str, Any] | None = None,
                     max_steps_per_epoch: int | None = None) -> float:
    """Training images/s of ``run_trial`` with the fast path on (median of epochs 2..)."""
    from trainables.finetune import run_trial

    reports: list[dict[str, Any]] = []
    run_trial({"backbone": backbone, "weights": "none", "resolution": resolution,
               "batch_size": batch, "epochs": epochs, "lr": 0.1, "lr_scale": 1.0,
               "data": data or FAKE, "device": device, "amp": True, "channels_last": True,
               "compile": compile, "max_steps_per_epoch": max_steps_per_epoch},
              report=lambda m, s: reports.append(m))
    return median([r["samples_per_s"] for r in reports[1:] or reports])


def packing(*, per_gpu: int, gpu: float, trial: dict[str, Any], data: dict[str, Any],
            cpu: int = 2) -> float:
    """Aggregate training images/s of ``per_gpu`` concurrent trials of ``gpu`` each."""
    from search.tuner import build_tuner

    local_ray()
    with tempfile.TemporaryDirectory() as tmp:
        train = {k: v for k, v in trial.items() if k != "lr"}
        cfg = experiment(Path(tmp), "packing", data=data, train=train,
                         space={"lr": {"type": "choice", "values": [trial["lr"]]}},
                         search={"algorithm": "random", "num_samples": per_gpu,
                                 "max_concurrent": per_gpu},
                         resources={"cpu": cpu, "gpu": gpu})
        results = build_tuner(cfg).fit()
        if results.errors:
            raise RuntimeError(f"a packing trial failed: {results.errors[0]}")
        epochs = pd.read_parquet(Path(tmp) / "packing" / "epochs.parquet")
    # Skip the first epochs: trials start a little apart, so they overlap from then on.
    steady = epochs[epochs.epoch > min(2, int(epochs.epoch.max()) - 1)]
    return float(steady.groupby("trial_id").samples_per_s.median().sum())


def run(*, smoke: bool = False) -> Section:
    """Runs the benchmark where CUDA is visible (or, with ``smoke``, its code paths on CPU)."""
    section = Section("gpu_fast_path", "6. GPU fast path", ref="6")
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    lines = [__doc__.split("\n\n", 1)[1].strip(), ""]
    if not cuda and not smoke:
        for backbone in BACKBONES:
            section.figures.append(Figure(f"{backbone} at 224 px: trial / bare images/s",
                                          "not measured", f"≥ {GOAL_RATIO}", OPEN))
        section.figures.append(Figure("4 trials per GPU (gpu 0.25) / 1 per GPU, aggregate "
                                      "images/s", "not measured", f"≥ {GOAL_PACKING}", OPEN))
        lines.append("**Open: no GPU on this machine.** The code paths are implemented and "
                     "run on the CPU at toy sizes in CI (`--smoke`); run `make bench` on a "
                     "CUDA machine to measure these figures.")
        section.body = "\n".join(lines)
        section.seconds = time.perf_counter() - t0
        return section

    device = "cuda" if cuda else "cpu"
    sizes: dict[str, Any] = (
        {"resolution": 32, "batch": 8, "epochs": 2, "max_steps_per_epoch": 2,
         "data": {"source": "digits", "samples_per_class": 4, "val_fraction": 0.05}}
        if smoke else {"resolution": 224, "batch": 128, "epochs": 3})
    rows = []
    for backbone in (("resnet18",) if smoke else BACKBONES):
        for compile_ in ((False,) if smoke else (False, True)):
            bare = bare_loop(backbone, resolution=sizes["resolution"], batch=sizes["batch"],
                             steps=2 if smoke else 50, warmup=1 if smoke else 10,
                             device=device, compile=compile_)
            trial = trial_throughput(backbone, device=device, compile=compile_, **sizes)
            rows.append(f"| {backbone} | {compile_} | {trial:.0f} | {bare:.0f} | "
                        f"{trial / bare:.2f} |")
            name = f"{backbone} at {sizes['resolution']} px{' compiled' if compile_ else ''}"
            section.figures.append(
                Figure.check(f"{name}: trial / bare images/s", trial / bare, goal=GOAL_RATIO,
                             at_least=True, fmt="{:.2f}") if cuda else
                Figure(f"{name}: trial / bare images/s (smoke, CPU)", f"{trial / bare:.2f}",
                       f"≥ {GOAL_RATIO}", OPEN))
    small = ({**SMALL_TRIAL, "resolution": 32, "epochs": 2, "max_steps_per_epoch": 1}
             if smoke else SMALL_TRIAL)
    data = sizes.get("data") or {**FAKE, "fake_size": 8192}
    packed = packing(per_gpu=2 if smoke else 4, gpu=0.25 if cuda else 0.0, trial=small,
                     data=data, cpu=1 if smoke else 2)
    # On a CPU (smoke) the single trial would run the same code again, for no figure.
    alone = packing(per_gpu=1, gpu=1.0 if cuda else 0.0, trial=small, data=data,
                    cpu=1 if smoke else 2) if cuda else None
    name = (f"{2 if smoke else 4} trials per GPU (gpu 0.25) / 1 per GPU, aggregate "
            "images/s")
    section.figures.append(
        Figure.check(name, packed / alone, goal=GOAL_PACKING, at_least=True, fmt="{:.2f}",
                     unit="×") if alone is not None else
        Figure(name + " (smoke, CPU)", "not measured", f"≥ {GOAL_PACKING}", OPEN))
    lines += [
        f"Device: {torch.cuda.get_device_name(0) if cuda else 'CPU (smoke)'}; load average "
        f"{load_average()}.",
        "",
        "| backbone | compile | trial images/s | bare images/s | ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Packing ({small['backbone']} at {small['resolution']} px, batch "
        f"{small['batch_size']}): packed {packed:.0f} images/s"
        + (f" vs alone {alone:.0f}." if alone is not None else " (alone: not run on a CPU)."),
    ]
    section.body = "\n".join(lines)
    section.seconds = time.perf_counter() - t0
    return section


def main() -> None:
    run_as_script(run, doc=__doc__)


if __name__ == "__main__":
    main()
