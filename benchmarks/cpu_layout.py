"""channels_last on CPU: the memory layout every trial now uses, against NCHW.

A trial's ``channels_last`` (default true) used to apply on CUDA only. On CPU, PyTorch's
oneDNN convolutions have NHWC kernels too, and for depthwise convolutions (every
EfficientNet block) they are much faster. Two measurements, one thread as a ``cpu: 1``
trial runs, the two layouts interleaved so load from other processes hits both alike:

- a demo trial, :func:`trainables.finetune.run_trial` with the demo's settings and its
  first point (Lite0's packaged weights, 3 stages frozen, lr 0.05, lr_scale 0.1): median
  training throughput over epochs 2.. (``samples_per_s``), and the last epoch's top-1, on
  two seeds (the layout changes the kernels' summation order, not the maths: the top-1s
  should differ no more than the seeds' do);
- one SGD step (forward, backward, update) of a batch of 32 at the demo's resolution for
  each backbone family, the median of several steps after two warm-up steps, and the
  frozen-stage pass the cache and ``ftsearch rank`` make (eval mode, the demo's training
  and validation images).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    DEMO_DATA,
    DEMO_RESOLUTION,
    DEMO_TRAIN,
    Figure,
    Section,
    fmt_spread,
    load_average,
    median,
    single_thread,
)

__all__ = ["run"]

# Never slower: a layout that lost more than this on some backbone would need to be chosen
# per backbone instead of on every device.
GOAL_RATIO = 1.05
_BACKBONES = ("efficientnet_lite0", "efficientnet_b0", "resnet18", "resnet50", "vgg11_bn")
# Smoke mode: every code path, at toy sizes.
_SMOKE_BACKBONES = ("resnet18",)
_SMOKE_DATA = {**DEMO_DATA, "samples_per_class": 4, "val_fraction": 0.05}
_SMOKE_RESOLUTION = 32


def _step_seconds(backbone: str, *, channels_last: bool, resolution: int, steps: int
                  ) -> float:
    from trainables.models import build_backbone
    from trainables.runtime import place_model

    torch.manual_seed(0)
    model = place_model(build_backbone(backbone, num_classes=10, weights="none"),
                        torch.device("cpu"), channels_last=channels_last)
    x = torch.randn(32, 3, resolution, resolution)
    y = torch.randint(0, 10, (32,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return median(times)


def _frozen_pass_seconds(*, channels_last: bool, smoke: bool) -> float:
    from trainables.cache import _Compute
    from trainables.data import load_data
    from trainables.models import build_backbone
    from trainables.runtime import place_model

    data = load_data(_SMOKE_DATA if smoke else DEMO_DATA, seed=0)
    model = place_model(build_backbone("efficientnet_lite0", num_classes=10,
                                       weights="packaged"),
                        torch.device("cpu"), channels_last=channels_last)
    compute = _Compute(model=model, depth=len(model.stages),
                       resolution=_SMOKE_RESOLUTION if smoke else DEMO_RESOLUTION,
                       device=torch.device("cpu"), amp=False, channels_last=channels_last,
                       pool=True)
    depths = list(range(1, len(model.stages) + 1))
    t0 = time.perf_counter()
    for images in (data.train, data.val):
        compute.all_depths(images, 256, depths)
    return time.perf_counter() - t0


# The demo's first point of search.points_to_evaluate (configs/demo.yaml).
_TRIAL: dict[str, Any] = {
    **DEMO_TRAIN, "backbone": "efficientnet_lite0", "weights": "packaged",
    "resolution": DEMO_RESOLUTION, "data": DEMO_DATA, "freeze_depth": 3, "lr": 0.05,
    "lr_scale": 0.1, "cache_dir": None, "device": "cpu"}


def _trial(channels_last: bool, seed: int, smoke: bool) -> tuple[float, float]:
    from trainables.finetune import run_trial

    trial: dict[str, Any] = {**_TRIAL, "channels_last": channels_last, "seed": seed}
    if smoke:
        trial.update(epochs=2, max_steps_per_epoch=1, data=_SMOKE_DATA,
                     resolution=_SMOKE_RESOLUTION)
    reports: list[dict[str, Any]] = []
    run_trial(trial, report=lambda m, s: reports.append(m))
    return median([r["samples_per_s"] for r in reports[1:]]), reports[-1]["top1"]


def _interleaved(measure: Callable[[bool, int], Any], reps: int
                 ) -> tuple[list[Any], list[Any]]:
    """``measure(channels_last, rep)`` for each rep, NCHW then channels_last."""
    nchw, nhwc = [], []
    for rep in range(reps):
        nchw.append(measure(False, rep))
        nhwc.append(measure(True, rep))
    return nchw, nhwc


def run(*, smoke: bool = False) -> Section:
    section = Section("cpu_layout", "channels_last on CPU", ref="layout")
    before = load_average()
    lines = []
    with single_thread():
        trials_nchw, trials_nhwc = _interleaved(lambda cl, seed: _trial(cl, seed, smoke),
                                                 1 if smoke else 2)
        speed = median([s for s, _ in trials_nhwc]) / median([s for s, _ in trials_nchw])
        section.figures.append(Figure(
            "demo's first Lite0 trial: training samples/s, channels_last / NCHW", f"{speed:.2f}x"))
        section.figures.append(Figure(
            "demo's first Lite0 trial: last-epoch top-1 over 2 seeds, NCHW / channels_last",
            f"{fmt_spread([t for _, t in trials_nchw])} % / "
            f"{fmt_spread([t for _, t in trials_nhwc])} %"))
        frozen = _interleaved(lambda cl, _: _frozen_pass_seconds(channels_last=cl, smoke=smoke),
                              1 if smoke else 3)
        section.figures.append(Figure(
            "frozen-stage pass of Lite0 (rank, the cache), demo's images: s, NCHW / "
            "channels_last", f"{median(frozen[0]):.2f} s / {median(frozen[1]):.2f} s"))
        ratios = {}
        for backbone in _SMOKE_BACKBONES if smoke else _BACKBONES:
            steps = _interleaved(
                lambda cl, _, b=backbone: _step_seconds(
                    b, channels_last=cl,
                    resolution=_SMOKE_RESOLUTION if smoke else DEMO_RESOLUTION,
                    steps=1 if smoke else 5), 1 if smoke else 2)
            ratios[backbone] = median(steps[1]) / median(steps[0])
            lines.append(f"| {backbone} | {median(steps[0]) * 1000:.0f} ms | "
                         f"{median(steps[1]) * 1000:.0f} ms | {ratios[backbone]:.2f} |")
    worst = max(ratios, key=ratios.__getitem__)
    section.figures.append(Figure.check(
        f"SGD step, channels_last / NCHW time, worst backbone ({worst})", ratios[worst],
        goal=GOAL_RATIO, at_least=False, fmt="{:.2f}"))
    section.body = "\n".join([
        __doc__.split("\n\n", 1)[1].strip(), "",
        f"One SGD step of 32 images at {_SMOKE_RESOLUTION if smoke else DEMO_RESOLUTION} px, "
        f"one thread "
        f"(median):", "",
        "| backbone | NCHW | channels_last | ratio |", "|---|---|---|---|", *lines, "",
        f"Load average before: {before}, after: {load_average()}.",
    ])
    return section


if __name__ == "__main__":
    from benchmarks.common import run_as_script

    run_as_script(run, doc=__doc__)
