"""Goal 3, search efficiency: TPE + ASHA vs random search vs a grid, at equal epoch budgets.

The demo task made smaller (32 px, 20 training images per class) and its space discretised
to a grid: backbone {efficientnet_lite0 (packaged weights), resnet18 (from scratch)},
freeze_depth 0..9 step 3 for Lite0 (resnet18 trains every stage: frozen random weights
would stay random), lr and lr_scale 3 log-spaced values each. The grid's points are
ftsearch's own (``search.space.grid_points``); every point is trained once for 4 epochs by
``run_trial`` (seed 0, two processes), which gives its top-1 after each epoch. A trial is
deterministic given its point, so the three searches then replay against that table in
one process, each paying for every epoch it trains:

* grid: every point, 4 epochs each, in ftsearch's seeded grid order; its total is the budget;
* random: Optuna's RandomSampler over the same points, 4 epochs each, no early stopping;
* TPE + ASHA: ftsearch's sampler (seeded multivariate TPE) over the same points, each trial
  stopped by Ray Tune's own ASHA rung logic (``_Bracket``: grace 1, reduction factor 2, as in
  configs/demo.yaml), trials one at a time.

Seeds 0, 1, 2 seed the samplers (and the grid's order). Reported: the best top-1 each reached
within the budget, and the epochs each needed to get within 1 point of the grid's best.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MISS,
    Figure,
    Section,
    experiment,
    fmt_spread,
    load_average,
    run_as_script,
)

__all__ = ["build_table", "replay", "run"]

GOAL_FRACTION = 0.25
SEEDS = (0, 1, 2)
METHODS = ("grid", "random", "tpe_asha")
LABELS = {"grid": "grid", "random": "random, no early stopping", "tpe_asha": "TPE + ASHA"}
TRAIN: dict[str, Any] = {
    "resolution": 32, "epochs": 4, "batch_size": 32, "warmup_epochs": 0.5,
    "eval_batch_size": 512, "weights": {"efficientnet_lite0": "packaged", "default": "none"},
}
DATA = {"source": "digits", "samples_per_class": 20, "val_fraction": 0.2}
SPACE = {
    "backbone": {"type": "choice", "values": ["efficientnet_lite0", "resnet18"]},
    "freeze_depth": {"type": "int", "low": 0, "high": 9, "step": 3},
    "lr": {"type": "loguniform", "low": 0.003, "high": 0.3, "grid_points": 3},
    "lr_scale": {"type": "loguniform", "low": 0.01, "high": 1.0, "grid_points": 3},
}
_SMOKE_TRAIN = {**TRAIN, "resolution": 32, "epochs": 2, "max_steps_per_epoch": 1}
_SMOKE_SPACE = {
    "backbone": {"type": "choice", "values": ["efficientnet_lite0", "resnet18"]},
    "freeze_depth": {"type": "int", "low": 3, "high": 5, "step": 2},
    "lr": {"type": "loguniform", "low": 0.01, "high": 0.1, "grid_points": 2},
}

Key = tuple[Any, ...]


def _key(point: dict[str, Any]) -> Key:
    return tuple(sorted(point.items()))


def _cfg(algorithm: str, seed: int, *, space: dict[str, Any], train: dict[str, Any]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        return experiment(Path(tmp), "efficiency", data=DATA, train=train, space=space,
                          seed=seed, search={"algorithm": algorithm, "num_samples": 100,
                                             "max_concurrent": 1})


def _curve(config: dict[str, Any]) -> list[float]:
    import torch

    from trainables.finetune import run_trial

    torch.set_num_threads(1)
    top1: list[float] = []
    run_trial(config, report=lambda m, s: top1.append(float(m["top1"])))
    return top1


def build_table(*, space: dict[str, Any], train: dict[str, Any], workers: int = 2
                ) -> dict[Key, list[float]]:
    """Top-1 after each epoch for every grid point (seed 0)."""
    from search.space import grid_points

    points = grid_points(_cfg("grid", 0, space=space, train=train))
    with tempfile.TemporaryDirectory() as cache_dir:
        configs = [{**train, **p, "data": DATA, "seed": 0, "cache_dir": cache_dir}
                   for p in points]
        if workers <= 1:
            curves = [_curve(c) for c in configs]
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork after torch threads started
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                curves = list(pool.map(_curve, configs))
    return {_key(p): c for p, c in zip(points, curves, strict=True)}


class _Id:
    def __init__(self, number: int) -> None:
        self.trial_id = str(number)


def replay(method: str, seed: int, table: dict[Key, list[float]], *, budget: int,
           target: float, space: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """One search against the table: best top-1 within ``budget`` epochs, epochs to ``target``."""
    import optuna
    from ray.tune.schedulers.async_hyperband import _Bracket  # the rung logic of ASHAScheduler

    from search.space import grid_points, make_define_by_run, make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid_cfg = _cfg("grid", seed, space=space, train=train)
    max_t = train["epochs"]
    if method == "grid":
        order = iter(grid_points(grid_cfg))
        next_point: Callable[[], Any] = lambda: next(order, None)  # noqa: E731
        tell: Callable[[Any, float], None] = lambda handle, value: None  # noqa: E731
    else:
        cfg = _cfg("optuna" if method == "tpe_asha" else "random", seed, space=space,
                   train=train)
        study = optuna.create_study(direction="maximize", sampler=make_sampler(cfg))
        define = make_define_by_run(grid_cfg)  # grid values: the table's points

        def next_point() -> Any:
            trial = study.ask()
            constants = define(trial)  # samples: trial.params is filled by this call
            return trial, {**trial.params, **constants}

        def tell(handle: Any, value: float) -> None:
            study.tell(handle, value)  # ftsearch's searcher gets the last reported top-1

    bracket = _Bracket(min_t=1, max_t=max_t, reduction_factor=2, s=0)
    spent, best, reached, trials = 0, 0.0, None, 0
    while spent < budget:
        got = next_point()
        if got is None:
            break
        handle, point = got if method != "grid" else (None, got)
        trials += 1
        last = 0.0
        for epoch, top1 in enumerate(table[_key(point)], start=1):
            spent += 1
            last, best = top1, max(best, top1)
            if reached is None and best >= target:
                reached = spent
            if spent >= budget:
                break
            if (method == "tpe_asha" and epoch < max_t
                    and bracket.on_result(_Id(trials), epoch, top1) == "STOP"):
                break
        tell(handle, last)
    return {"best": best, "reached": reached, "trials": trials, "spent": spent}


def run(*, smoke: bool = False) -> Section:
    """Runs the benchmark."""
    section = Section("search_efficiency", "3. Search efficiency at an equal epoch budget",
                      ref="3")
    space, train = (_SMOKE_SPACE, _SMOKE_TRAIN) if smoke else (SPACE, TRAIN)
    t0 = time.perf_counter()
    load_before = load_average()
    table = build_table(space=space, train=train, workers=1 if smoke else 2)
    table_s = time.perf_counter() - t0
    grid_best = max(max(c) for c in table.values())
    budget = len(table) * train["epochs"]
    target = grid_best - 1.0
    runs = {(m, s): replay(m, s, table, budget=budget, target=target, space=space, train=train)
            for m in METHODS for s in SEEDS}
    quarter = {(m, s): replay(m, s, table, budget=budget // 4, target=target, space=space,
                              train=train) for m in METHODS for s in SEEDS}

    def needed(method: str) -> list[float]:
        return [runs[method, s]["reached"] or float("inf") for s in SEEDS]

    name = ("TPE + ASHA: epochs to within 1 point of the grid's best, share of the grid's "
            "epochs (worst of 3 seeds)")
    worst = max(needed("tpe_asha")) / budget
    if worst == float("inf"):
        section.figures.append(Figure(name, "not reached by every seed",
                                      f"≤ {GOAL_FRACTION:.0%}", MISS))
    else:
        section.figures.append(Figure.check(name, worst, goal=GOAL_FRACTION, at_least=False,
                                            fmt="{:.0%}"))
    for method in METHODS:
        section.figures.append(Figure(
            f"{LABELS[method]}: best top-1 at the grid's budget (3 seeds)",
            fmt_spread([runs[method, s]["best"] for s in SEEDS]) + " %"))
    rows = []
    for method in METHODS:
        reached = ", ".join("not reached" if r == float("inf") else f"{r:.0f} ({r / budget:.0%})"
                            for r in needed(method))
        rows.append(
            f"| {LABELS[method]} | {fmt_spread([runs[method, s]['best'] for s in SEEDS])} | "
            f"{fmt_spread([quarter[method, s]['best'] for s in SEEDS])} | {reached} | "
            f"{', '.join(str(runs[method, s]['trials']) for s in SEEDS)} |")
    ranked = sorted(table.items(), key=lambda kv: -max(kv[1]))
    top = "; ".join(f"{dict(k)} → {max(c):.1f}" for k, c in ranked[:3])
    why = _why_missed(needed("tpe_asha"), budget=budget, top=ranked[0])
    section.body = "\n".join([
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"Grid: {len(table)} points × {train['epochs']} epochs = {budget} epochs (the budget); "
        f"its best top-1 {grid_best:.1f} % (target {target:.1f} %). Best points: {top}. "
        f"Building the table took {table_s:.0f} s; load average before: {load_before}, "
        f"after: {load_average()}.",
        "",
        f"| method | best top-1 at {budget} epochs, % | best top-1 at {budget // 4} epochs "
        f"(25 %), % | epochs to within 1 point, seeds 0/1/2 | trials run, seeds 0/1/2 |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Top-1 is mean ± half-range (min–max) over the 3 seeds. Replaying a table instead "
        f"of retraining is what makes 3 seeds × 3 methods × {budget} epochs (plus the 25 % "
        "runs) fit in minutes on 2 cores; it is exact because each point's training is "
        "seeded and deterministic, so a search that revisits a point (samplers may) pays "
        "its epochs again and gets the same curve. Trial counts above the grid's come from "
        "ASHA stopping most trials after 1 or 2 epochs.",
        *(["", why] if why else []),
    ])
    section.seconds = time.perf_counter() - t0
    return section


def main() -> None:
    run_as_script(run, doc=__doc__)


if __name__ == "__main__":
    main()


def _why_missed(needed: list[float], *, budget: int, top: tuple) -> str:
    """A sentence on the seeds that missed the goal, or nothing when every seed met it."""
    shares = [n / budget for n in needed]
    missed = [f"seed {s} ({'not reached' if sh == float('inf') else f'{sh:.0%}'})"
              for s, sh in zip(SEEDS, shares, strict=True) if sh > GOAL_FRACTION]
    if not missed:
        return ""
    met = [sh for sh in shares if sh <= GOAL_FRACTION]
    return (f"Why the goal is missed: {', '.join(missed)} needed more than "
            f"{GOAL_FRACTION:.0%} of the grid's epochs, while {len(met)} of {len(SEEDS)} seeds "
            f"met it. The grid's best point is {dict(top[0])}; the likely cause (not proven) is "
            f"that a seed whose startup trials miss its neighbourhood spends budget refining "
            f"the next-best region first. Nothing was tuned to pass: the benchmark uses the "
            f"demo's own search settings (seeded multivariate TPE, ASHA grace 1, reduction "
            f"factor 2).")
