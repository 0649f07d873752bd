"""Goal 4, frozen-stage cache: epoch time with and without it, at two freeze depths.

The demo task (configs/demo.yaml's data: digits, 64 px) with the demo's pretrained
backbone, efficientnet_lite0: ``run_trial`` uncached, then the cache file built (from the
trial's own model and data, timed apart), then ``run_trial`` cached (``cache_dir`` set; it
must reuse that file), at feature-extraction depth (all 9 stages frozen) and at half depth
(4 of 9, as ``freeze_fraction: 0.5`` rounds). Epoch time is the trial's own ``seconds``
(training plus validation), median over epochs 2... Both paths must report the same metrics.

The ceiling of any cache is the share of a training step the frozen stages take: a frozen
stage runs forward only, a trained one forward and backward. It is measured directly (one
thread, a batch of 32 at 64 px, frozen part vs the whole step) for three backbones.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    DEMO_DATA,
    DEMO_RESOLUTION,
    Figure,
    Section,
    load_average,
    median,
    single_thread,
)

__all__ = ["GPU_TRIAL", "TRIAL", "build_cache", "ceiling", "gpu_part", "measure", "measure_gpu",
           "run"]

GOAL_FULL, GOAL_HALF = 5.0, 2.0
TRIAL: dict[str, Any] = {
    "backbone": "efficientnet_lite0", "weights": "packaged",
    "resolution": DEMO_RESOLUTION, "epochs": 3,
    "batch_size": 32, "lr": 0.05, "lr_scale": 0.1, "data": DEMO_DATA, "device": "cpu",
}
# The same pretrained backbone (frozen stages need pretrained weights), at toy sizes.
_SMOKE = {"resolution": 32, "epochs": 2, "max_steps_per_epoch": 1,
          "data": {"source": "digits", "samples_per_class": 4, "val_fraction": 0.05}}


def _reports(config: dict[str, Any]) -> list[dict[str, Any]]:
    from trainables.finetune import run_trial

    reports: list[dict[str, Any]] = []
    with single_thread():
        run_trial(config, report=lambda m, s: reports.append(m))
    return reports


def build_cache(config: dict[str, Any], cache_dir: str) -> tuple[float, int]:
    """Builds the cache file exactly as ``run_trial`` would: (seconds, training images)."""
    import json

    from trainables.cache import frozen_features
    from trainables.data import load_data
    from trainables.finetune import build_model, resolve_trial_config
    from trainables.optim import freeze_stages
    from trainables.runtime import pick_device, place_model

    cfg = resolve_trial_config(config)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    data = load_data(cfg.data, seed=cfg.seed)
    model = build_model(cfg, num_classes=data.num_classes)
    freeze_stages(model, cfg.freeze_depth)
    place_model(model, device, channels_last=cfg.channels_last)  # as run_trial does
    train, val = data.train, data.val
    if device.type == "cuda":  # as run_trial: the images on the GPU
        train, val = train.to(device), val.to(device)
    with single_thread():
        t0 = time.perf_counter()
        frozen_features(model, depth=cfg.freeze_depth, train=train, val=val,
                        resolution=cfg.input_resolution(),
                        data_key=json.dumps(cfg.data, sort_keys=True), cache_dir=cache_dir,
                        device=device, amp=cfg.amp, channels_last=cfg.channels_last,
                        batch_size=cfg.eval_batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, len(data.train)


def measure(trial: dict[str, Any], depth: int, *, noise: bool = False) -> dict[str, Any]:
    """Uncached and cached epoch times of ``trial`` at freeze ``depth``, and the build time.

    ``noise``: run the uncached trial twice and report how far its two runs' metrics differ
    (``noise_top1``, ``noise_loss``): on a GPU, cuDNN's non-deterministic kernels make two
    identical runs differ, the floor against which cached-vs-uncached is judged.
    """
    config = {**trial, "freeze_depth": depth}
    extra: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        plain = _reports(config)
        if noise:
            again = _reports(config)
            pairs = list(zip(plain, again, strict=True))
            extra = {"noise_top1": max(abs(a["top1"] - b["top1"]) for a, b in pairs),
                     "noise_loss": max(abs(a["val_loss"] - b["val_loss"]) for a, b in pairs)}
        build_s, n_train = build_cache(config, cache_dir)
        files = {p: p.stat().st_mtime_ns for p in Path(cache_dir).glob("*.pt")}
        cached = _reports({**config, "cache_dir": cache_dir})
        if {p: p.stat().st_mtime_ns for p in Path(cache_dir).glob("*.pt")} != files:
            raise RuntimeError("the trial did not reuse the cache file built for it")
    later = slice(1, None) if len(plain) > 1 else slice(None)
    plain_s = median([r["seconds"] for r in plain[later]])
    cached_s = median([r["seconds"] for r in cached[later]])
    # Images trained per epoch (the last partial batch is dropped), to split off validation.
    batch = config["batch_size"]
    seen = n_train // batch * batch if n_train > batch else n_train
    if config.get("max_steps_per_epoch"):
        seen = min(seen, config["max_steps_per_epoch"] * batch)
    plain_train = median([seen / r["samples_per_s"] for r in plain[later]])
    cached_train = median([seen / r["samples_per_s"] for r in cached[later]])
    pairs = list(zip(plain, cached, strict=True))
    return {
        "depth": depth,
        "plain_s": plain_s,
        "cached_s": cached_s,
        "speedup": plain_s / cached_s,
        "train_speedup": plain_train / cached_train,
        "val_speedup": (plain_s - plain_train) / max(cached_s - cached_train, 1e-9),
        "build_s": build_s,
        "max_top1_diff": max(abs(a["top1"] - b["top1"]) for a, b in pairs),
        "max_loss_diff": max(abs(a["val_loss"] - b["val_loss"]) for a, b in pairs),
        "top1": [a["top1"] for a in plain],
        "top1_cached": [b["top1"] for b in cached],
        **extra,
    }


def ceiling(backbone: str, depth: int, *, resolution: int = 64, batch: int = 32,
            reps: int = 3) -> float:
    """Best possible cache speed-up of a training step: whole step / step minus frozen part."""
    from trainables.models import build_backbone
    from trainables.optim import freeze_stages, set_train_mode

    torch.manual_seed(0)
    model = build_backbone(backbone, num_classes=10, weights="none")
    freeze_stages(model, depth)
    set_train_mode(model, depth)
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    with torch.no_grad():
        features = model.forward_stages(x, 0, depth)

    def step(cached: bool) -> float:
        t0 = time.perf_counter()
        out = (model.forward_head(model.forward_stages(features, depth)) if cached
               else model(x))
        F.cross_entropy(out, y).backward()
        return time.perf_counter() - t0

    with single_thread():
        step(False)  # warm-up
        whole = min(step(False) for _ in range(reps))
        tail = min(step(True) for _ in range(reps))
    return whole / tail


def run(*, smoke: bool = False, cpu_part: bool = True) -> Section:
    """Runs the benchmark; its GPU half too where CUDA is visible (not in smoke mode).

    ``cpu_part=False`` (``--gpu-only``) measures the GPU half alone (``make bench-gpu``).
    """
    section = Section("frozen_cache", "4. Frozen-stage cache", ref="4")
    t0 = time.perf_counter()
    lines: list[str] = []
    if cpu_part:
        figures, lines = _cpu_part(smoke)
        section.figures += figures
    if torch.cuda.is_available() and (not smoke or not cpu_part):
        full, half = measure_gpu(smoke=smoke)
        figures, gpu_lines = gpu_part(full, half, torch.cuda.get_device_name(0))
        section.figures += figures
        lines += ["", *gpu_lines]
    section.body = "\n".join(lines)
    section.seconds = time.perf_counter() - t0
    return section


GPU_TRIAL: dict[str, Any] = {**TRIAL, "epochs": 6, "device": "cuda", "amp": True,
                             "channels_last": True}
# Cached and uncached metrics on a GPU: bf16 autocast and cuDNN's non-deterministic
# kernels make two identical runs differ; the bar is the one bf16 itself is held to.
GPU_METRIC_TOLERANCE = 1.0


def measure_gpu(*, smoke: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`measure` on the GPU (bf16, channels_last) at both depths, with the noise floor."""
    trial = {**GPU_TRIAL, **_SMOKE} if smoke else GPU_TRIAL
    n = 9
    return measure(trial, n, noise=True), measure(trial, round(0.5 * n), noise=True)


def gpu_part(full: dict[str, Any], half: dict[str, Any], device_name: str
             ) -> tuple[list[Figure], list[str]]:
    """The GPU figures and their lines, from :func:`measure_gpu`."""
    n = 9
    worst = max(full["max_top1_diff"], half["max_top1_diff"])
    noise = max(full["noise_top1"], half["noise_top1"])
    figures = [
        Figure.check(f"GPU: epoch time uncached / cached, feature extraction "
                     f"(depth {full['depth']})", full["speedup"], goal=GOAL_FULL,
                     at_least=True, fmt="{:.1f}", unit="×"),
        Figure.check(f"GPU: epoch time uncached / cached, half depth ({half['depth']} of {n})",
                     half["speedup"], goal=GOAL_HALF, at_least=True, fmt="{:.2f}", unit="×"),
        Figure.check("GPU, bf16: cached vs uncached max |Δ top-1| (points; two uncached runs: "
                     f"{noise:.2g})", worst, goal=GPU_METRIC_TOLERANCE, at_least=False,
                     fmt="{:.2g}"),
    ]
    rows = [f"| {r['depth']} | {r['plain_s']:.3f} | {r['cached_s']:.4f} | {r['speedup']:.2f}× | "
            f"{r['train_speedup']:.2f}× / {r['val_speedup']:.2f}× | {r['build_s']:.2f} | "
            f"{r['max_top1_diff']:.2g} / {r['max_loss_diff']:.2g} | "
            f"{r['noise_top1']:.2g} / {r['noise_loss']:.2g} |" for r in (full, half)]
    trial = GPU_TRIAL
    lines = [
        f"GPU ({device_name}): the same trial with `device: cuda`, bf16 autocast and "
        f"channels_last, {trial['epochs']} epochs, the images resident on the GPU; the cache "
        f"built on the GPU with the trial's numerics. The uncached trial runs twice, to measure "
        f"how far two identical runs differ there (cuDNN may pick non-deterministic kernels): "
        f"the floor for cached vs uncached.",
        "",
        "| freeze depth | epoch s, uncached | epoch s, cached | speed-up | training / "
        "validation speed-up | build s | max Δ top-1 / Δ val_loss, cached vs uncached | "
        "the same, uncached vs uncached |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Top-1 % per epoch, uncached / cached: "
        + "; ".join(f"depth {r['depth']}: " + " ".join(f"{v:.1f}" for v in r["top1"]) + " / "
                    + " ".join(f"{v:.1f}" for v in r["top1_cached"]) for r in (full, half))
        + ".",
    ]
    if half["speedup"] < GOAL_HALF:
        lines += ["", f"Half depth on the GPU: {half['plain_s']:.3f} s per epoch uncached, "
                  f"{half['cached_s']:.3f} s cached ({half['speedup']:.2f}×; training "
                  f"{half['train_speedup']:.2f}×, validation {half['val_speedup']:.2f}×): the "
                  f"frozen stages' forward pass is not what an epoch of this small trial "
                  f"(batch {trial['batch_size']} at {trial['resolution']} px) waits on on "
                  f"this GPU. At depth 9, where the cached epoch runs no stage at all, an epoch "
                  f"takes {full['plain_s']:.3f} s uncached and {full['cached_s']:.3f} s cached."]
    if worst > GPU_METRIC_TOLERANCE:
        lines += ["", f"Cached and uncached metrics differ by up to {worst:.2g} points of top-1 "
                  f"where two uncached runs differ by {noise:.2g}: the difference is the "
                  f"cache's, not the GPU's run-to-run noise."]
    return figures, lines


def _cpu_part(smoke: bool) -> tuple[list[Figure], list[str]]:
    trial = {**TRIAL, **_SMOKE} if smoke else TRIAL
    n = 9  # efficientnet_lite0's stages
    load_before = load_average()
    full = measure(trial, n)
    half = measure(trial, round(0.5 * n))
    bounds = {(b, d): ceiling(b, d, resolution=32 if smoke else 64, reps=1 if smoke else 3)
              for b, d in ([("resnet18", 2)] if smoke else
                           [("efficientnet_lite0", 4), ("resnet18", 2), ("resnet50", 2)])}
    figures = [
        Figure.check(f"epoch time uncached / cached, feature extraction (depth {full['depth']})",
                     full["speedup"], goal=GOAL_FULL, at_least=True, fmt="{:.1f}", unit="×"),
        Figure.check(f"epoch time uncached / cached, half depth ({half['depth']} of {n})",
                     half["speedup"], goal=GOAL_HALF, at_least=True, fmt="{:.2f}", unit="×"),
        Figure(f"cache build time (depth {full['depth']} / {half['depth']})",
               f"{full['build_s']:.1f} s / {half['build_s']:.1f} s"),
        Figure("cached vs uncached metrics: max |Δ top-1|, max |Δ val_loss|",
               f"{max(full['max_top1_diff'], half['max_top1_diff']):.2g} points, "
               f"{max(full['max_loss_diff'], half['max_loss_diff']):.2g}", "≤ 1e-4",
               "PASS" if max(full["max_top1_diff"], half["max_top1_diff"],
                             full["max_loss_diff"], half["max_loss_diff"]) <= 1e-4 else "MISS"),
    ]
    rows = [f"| {r['depth']} | {r['plain_s']:.2f} | {r['cached_s']:.3f} | {r['speedup']:.2f}× | "
            f"{r['train_speedup']:.2f}× / {r['val_speedup']:.2f}× | {r['build_s']:.1f} | "
            f"{r['max_top1_diff']:.2g} / {r['max_loss_diff']:.2g} |" for r in (full, half)]
    bound_rows = [f"| {b} | {d} | {v:.2f}× |" for (b, d), v in bounds.items()]
    lines = "\n".join([
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"Trial: {trial['backbone']} ({trial['weights']} weights), {trial['resolution']} px, "
        f"{trial['epochs']} epochs, batch {trial['batch_size']}; load average before: "
        f"{load_before}, after: {load_average()}.",
        "",
        "| freeze depth | epoch s, uncached | epoch s, cached | speed-up | training / "
        "validation speed-up | build s | max Δ top-1 / Δ val_loss |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Ceiling at half depth (training step, whole / without the frozen stages):",
        "",
        "| backbone | depth | ceiling |",
        "|---|---|---|",
        *bound_rows,
        "",
        _verdict(half, bounds),
    ]).split("\n")
    return figures, lines


def _verdict(half: dict[str, Any], bounds: dict[tuple[str, int], float]) -> str:
    if half["speedup"] >= GOAL_HALF:
        return "Feature extraction is where the cache pays most: only the head is left to run."
    share = 1 - half["cached_s"] / half["plain_s"]
    step_shares = [1 - 1 / b for b in bounds.values()]
    return (
        f"Half depth misses 2× although the cache removes the frozen stages entirely: the "
        f"cached epoch runs only the trained stages and the head, so the speed-up is bounded "
        f"by the frozen stages' share of an uncached epoch, and 2× needs that share ≥ 50 %. "
        f"Here it is {share:.0%}: training steps got {half['train_speedup']:.2f}× faster, "
        f"validation (forward only) {half['val_speedup']:.2f}×. Within a training step the "
        f"frozen half is only {min(step_shares):.0%}-{max(step_shares):.0%} of the time "
        f"(ceilings above): a trained stage runs forward and backward, about three times the "
        f"work of a frozen one, and the first half of these CNNs' stages takes only a quarter "
        f"to a third of the forward pass. Tried: lite0, ResNet-18 and ResNet-50 (ceilings above, "
        f"all far from 2×). Feature extraction is where the cache pays: only the head is "
        f"left to run.")


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
