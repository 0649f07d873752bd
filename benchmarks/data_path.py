"""Goal 5, data path: data time against step time on digits at 64 px.

Digits are decoded once into a uint8 tensor (``InMemoryImageSet``) and batched by indexing,
without DataLoader workers; resizing (8 → 64 px), normalisation and augmentation happen on
the trial's device (``preprocess``). Measured with the trial loop's own pieces, one thread:
per step, *data* is fetching the batch and preprocessing it, *compute* the forward pass, the
loss, backward and the optimizer step; data share = data / (data + compute), over 30 steps
after 3 warm-up steps, for the demo's backbone at several freeze depths.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    DEMO_DATA,
    DEMO_RESOLUTION,
    Figure,
    Section,
    load_average,
    run_as_script,
    single_thread,
)

__all__ = ["measure", "run"]

GOAL = 0.05
BASE: dict[str, Any] = {
    "backbone": "efficientnet_lite0", "weights": "packaged",
    "resolution": DEMO_RESOLUTION,
    "batch_size": 32, "lr": 0.05, "lr_scale": 0.1, "data": DEMO_DATA,
}
CASES: list[dict[str, Any]] = [
    {"freeze_depth": 0},
    {"freeze_depth": 3},
    {"freeze_depth": 9},
    {"freeze_depth": 0, "augment": True},
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trial: dict[str, Any], *, steps: int = 30, warmup: int = 3,
            device: str = "cpu") -> dict[str, float]:
    """Mean data and compute seconds per training step of ``trial``."""
    from trainables.data import load_data, preprocess
    from trainables.finetune import build_model, resolve_trial_config
    from trainables.optim import build_optimizer, freeze_stages, param_groups, set_train_mode

    cfg = resolve_trial_config(trial)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, seed=cfg.seed)
    model = build_model(cfg, num_classes=data.num_classes)
    freeze_stages(model, cfg.freeze_depth)
    model.to(dev)
    train = data.train.to(dev) if dev.type == "cuda" else data.train
    optimizer = build_optimizer(cfg.optimizer, param_groups(
        model, lr=cfg.lr, lr_scale=cfg.lr_scale, weight_decay=cfg.weight_decay,
        freeze_depth=cfg.freeze_depth), momentum=cfg.momentum)
    set_train_mode(model, cfg.freeze_depth)
    gen = torch.Generator(device=dev).manual_seed(0)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for epoch in itertools.count():
            yield from train.batches(batch_size=cfg.batch_size, shuffle=True, seed=epoch,
                                     device=dev, drop_last=True)

    stream = batches()
    data_s = compute_s = 0.0
    with single_thread():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            x, y = next(stream)
            x = preprocess(x, resolution=cfg.resolution, mean=model.mean, std=model.std,
                           augment=cfg.augment, generator=gen)
            _sync(dev)
            t1 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(dev)
            t2 = time.perf_counter()
            if i >= warmup:
                data_s += t1 - t0
                compute_s += t2 - t1
    return {"data_s": data_s / steps, "compute_s": compute_s / steps,
            "share": data_s / (data_s + compute_s)}


def run(*, smoke: bool = False) -> Section:
    """Runs the benchmark."""
    section = Section("data_path", "5. Data path (digits, 64 px)", ref="5")
    t0 = time.perf_counter()
    load_before = load_average()
    cases = [{"backbone": "resnet18", "weights": "none", "freeze_depth": 0}] if smoke else CASES
    steps = 2 if smoke else 30
    results = [(case, measure({**BASE, **case}, steps=steps, warmup=1 if smoke else 3))
               for case in cases]
    worst_case, worst = max(results, key=lambda r: r[1]["share"])
    section.figures.append(Figure.check(
        "data time / step time, digits at 64 px (worst case below)", worst["share"],
        goal=GOAL, at_least=False, fmt="{:.1%}"))
    rows = [f"| {c.get('backbone', BASE['backbone'])} | {c['freeze_depth']} | "
            f"{'on' if c.get('augment') else 'off'} | {r['data_s'] * 1e3:.2f} | "
            f"{r['compute_s'] * 1e3:.1f} | {r['share']:.2%} |" for c, r in results]
    section.body = "\n".join([
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"Batch {BASE['batch_size']}, CPU; load average before: {load_before}, after: "
        f"{load_average()}.",
        "",
        "| backbone | freeze depth | augment | data ms/step | compute ms/step | data share |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "With the frozen-stage cache on (depth > 0, no augmentation) there is no image "
        "preprocessing at all: a step indexes a tensor of cached activations.",
    ])
    section.seconds = time.perf_counter() - t0
    return section


def main() -> None:
    run_as_script(run, doc=__doc__)


if __name__ == "__main__":
    main()
