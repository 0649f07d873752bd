"""Goal 3, search efficiency, measured by ``ftsearch replay`` on two real grid experiments.

The grids (benchmarks/grids/, built by ``python -m benchmarks.build_grids``): scikit-learn's
digits at 10 and at 100 training images per class (validation: the same 30 % of the set),
64 px, the packaged ImageNet-pretrained EfficientNet-Lite0; the linear head trained by SGD
for 4 epochs at every freeze depth 0..9 with head learning rate and backbone scale on
3-point log grids (0.003 / 0.03 / 0.3 and 0.01 / 0.1 / 1), and two classical heads
(logistic regression, RBF SVM) on the pooled output of every stage 1..9: 108 points, each
trained to its end by ``ftsearch run`` (seed 0, two trials at a time, one CPU each), then
ranked by ``ftsearch rank`` with a cold frozen-stage cache.

``ftsearch replay`` replays each grid for every method and seed in one process: a search
pays one epoch for each epoch it trains and sees the top-1 its point recorded. Methods:
random sampling without early stopping; ftsearch's TPE with Ray Tune's ASHA rung logic
(grace 1, reduction factor 2, as configs/demo.yaml); the same warm-started by the
transferability prior (the best 3 cells first, ``search.prior_top``), its ranking's CPU
seconds counted as epochs at the grid's mean CPU seconds per epoch. The grid itself, in
ftsearch's seeded order, is the reference. Figures: epochs to within 1 point of the grid's
best as a share of the grid's epochs (worst of 5 seeds), and Kendall's tau between a cell's
LogME and the best top-1 any grid trial on that cell reached.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.common import INFO, MISS, ROOT, Figure, Section, fmt_spread

__all__ = ["GRIDS", "run"]

GRIDS = ("digits-10", "digits-100")
GOAL_SHARE = 0.15
GOAL_TAU = 0.6
SEEDS = (0, 1, 2, 3, 4)
_SMOKE_SEEDS = (0, 1)


def _grid_dir(name: str) -> Path:
    return ROOT / "benchmarks" / "grids" / name


def _rules(name: str) -> dict[str, Any]:
    """Two practice rules as measured facts: the best lr_scale and freeze depth."""
    trials = pd.read_parquet(_grid_dir(name) / "trials.parquet")
    linear = trials[trials["config.head"] == "linear"]
    by_scale = linear.groupby("config.lr_scale").best_top1.max()
    by_depth = linear.groupby("config.freeze_depth").best_top1.max()
    by_cell = trials.groupby("config.freeze_depth").best_top1.max()  # classical on stage k too
    best = trials.loc[trials.best_top1.idxmax()]
    return {"by_scale": by_scale, "by_depth": by_depth, "by_cell": by_cell, "best": best}


def _method_rows(replays: dict, grid: Any, methods: list, seeds: tuple[int, ...]) -> list[str]:
    rows = []
    for m in methods:
        runs = [replays[m.label, s] for s in seeds]
        reached = ", ".join("not reached" if r["reached"] is None
                            else f"{r['reached']:.0f} ({r['reached'] / grid.epochs:.0%})"
                            for r in runs)
        rows.append(f"| {m.label} | {reached} | {fmt_spread([r['best'] for r in runs])} | "
                    f"{', '.join(str(r['trials']) for r in runs)} |")
    return rows


def _verdict(tau: float, cells: pd.DataFrame, best: pd.Series, scale: pd.Series) -> list[str]:
    """What the grid says, in words read off its numbers (a miss with its measured cause)."""
    top_score = int(cells.loc[cells.logme.idxmax(), "depth"])
    best_depth = int(best["config.freeze_depth"])
    lines = [f"Measured rules: the best lr_scale is {scale.idxmax():g} (rule of thumb: 0.1); "
             f"the best cell freezes {best_depth} of 9 stages."]
    if tau < GOAL_TAU:
        lines.append(
            f"Why tau misses: LogME scores frozen features and peaks at depth {top_score}, "
            f"but the best trial fine-tunes everything after depth {best_depth} "
            f"({best['config.head']} head): with this much data, training the stages beats "
            "any frozen feature, which a frozen-feature score cannot see. The prior then "
            "starts with classical heads on the deep stages, a local optimum a point or two "
            "below the best, where TPE keeps sampling one-epoch trials.")
    return lines


def run(*, smoke: bool = False) -> Section:
    """Replays both grids (every seed in full; smoke mode: 2 seeds)."""
    from search.analysis import load_experiment
    from search.replay import METHODS, load_grid, replay_methods
    from search.transfer import experiment_cells, kendall_tau

    section = Section("search_efficiency", "3. Search efficiency, replayed on two grids",
                      ref="3")
    seeds = _SMOKE_SEEDS if smoke else SEEDS
    methods = list(METHODS)
    t0 = time.perf_counter()
    parts = [__doc__.split("\n\n", 1)[1].strip()]
    for name in GRIDS:
        start = time.perf_counter()
        grid = load_grid(_grid_dir(name))
        replays = replay_methods(grid, methods, seeds=seeds)
        cells = experiment_cells(load_experiment(_grid_dir(name)))
        tau = kendall_tau(cells)
        section.figures.append(Figure.check(
            f"{name}: Kendall tau, LogME vs the grid's best top-1 per (backbone, depth) cell",
            tau, goal=GOAL_TAU, at_least=True, fmt="{:.2f}"))
        for m in methods[1:]:
            runs = [replays[m.label, s]["reached"] for s in seeds]
            label = (f"{name}: {m.label}: epochs to within 1 point of the grid's best, share "
                     f"of the grid's epochs (worst of {len(seeds)} seeds)")
            if None in runs:
                status = MISS if m.prior else INFO
                section.figures.append(Figure(label, f"not reached by {runs.count(None)} of "
                                              f"{len(seeds)} seeds",
                                              f"≤ {GOAL_SHARE:.0%}" if m.prior else "",
                                              status))
            elif m.prior:
                section.figures.append(Figure.check(label, max(runs) / grid.epochs,
                                                    goal=GOAL_SHARE, at_least=False,
                                                    fmt="{:.0%}"))
            else:
                section.figures.append(Figure(label, f"{max(runs) / grid.epochs:.0%}"))
        rules = _rules(name)
        scale = rules["by_scale"]
        depth = rules["by_depth"]
        section.figures.append(Figure(
            f"{name}: best lr_scale (linear head, best top-1 at 0.01 / 0.1 / 1)",
            f"{scale.idxmax():g} ({' / '.join(f'{v:.1f}' for v in scale.values)} %)"))
        section.figures.append(Figure(
            f"{name}: best freeze depth, linear head / any head on that stage",
            f"{int(depth.idxmax())} / {int(rules['by_cell'].idxmax())}"))
        best = rules["best"]
        parts += [
            "",
            f"### {name}",
            "",
            f"{len(grid.curves)} points, {grid.epochs} epochs; best top-1 {grid.best:.2f} % "
            f"({best['config.head']} head, depth {int(best['config.freeze_depth'])}"
            + (f", lr {best['config.lr']:g}, lr_scale {best['config.lr_scale']:g}"
               if best["config.head"] == "linear" else "") + "); "
            f"{sum(c >= grid.best - 1 for c in (max(v) for v in grid.curves.values()))} points "
            f"within 1 point of it. Ranking: {grid.ranking_epochs:.1f} epochs "
            f"({grid.cpu_seconds_per_epoch:.2f} CPU s per epoch). Replayed in "
            f"{time.perf_counter() - start:.0f} s.",
            "",
            f"| method | epochs to within 1 point, seeds {'/'.join(map(str, seeds))} | best "
            f"top-1 at the grid's budget, % | trials run |",
            "|---|---|---|---|",
            *_method_rows(replays, grid, methods, seeds),
            "",
            "LogME per cell against the best top-1 of any trial on it (Kendall tau "
            f"{tau:.2f}):",
            "",
            "| depth | LogME | best top-1 % | best linear head, frozen to it % |",
            "|---|---|---|---|",
            *[f"| {int(r.depth)} | {r.logme:.3f} | {r.best_top1:.1f} | "
              f"{depth.get(int(r.depth), float('nan')):.1f} |"
              for r in cells.sort_values("depth").itertuples()],
            "",
            f"Best top-1 % of the linear head by freeze depth 0..9: "
            f"{' / '.join(f'{v:.1f}' for v in depth.values)}.",
            "",
            *_verdict(tau, cells, best, scale),
        ]
    section.body = "\n".join(parts)
    section.seconds = time.perf_counter() - t0
    return section
