"""Hyperparameter importance from the Parquet files: Optuna's PED-ANOVA and fANOVA.

The study is rebuilt from the Parquet files alone (no Ray, no live study), one completed
Optuna trial per finished trial measured at equal fidelity (:mod:`search.fidelity`), with
the config's distributions. Valued by best top-1 instead, a trial ASHA stopped after one
epoch would sit beside one that ran every epoch, and a parameter would look important for
what the scheduler cut.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import optuna
import pandas as pd

from search import contract as C
from search.analysis import Experiment, py_value
from search.config import Distribution
from search.fidelity import TOP1_AT, Fidelity, equal_fidelity

__all__ = ["Importance", "param_importance"]


@dataclass
class Importance:
    """Hyperparameter importance of one experiment for top-1 at equal fidelity.

    Attributes:
        experiment: Experiment name.
        finished: Finished trials (TERMINATED, STOPPED_EARLY, DIVERGED) with a top-1.
        values: Evaluator name -> parameter -> importance (summing to 1).
        messages: Why an evaluator gave no numbers (too few trials...).
        fidelity: The epoch the finished trials were compared at and how many were
            (None when fewer than 2 have a result).
    """

    experiment: str
    finished: int
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    fidelity: Fidelity | None = None

    def describe_fidelity(self) -> str:
        """How the trials were compared, for a report line."""
        if self.fidelity is None:
            return "no equal-fidelity comparison (fewer than 2 trials with a result)"
        return self.fidelity.describe()


def _distribution(name: str, values: pd.Series, space: Mapping[str, Distribution]
                  ) -> optuna.distributions.BaseDistribution:
    spec = space.get("freeze_depth" if name == "freeze_fraction" else name)
    observed = [py_value(v) for v in values.dropna().unique()]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in observed)
    if (spec is None or spec.type == "choice") and not (spec is None and numeric):
        return optuna.distributions.CategoricalDistribution(sorted(observed, key=str))
    # The declared range, widened to what was observed (a grid rounds, gamma is derived).
    bounds = [b for b in ((spec.low, spec.high) if spec else ()) if b is not None] + observed
    low, high = min(bounds), max(bounds)
    if all(isinstance(v, int) for v in observed) or (spec is not None and spec.type == "int"):
        return optuna.distributions.IntDistribution(int(low), int(high))
    log = spec.type == "loguniform" if spec else low > 0 and high / low >= 100
    return optuna.distributions.FloatDistribution(low, high, log=log)


def _study(experiment: Experiment, measured: pd.DataFrame) -> optuna.Study:
    params = [p for p in experiment.params if experiment.trials[f"config.{p}"].notna().any()]
    space = experiment.space
    dists = {p: _distribution(p, experiment.trials[f"config.{p}"], space) for p in params}
    study = optuna.create_study(direction="maximize")
    trials = []
    for _, row in measured.iterrows():
        values = {p: py_value(row[f"config.{p}"]) for p in params}
        present = {p: v for p, v in values.items() if v is not None}  # conditional ones
        trials.append(optuna.trial.create_trial(
            params=present, distributions={p: dists[p] for p in present},
            value=float(row[TOP1_AT])))
    study.add_trials(trials)
    return study


def param_importance(experiment: Experiment, *, min_trials: int = 5,
                     fanova_min_trials: int = 20, seed: int = 0) -> Importance:
    """PED-ANOVA (and fANOVA from ``fanova_min_trials`` trials) importance for top-1.

    The study is rebuilt from the Parquet files: one completed Optuna trial per
    finished trial measured at the common epoch of :func:`search.fidelity.equal_fidelity`
    (the highest epoch at least ``min_trials`` finished trials reached), valued by its
    top-1 there, with the config's distributions. fANOVA only assesses parameters
    every trial sampled; its random forest ranks a pure-noise parameter near the one
    that matters below about 20 trials, hence its higher threshold.
    """
    trials = experiment.trials
    finished = trials[trials["status"].isin(C.FINISHED) & trials["best_top1"].notna()]
    # As many trials as importance needs, at the highest epoch that still has them.
    measured, fidelity = equal_fidelity(finished, experiment.epochs, min_trials=min_trials)
    result = Importance(experiment=experiment.name, finished=len(finished), fidelity=fidelity)
    if not experiment.params:
        result.messages.append("no searched parameter in trials.parquet")
        return result
    if len(finished) < min_trials:
        result.messages.append(
            f"too few finished trials for importance: {len(finished)} finished "
            f"({', '.join(C.FINISHED)}), at least {min_trials} needed")
        return result
    if len(measured) < min_trials:  # finished trials without a row in epochs.parquet
        result.messages.append(
            f"too few trials at equal fidelity for importance: {len(measured)} measured, at "
            f"least {min_trials} needed")
        return result
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(experiment, measured)
    n = len(measured)
    evaluators: dict[str, optuna.importance.BaseImportanceEvaluator] = {
        # Top set of at least two trials: one trial has no distribution to compare.
        "PED-ANOVA": optuna.importance.PedAnovaImportanceEvaluator(
            target_quantile=min(0.5, max(0.1, 2 / n))),
    }
    if n >= fanova_min_trials:
        evaluators["fANOVA"] = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    else:
        result.messages.append(f"fANOVA: too few finished trials at equal fidelity ({n}, at "
                               f"least {fanova_min_trials} needed)")
    for name, evaluator in evaluators.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental", "importances will be equal"
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
        result.values[name] = {p: float(values[p]) for p in experiment.params if p in values}
        left_out = [p for p in experiment.params if p not in values]
        if left_out:
            result.messages.append(f"{name}: {left_out} not assessed (not sampled by every "
                                   f"trial)")
    return result
