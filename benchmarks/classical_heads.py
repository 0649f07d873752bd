"""Classical heads on frozen pooled features against the SGD-trained linear head.

Goal: on the demo data with Lite0 at feature-extraction depth, a classical head (logistic
regression, SVM, XGBoost fitted once on the pooled features) at ≥ the linear head's top-1 in
≤ 1/10 of its time per trial, both with the frozen-stage cache warm.

The demo task (configs/demo.yaml's data: digits, a few training images per class, 64 px)
with the demo's pretrained backbone, efficientnet_lite0 (packaged weights), all 9 stages frozen;
``run_trial`` in this process on one thread, as a trial with ``cpu: 1`` (scikit-learn's and
XGBoost's thread pools limited to one as well). Both caches are built first and timed
apart: the pooled features the classical heads read, and the depth-9 activations the
linear head trains on; every measured trial reads its cache (checked: no file is rewritten).

Linear head: the network's own classifier trained by SGD with the demo's fixed training
settings (its epochs, batch size, warm-up, weight decay; momentum 0.9) at head learning
rates 0.003, 0.01, 0.03, 0.1 and 0.3; the figure is the rate with the best top-1 (best
epoch; chosen on the validation split it is scored on, which favours it), its time the sum
of its epochs' ``seconds``, median of 3 runs. Classical heads at ftsearch's defaults (logreg
C 1; SVM C 1, RBF gamma "scale", or a linear kernel; XGBoost 200 trees, depth 6, learning
rate 0.3): a trial's time is its one report's ``seconds`` (the fit and scoring, as an SGD
trial's epoch: set-up and reading the features are not in it), median of 3 runs after an
untimed one. Classical and linear runs alternate, so that load from other processes hits
them alike. Top-1 is on the validation split.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DEMO_DATA,
    DEMO_RESOLUTION,
    DEMO_TRAIN,
    MISS,
    PASS,
    Figure,
    Section,
    load_average,
    median,
    run_as_script,
    single_thread,
)
from benchmarks.frozen_cache import build_cache

__all__ = ["CLASSICAL", "LINEAR", "LRS", "TRIAL", "build_pooled_cache", "run"]

GOAL_TIME_RATIO = 0.1
TRIAL: dict[str, Any] = {
    "backbone": "efficientnet_lite0", "weights": "packaged",
    "resolution": DEMO_RESOLUTION,
    "data": DEMO_DATA, "device": "cpu",
}
# The demo's training settings (configs/demo.yaml), at feature-extraction depth.
LINEAR: dict[str, Any] = {**DEMO_TRAIN, "head": "linear", "freeze_depth": 9}
LRS = (0.003, 0.01, 0.03, 0.1, 0.3)
CLASSICAL: dict[str, dict[str, Any]] = {
    "logreg": {"head": "logreg"},
    "svm, RBF kernel": {"head": "svm", "svm_kernel": "rbf"},
    "svm, linear kernel": {"head": "svm", "svm_kernel": "linear"},
    "xgboost": {"head": "xgboost"},
}
REPEATS = 3
_SMOKE_TRIAL = {"resolution": 32,
                "data": {"source": "digits", "samples_per_class": 4, "val_fraction": 0.05}}
_SMOKE_LINEAR = {"epochs": 2, "max_steps_per_epoch": 1}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch, BLAS and OpenMP (scikit-learn, XGBoost) on one thread, as a ``cpu: 1`` trial."""
    from threadpoolctl import threadpool_limits

    with single_thread(), threadpool_limits(limits=1):
        yield


def _trial(config: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """``run_trial``'s reports and its wall time (model and data set-up included)."""
    from trainables.finetune import run_trial

    reports: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    run_trial(config, report=lambda m, s: reports.append(m))
    return reports, time.perf_counter() - t0


def build_pooled_cache(config: dict[str, Any], cache_dir: str) -> float:
    """Builds the pooled-feature file exactly as a classical trial would: its seconds."""
    from trainables.classical import pooled_features
    from trainables.data import load_data
    from trainables.finetune import build_model, resolve_trial_config
    from trainables.optim import freeze_stages

    cfg = resolve_trial_config({**config, "cache_dir": cache_dir})
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, seed=cfg.seed)
    model = build_model(cfg, num_classes=data.num_classes)
    freeze_stages(model, cfg.freeze_depth)
    t0 = time.perf_counter()
    pooled_features(cfg, model, data, depth=cfg.freeze_depth, device=torch.device("cpu"))
    return time.perf_counter() - t0


def _files(cache_dir: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in Path(cache_dir).rglob("*") if p.is_file()}


def _linear(trial: dict[str, Any], linear: dict[str, Any], lrs: tuple[float, ...], *,
            cache_dir: str | None) -> dict[str, Any]:
    """The linear head at each lr: per-epoch top-1, and the best lr's seconds (one run)."""
    curves: dict[float, list[float]] = {}
    seconds: dict[float, tuple[float, float]] = {}
    for lr in lrs:
        reports, wall = _trial({**trial, **linear, "lr": lr, "cache_dir": cache_dir})
        curves[lr] = [r["top1"] for r in reports]
        seconds[lr] = (sum(r["seconds"] for r in reports), wall)
    best = max(lrs, key=lambda lr: (max(curves[lr]), -lr))
    return {"lr": best, "top1": max(curves[best]), "curves": curves,
            "all_seconds": [seconds[best][0]], "walls": [seconds[best][1]]}


def _linear_again(lin: dict[str, Any], trial: dict[str, Any], linear: dict[str, Any], *,
                  cache_dir: str) -> None:
    """One more run of the best-lr linear head, added to ``lin``'s times."""
    reports, wall = _trial({**trial, **linear, "lr": lin["lr"], "cache_dir": cache_dir})
    if max(r["top1"] for r in reports) != lin["top1"]:
        raise RuntimeError("the linear head's top-1 differs between identical trials")
    lin["all_seconds"].append(sum(r["seconds"] for r in reports))
    lin["walls"].append(wall)


def _classical(trial: dict[str, Any], head: dict[str, Any], *, cache_dir: str
               ) -> dict[str, Any]:
    """One classical trial's report, with its wall time."""
    (report,), wall = _trial({**trial, **head, "cache_dir": cache_dir})
    return {**report, "wall": wall}


def _summary(name: str, reports: list[dict[str, Any]], *, n_train: int) -> dict[str, Any]:
    """top-1 and the median reported seconds, fit seconds and wall time of a head's runs."""
    top1 = [r["top1"] for r in reports]
    if max(top1) - min(top1) > 1e-9:
        raise RuntimeError(f"{name}: top-1 differs between identical trials: {top1}")
    # samples_per_s of a classical trial is training images / fit seconds.
    fits = [n_train / r["samples_per_s"] if r["samples_per_s"] else 0.0 for r in reports]
    return {"top1": top1[0], "seconds": median([r["seconds"] for r in reports]),
            "fit": median(fits), "wall": median([r["wall"] for r in reports]),
            "all_seconds": [r["seconds"] for r in reports]}


def run(*, smoke: bool = False) -> Section:
    """Runs the benchmark."""
    from trainables.data import load_data

    section = Section("classical_heads", "Classical heads vs the SGD-trained linear head "
                      "(Lite0 features, demo data)", ref="heads")
    trial = {**TRIAL, **_SMOKE_TRIAL} if smoke else TRIAL
    linear = {**LINEAR, **_SMOKE_LINEAR} if smoke else LINEAR
    lrs = (0.1,) if smoke else LRS
    repeats = 1 if smoke else REPEATS
    classical = ({k: {**v, "xgb_n_estimators": 5} if v["head"] == "xgboost" else v
                  for k, v in CLASSICAL.items()} if smoke else CLASSICAL)
    t0 = time.perf_counter()
    load_before = load_average()
    data = load_data(trial["data"], seed=0)
    n_train, n_val = len(data.train), len(data.val)
    with tempfile.TemporaryDirectory() as cache_dir, _one_thread():
        pooled_s = build_pooled_cache({**trial, "head": "logreg"}, cache_dir)
        activations_s, _ = build_cache({**trial, **linear, "lr": lrs[0]}, cache_dir)
        files = _files(cache_dir)
        # The lr sweep is the linear head's first run; then every head and the best-lr linear
        # head once per round, interleaved, so that load from other processes hits all alike.
        lin = _linear(trial, linear, lrs, cache_dir=cache_dir)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in classical}
        if not smoke:  # untimed: the first fit of a kind imports scikit-learn or XGBoost
            for head in classical.values():
                _classical(trial, head, cache_dir=cache_dir)
        for rep in range(repeats):
            for name, head in classical.items():
                runs[name].append(_classical(trial, head, cache_dir=cache_dir))
            if rep:
                _linear_again(lin, trial, linear, cache_dir=cache_dir)
        heads = {name: _summary(name, r, n_train=n_train) for name, r in runs.items()}
        lin["seconds"], lin["wall"] = median(lin["all_seconds"]), median(lin["walls"])
        if _files(cache_dir) != files:
            raise RuntimeError("a trial did not reuse the cache file built for it")
        # The same best-lr linear trial without the cache, as it runs where none applies.
        (uncached_reports, uncached_wall) = _trial({**trial, **linear, "lr": lin["lr"],
                                                    "cache_dir": None})
    uncached_s = sum(r["seconds"] for r in uncached_reports)
    epochs = linear["epochs"]
    for name, r in heads.items():
        section.figures.append(Figure(f"{name}: top-1 / s per trial (cache warm)",
                                      f"{r['top1']:.1f} % / {r['seconds']:.3f} s"))
    section.figures.append(Figure(
        f"linear head (SGD, lr {lin['lr']:g}, {epochs} epochs): best top-1 / s per trial "
        f"(cache warm)", f"{lin['top1']:.1f} % / {lin['seconds']:.3f} s"))
    section.figures.append(Figure("cache build, once per backbone and data: pooled features "
                                  "/ depth-9 activations",
                                  f"{pooled_s:.1f} s / {activations_s:.1f} s"))
    best_name = max(heads, key=lambda n: heads[n]["top1"])
    gain = heads[best_name]["top1"] - lin["top1"]
    section.figures.append(Figure(
        f"best classical head ({best_name}): top-1 − the linear head's top-1",
        f"{gain:+.1f} points", "≥ 0 points", PASS if gain >= 0 else MISS))
    good = [n for n in heads if heads[n]["top1"] >= lin["top1"]]
    fastest = min(good, key=lambda n: heads[n]["seconds"]) if good else None
    ratio_name = "classical head at ≥ the linear head's top-1{}: s per trial / the linear head's"
    if fastest is None:
        section.figures.append(Figure(ratio_name.format("") + ", cache warm",
                                      "no classical head reaches its top-1",
                                      f"≤ {GOAL_TIME_RATIO:g}", MISS))
    else:
        section.figures.append(Figure.check(
            ratio_name.format(f" (fastest: {fastest})") + ", cache warm",
            heads[fastest]["seconds"] / lin["seconds"], goal=GOAL_TIME_RATIO, at_least=False,
            fmt="{:.2f}"))
        section.figures.append(Figure(
            ratio_name.format(f" ({fastest})") + " without the cache",
            f"{heads[fastest]['seconds'] / uncached_s:.3f}"))
    rows = [f"| {name} | {r['top1']:.1f} | {r['seconds']:.3f} | {r['fit']:.3f} | "
            f"{r['wall']:.2f} | {_list(r['all_seconds'])} |" for name, r in heads.items()]
    lr_rows = [f"| {lr:g} | {' / '.join(f'{v:.1f}' for v in curve)} | {max(curve):.1f} |"
               for lr, curve in lin["curves"].items()]
    section.body = "\n".join([
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"{trial['backbone']} ({trial['weights']} weights), {trial['resolution']} px, "
        f"{n_train} training and {n_val} validation images; load average before: "
        f"{load_before}, after: {load_average()}.",
        "",
        "| head | top-1 % | s per trial (reported) | of which fit s | `run_trial` wall s | "
        "reported s, each run |",
        "|---|---|---|---|---|---|",
        *rows,
        f"| linear, SGD, lr {lin['lr']:g}, {epochs} epochs | {lin['top1']:.1f} | "
        f"{lin['seconds']:.3f} | - | {lin['wall']:.2f} | {_list(lin['all_seconds'])} |",
        f"| the same, without the cache | {max(r['top1'] for r in uncached_reports):.1f} | "
        f"{uncached_s:.2f} | - | {uncached_wall:.2f} | {uncached_s:.2f} |",
        "",
        "Linear head, top-1 % after each epoch by head learning rate (cache warm):",
        "",
        "| lr | top-1 % per epoch | best |",
        "|---|---|---|",
        *lr_rows,
        "",
        f"Cache build, timed apart: the pooled features {pooled_s:.1f} s, the depth-9 "
        f"activations {activations_s:.1f} s (the backbone's forward pass over every image, "
        f"once per backbone, depth, resolution and data on a node). The wall column adds "
        f"the trial's set-up (data, model with its weights) to its reported seconds.",
        "",
        _verdict(heads, lin, fastest=fastest, uncached_s=uncached_s, epochs=epochs),
    ])
    section.seconds = time.perf_counter() - t0
    return section


def _verdict(heads: dict[str, dict[str, Any]], lin: dict[str, Any], *, fastest: str | None,
             uncached_s: float, epochs: int) -> str:
    if fastest is None:
        return (f"Missed: no classical head reaches the linear head's {lin['top1']:.1f} % "
                f"(best: {max(h['top1'] for h in heads.values()):.1f} %).")
    head = heads[fastest]
    ratio = head["seconds"] / lin["seconds"]
    if ratio <= GOAL_TIME_RATIO:
        return (f"{fastest} beats the linear head's top-1 in {ratio:.2f} of its time per trial.")
    per_epoch = lin["seconds"] / epochs
    return (
        f"The top-1 half of the goal is met ({fastest}: {head['top1']:.1f} % against "
        f"{lin['top1']:.1f} %, at its default settings where the linear head needed its "
        f"learning rate chosen); the time half is missed: {fastest} takes {ratio:.2f} of the "
        f"linear head's time, not ≤ {GOAL_TIME_RATIO:g}. With the cache warm the linear head "
        f"is cheap too: an epoch trains one 1280 × 10 layer on cached activations and "
        f"evaluates it, {per_epoch * 1e3:.0f} ms, so {epochs} epochs take "
        f"{lin['seconds']:.2f} s. The classical trial's own fit takes {head['fit']:.3f} s of "
        f"its {head['seconds']:.3f} s; the rest is scoring: the validation set, and the "
        f"training set for a head that has a training loss (not the SVM). Even the fit "
        f"alone is {head['fit'] / lin['seconds']:.2f} of the linear head's time. The 1/10 "
        f"holds only against the linear head without the cache: "
        f"{uncached_s:.1f} s per trial, a ratio of {head['seconds'] / uncached_s:.3f}; that "
        f"is what the linear head costs "
        f"where its cache does not apply (augmentation, gradual unfreezing). A classical "
        f"head's pooled features are always cached, so after the first trial of a backbone, "
        f"depth and data on a node every classical trial runs at the warm-cache time above. "
        f"Counting the set-up both pay (data, model and weights: the wall column), a trial "
        f"takes {head['wall']:.2f} s against the linear head's {lin['wall']:.2f} s.")


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def main() -> None:
    run_as_script(run, doc=__doc__)


if __name__ == "__main__":
    main()
