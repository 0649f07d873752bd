"""``ftsearch replay``: a finished grid experiment as a tabular benchmark of search strategies.

Every point of a grid was trained to its end, seeded, so its ``epochs.parquet`` holds the
top-1 any search would have seen after each epoch of that point. A replayed search samples
points from the same space (ftsearch's own define-by-run space and samplers), pays one
epoch per epoch it trains and sees exactly the epochs the grid recorded; Ray Tune's own ASHA
rung logic stops trials as the live scheduler would (one trial at a time); the
transferability prior is :mod:`search.prior`'s, its ranking cost counted in epochs (CPU
seconds of ``transferability.parquet`` over the grid's mean CPU seconds per epoch). All in
one process, without Ray workers or torch: seconds for hundreds of replays.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from search import contract as C
from search.analysis import AnalysisError, load_experiment, sampled_params
from search.config import ExperimentConfig, load_config
from search.prior import Prior, build_prior
from search.space import grid_points, make_define_by_run, make_sampler
from search.transfer import read_ranking

__all__ = ["METHODS", "Grid", "Method", "ReplayError", "format_replay", "load_grid",
           "parse_method", "replay_methods", "replay_search"]

SEARCHERS = ("grid", "random", "tpe")
SCHEDULERS = ("none", "asha")
Key = tuple[tuple[str, Any], ...]


class ReplayError(ValueError):
    """A directory that cannot be replayed, or a method that does not exist."""


@dataclass(frozen=True)
class Method:
    """A search strategy: searcher, scheduler, and whether the transferability prior leads."""

    searcher: str
    scheduler: str = "none"
    prior: bool = False

    @property
    def label(self) -> str:
        parts = [self.searcher] + ([self.scheduler] if self.scheduler != "none" else [])
        return "+".join(parts + (["prior"] if self.prior else []))


# What `ftsearch replay` compares when no --method is given (the prior where ranked).
METHODS = (Method("grid"), Method("random"), Method("tpe", "asha"), Method("tpe", "asha", True))


def parse_method(spec: str) -> Method:
    """``searcher[+scheduler][+prior]``, e.g. ``tpe+asha+prior``."""
    parts = spec.lower().split("+")
    prior = parts[-1] == "prior"
    parts = parts[:-1] if prior else parts
    if not parts or parts[0] not in SEARCHERS or len(parts) > 2 or (
            len(parts) == 2 and parts[1] not in SCHEDULERS):
        raise ReplayError(f"--method {spec!r}: expected searcher[+scheduler][+prior] with a "
                          f"searcher of {list(SEARCHERS)} and a scheduler of {list(SCHEDULERS)}")
    if prior and parts[0] == "grid":
        raise ReplayError(f"--method {spec!r}: a grid visits every point; the prior only "
                          f"reorders it: use random or tpe with +prior")
    return Method(parts[0], parts[1] if len(parts) == 2 else "none", prior)


def _key(point: dict[str, Any]) -> Key:
    return tuple(sorted((k, round(v, 9) if isinstance(v, float) else v)
                        for k, v in point.items()))


@dataclass(frozen=True)
class Grid:
    """A finished grid experiment as a table.

    Attributes:
        cfg: Its config (a grid search).
        curves: Point -> top-1 after each epoch it recorded.
        cpu_seconds_per_epoch: Mean over its epochs of ``seconds`` x ``resources.cpu``.
        ranking: Its transferability.parquet, if ranked.
    """

    cfg: ExperimentConfig
    curves: dict[Key, list[float]]
    cpu_seconds_per_epoch: float
    ranking: pd.DataFrame | None

    @property
    def best(self) -> float:
        return max(max(c) for c in self.curves.values())

    @property
    def epochs(self) -> int:
        return sum(len(c) for c in self.curves.values())

    @property
    def ranking_epochs(self) -> float:
        """The ranking's cost in grid epochs (its backbones' CPU seconds)."""
        if self.ranking is None:
            return math.nan
        per_backbone = self.ranking.groupby(["backbone", "weights"]).backbone_cpu_seconds.first()
        return float(per_backbone.sum()) / self.cpu_seconds_per_epoch


def load_grid(directory: str | Path) -> Grid:
    """Reads a finished grid experiment.

    Raises:
        ReplayError: Not a grid search, or a point without a finished trial.
    """
    try:
        exp = load_experiment(directory)
    except AnalysisError as err:
        raise ReplayError(str(err)) from None
    path = exp.directory / C.CONFIG_FILE
    if exp.config is None:
        raise ReplayError(f"{path}: missing; replay needs the grid's config")
    cfg = load_config(path, [f"storage={exp.directory.parent}", f"name={exp.directory.name}"])
    if cfg.search.algorithm != "grid":
        raise ReplayError(f"{path}: search.algorithm is {cfg.search.algorithm!r}; replay needs "
                          f"a grid experiment, whose every point ran to its end")
    finished = exp.trials[exp.trials.status.isin(C.FINISHED)]
    by_trial = exp.epochs.sort_values("epoch").groupby("trial_id").top1.apply(list)
    curves = {_key(sampled_params(exp, t)): by_trial[t] for t in finished.trial_id
              if t in by_trial.index}
    missing = [p for p in grid_points(cfg) if _key(p) not in curves]
    if missing:
        raise ReplayError(f"{exp.directory}: {len(missing)} grid point(s) have no finished "
                          f"trial (first: {missing[0]}); resume the grid to its end first")
    seconds = exp.epochs.seconds.dropna()
    return Grid(cfg=cfg, curves=curves, cpu_seconds_per_epoch=float(seconds.mean())
                * cfg.resources.cpu, ranking=read_ranking(exp.directory))


class _Id:
    def __init__(self, number: int) -> None:
        self.trial_id = str(number)


def _proposer(grid: Grid, method: Method, seed: int
              ) -> tuple[Callable[[], Any], Callable[[Any, list[float], bool], None]]:
    """(next point, tell) for ``method``; ``next`` returns (handle, point) or None, ``tell``
    takes the handle, the top-1 of each epoch the trial ran and whether it was stopped."""
    cfg = grid.cfg.model_copy(update={"seed": seed})
    if method.searcher == "grid":
        order = iter(grid_points(cfg))

        def next_in_grid() -> Any:
            point = next(order, None)
            return None if point is None else (None, point)

        return next_in_grid, lambda handle, seen, stopped: None
    searched = cfg.model_copy(update={"search": cfg.search.model_copy(update={
        "algorithm": "optuna" if method.searcher == "tpe" else "random",
        "num_samples": len(grid.curves), "max_concurrent": 1})})
    prior: Prior | None = None
    if method.prior:
        if grid.ranking is None:
            raise ReplayError(f"{grid.cfg.directory}: no {C.TRANSFERABILITY_FILE}; run "
                              f"`ftsearch rank {grid.cfg.directory}` first")
        prior = build_prior(grid.cfg, grid.ranking)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(direction="maximize", sampler=make_sampler(searched))
    for point in prior.points if prior else []:
        study.enqueue_trial(point)
    # The grid's own define-by-run space: its values are the table's points.
    define = (make_define_by_run(prior.config(cfg), prior.depth_limits) if prior
              else make_define_by_run(cfg))

    def next_point() -> Any:
        trial = study.ask()
        constants = define(trial)
        return trial, {**trial.params, **constants}

    def tell(trial: Any, seen: list[float], stopped: bool) -> None:
        # As search.tuner's searcher: the epochs seen are intermediate values; a trial the
        # scheduler stopped is PRUNED (valued by its last epoch), any other COMPLETE.
        for epoch, top1 in enumerate(seen, start=1):
            trial.report(top1, epoch)
        if stopped:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, seen[-1])

    return next_point, tell


def replay_search(grid: Grid, method: Method, *, seed: int, budget: int, target: float,
                  grace_period: int = 1, reduction_factor: float = 2) -> dict[str, Any]:
    """One search against ``grid``: best top-1 within ``budget`` epochs, epochs to ``target``.

    Returns:
        ``best`` (top-1 reached), ``reached`` (epochs spent when the best first got to
        ``target``, None if never), ``trials``, ``spent`` (epochs, the prior's included) and
        ``prior_epochs`` (the ranking's cost, 0 without the prior).
    """
    from ray.tune.schedulers.async_hyperband import _Bracket  # ASHAScheduler's rung logic

    next_point, tell = _proposer(grid, method, seed)
    max_t = grid.cfg.epochs
    bracket = _Bracket(min_t=grace_period, max_t=max_t, reduction_factor=reduction_factor,
                       s=0)
    prior_epochs = grid.ranking_epochs if method.prior else 0.0
    spent, best, reached, trials = prior_epochs, 0.0, None, 0
    while spent + 1 <= budget:  # an epoch is paid only when it fits in the budget
        got = next_point()
        if got is None:
            break
        handle, point = got
        curve = grid.curves.get(_key(point))
        if curve is None:
            raise ReplayError(f"the search proposed {point}, which is not a grid point")
        trials += 1
        seen: list[float] = []
        stopped = False
        for epoch, top1 in enumerate(curve, start=1):
            if spent + 1 > budget:
                break
            spent += 1
            seen.append(top1)
            best = max(best, top1)
            if reached is None and best >= target:
                reached = spent
            # As search.tuner's ASHA: a trial complete before max_t (a classical head) is
            # kept out of the rungs, whose other results are first epochs, not final ones.
            if method.scheduler == "asha" and len(curve) == max_t:
                decision = bracket.on_result(_Id(trials), epoch, top1)
                if epoch < max_t and decision == "STOP":
                    stopped = True
                    break
        if seen:
            tell(handle, seen, stopped)
    return {"best": best, "reached": reached, "trials": trials, "spent": spent,
            "prior_epochs": prior_epochs}


def replay_methods(grid: Grid, methods: Sequence[Method], *, seeds: Sequence[int],
                   budget: int | None = None, within: float = 1.0
                   ) -> dict[tuple[str, int], dict[str, Any]]:
    """Every method over every seed: ``(label, seed) -> replay_search``'s result."""
    budget = budget or grid.epochs
    target = grid.best - within
    return {(m.label, s): replay_search(grid, m, seed=s, budget=budget, target=target)
            for m in methods for s in seeds}


def _share(epochs: float | None, total: int) -> str:
    return "not reached" if epochs is None else f"{epochs:.0f} ({epochs / total:.0%})"


def format_replay(grid: Grid, methods: Sequence[Method],
                  results: dict[tuple[str, int], dict[str, Any]], *, seeds: Sequence[int],
                  budget: int | None = None, within: float = 1.0) -> list[str]:
    """The replay as text: per method, epochs to within ``within`` points and best top-1."""
    budget = budget or grid.epochs
    lines = [f"grid {grid.cfg.name}: {len(grid.curves)} points, {grid.epochs} epochs, best "
             f"top-1 {grid.best:.2f} % (target {grid.best - within:.2f} %); budget {budget} "
             f"epochs; seeds {', '.join(map(str, seeds))}"]
    if any(m.prior for m in methods):
        lines.append(f"transferability ranking: {grid.ranking_epochs:.1f} epochs "
                     f"(its CPU seconds over the grid's {grid.cpu_seconds_per_epoch:.2f} s "
                     f"per epoch), counted in every +prior search")
    for method in methods:
        runs = [results[method.label, s] for s in seeds]
        shares = ", ".join(_share(r["reached"], grid.epochs) for r in runs)
        worst = [r["reached"] for r in runs]
        tail = ("worst not reached" if None in worst
                else f"worst {max(worst) / grid.epochs:.0%}")
        bests = [r["best"] for r in runs]
        lines.append(f"{method.label:<16} epochs to within {within:g} point: {shares}; {tail}; "
                     f"best at budget {min(bests):.2f}-{max(bests):.2f} %")
    return lines
