"""Parquet -> leaderboard, hyperparameter importance, Pareto front, best config.

Everything here reads ``trials.parquet``, ``epochs.parquet`` and (when present)
``config.yaml`` of finished or running experiments, possibly copied to another
machine: Ray is never imported and the data set need not be reachable.
:mod:`search.plots` and :mod:`search.report` draw and publish what this module
computes; ``ftsearch analyze`` chains them.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import ValidationError

from search.config import Distribution
from search.store import EPOCHS_FILE, SCHEMA_VERSION, STATUSES, TRIALS_FILE

__all__ = [
    "FINISHED",
    "AnalysisError",
    "Experiment",
    "Importance",
    "best_config",
    "best_trial",
    "format_leaderboard",
    "leaderboard",
    "leaderboard_table",
    "load_experiment",
    "param_importance",
    "pareto_mask",
    "sampled_params",
    "summary",
    "trial_config",
]

CONFIG_FILE = "config.yaml"
# Trials whose top-1 is an outcome of their config (a diverged one says "lr too high").
FINISHED = ("TERMINATED", "STOPPED_EARLY", "DIVERGED")
# Trials that can be rerun or exported as "the best": they ended cleanly.
_SELECTABLE = ("TERMINATED", "STOPPED_EARLY")
_TRIAL_COLUMNS = ("trial_id", "status", "best_top1", "last_top1", "best_top5", "epochs", "gmacs",
                  "train_seconds", "checkpoint")
_EPOCH_COLUMNS = ("trial_id", "epoch", "top1")
_STARTED = re.compile(r"experiment_state-(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.json$")


class AnalysisError(ValueError):
    """An experiment directory that cannot be analysed; the message names the file and why."""


@dataclass(frozen=True)
class Experiment:
    """One experiment's results as read from its directory.

    Attributes:
        name: Experiment name (``config.yaml``'s, else the directory's).
        directory: ``<storage>/<name>``.
        trials: ``trials.parquet`` as a DataFrame.
        epochs: ``epochs.parquet`` as a DataFrame.
        config: The raw ``config.yaml`` mapping, or None when the file is absent.
        started: When the search started, if known.
    """

    name: str
    directory: Path
    trials: pd.DataFrame
    epochs: pd.DataFrame
    config: dict[str, Any] | None
    started: datetime | None

    @property
    def space(self) -> dict[str, Distribution]:
        """The searched distributions of ``config.yaml`` (empty without it)."""
        raw = (self.config or {}).get("space") or {}
        return {k: Distribution.model_validate(v) for k, v in raw.items() if isinstance(v, dict)}

    @property
    def params(self) -> list[str]:
        """Sampled parameter names: the ``config.<name>`` columns, derived ones left out."""
        names = [c.removeprefix("config.") for c in self.trials.columns if c.startswith("config.")]
        space = self.space
        if "freeze_depth" in space and space["freeze_depth"].type == "fraction":
            names.remove("freeze_depth")  # derived from the sampled freeze_fraction
        return names


def _read_parquet(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise AnalysisError(f"{path}: missing (not an ftsearch experiment directory, or the "
                            f"search wrote no result yet)")
    try:
        # One open: a path would be opened twice (footer, then pages), and a search
        # still running may atomically replace the file in between.
        with path.open("rb") as file:
            table = pq.read_table(file)
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(f"{path}: unreadable Parquet file ({err})") from None
    version = (table.schema.metadata or {}).get(b"ftsearch.schema_version", b"").decode()
    if version and version != SCHEMA_VERSION:
        raise AnalysisError(f"{path}: results schema version {version}, this ftsearch reads "
                            f"version {SCHEMA_VERSION}")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise AnalysisError(f"{path}: missing column(s) {missing}; not an ftsearch results file")
    # Python ints and None, not floats, in an integer column with gaps (conditional params).
    return table.to_pandas(integer_object_nulls=True)


def _started(directory: Path) -> datetime | None:
    stamps = sorted(m.group(1) for p in directory.glob("experiment_state-*.json")
                    if (m := _STARTED.search(p.name)))
    if stamps:
        return datetime.strptime(stamps[0], "%Y-%m-%d_%H-%M-%S")
    first = directory / CONFIG_FILE if (directory / CONFIG_FILE).exists() else None
    return datetime.fromtimestamp(first.stat().st_mtime) if first else None


def load_experiment(directory: str | Path) -> Experiment:
    """Reads one experiment directory.

    Raises:
        AnalysisError: A missing or corrupt file, naming it and why.
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise AnalysisError(f"{directory}: not a directory")
    trials = _read_parquet(directory / TRIALS_FILE, _TRIAL_COLUMNS)
    epochs = _read_parquet(directory / EPOCHS_FILE, _EPOCH_COLUMNS)
    config = None
    if (directory / CONFIG_FILE).is_file():
        try:
            config = yaml.safe_load((directory / CONFIG_FILE).read_text())
        except yaml.YAMLError as err:
            raise AnalysisError(f"{directory / CONFIG_FILE}: not valid YAML ({err})") from None
        if not isinstance(config, dict):
            raise AnalysisError(f"{directory / CONFIG_FILE}: not a config mapping")
    exp = Experiment(name=str((config or {}).get("name") or directory.name), directory=directory,
                     trials=trials, epochs=epochs, config=config, started=_started(directory))
    try:
        exp.space  # noqa: B018 - validate once here, so later steps can rely on it
    except ValidationError as err:
        raise AnalysisError(f"{directory / CONFIG_FILE}: bad space ({err})") from None
    return exp


def _py(value: Any) -> Any:
    """A plain Python value, None for a missing one (NaN, NA, None)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- leaderboard


def leaderboard(experiments: Sequence[Experiment]) -> pd.DataFrame:
    """Every trial of every experiment, best top-1 first, with ``rank`` and ``experiment``.

    Ties are broken by last top-1, then experiment and trial id; trials without
    a result come last.
    """
    frames = [e.trials.assign(experiment=e.name) for e in experiments]
    board = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    board = board.sort_values(["best_top1", "last_top1", "experiment", "trial_id"],
                              ascending=[False, False, True, True], na_position="last",
                              kind="stable").reset_index(drop=True)
    board.insert(0, "rank", range(1, len(board) + 1))
    first = ["rank", "experiment", "trial_id", "status"]
    return board[first + [c for c in board.columns if c not in first]]


def best_trial(board: pd.DataFrame) -> pd.Series | None:
    """The leaderboard's best trial that ended cleanly (TERMINATED or STOPPED_EARLY)."""
    ok = board[board["status"].isin(_SELECTABLE) & board["best_top1"].notna()]
    return None if ok.empty else ok.iloc[0]


def _fmt(value: Any, spec: str) -> str:
    value = _py(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def leaderboard_table(board: pd.DataFrame, *, top: int | None = None) -> pd.DataFrame:
    """The first ``top`` leaderboard rows as display strings, one column per shown field."""
    rows = board if top is None else board.head(top)
    params = [c for c in rows.columns if c.startswith("config.") and rows[c].notna().any()]
    table = {"rank": rows["rank"].astype(str)}
    if board["experiment"].nunique() > 1:
        table["experiment"] = rows["experiment"]
    table["trial"] = rows["trial_id"]
    for col in params:
        table[col.removeprefix("config.")] = [_fmt(v, ".4g") for v in rows[col]]
    for col, title, spec in (("best_top1", "best top-1 %", ".2f"),
                             ("last_top1", "last top-1 %", ".2f"),
                             ("best_top5", "top-5 %", ".2f"), ("epochs", "epochs", "d"),
                             ("gmacs", "GMACs", ".3f"), ("status", "status", "s")):
        table[title] = [_fmt(v, spec) for v in rows[col]]
    return pd.DataFrame(table)


def format_leaderboard(board: pd.DataFrame, *, top: int | None = None) -> str:
    """The leaderboard as a text table: searched parameters, metrics, epochs, GMACs, status."""
    return leaderboard_table(board, top=top).to_string(index=False)


# --------------------------------------------------------------------------- summary, Pareto


def summary(experiment: Experiment) -> dict[str, Any]:
    """Name, start date, trials by status, total compute (trial-seconds) and best trial."""
    trials = experiment.trials
    counts = trials["status"].value_counts()
    return {
        "name": experiment.name,
        "directory": str(experiment.directory),
        "started": experiment.started,
        "trials": len(trials),
        "by_status": {s: int(counts.get(s, 0)) for s in STATUSES},
        "trial_seconds": float(trials["train_seconds"].fillna(0).sum()),
        "best": best_trial(leaderboard([experiment])),
    }


def pareto_mask(cost: Sequence[float], score: Sequence[float]) -> np.ndarray:
    """Which points no other point beats (cost no higher, score no lower, one strictly).

    NaN points are never on the front. O(n log n): one sweep in increasing cost.
    """
    cost, score = np.asarray(cost, dtype=float), np.asarray(score, dtype=float)
    mask = np.zeros(len(cost), dtype=bool)
    valid = np.flatnonzero(~(np.isnan(cost) | np.isnan(score)))
    best_before = -math.inf  # best score among strictly cheaper points
    for c in np.unique(cost[valid]):
        group = valid[cost[valid] == c]
        top = score[group].max()
        if top > best_before:
            mask[group[score[group] == top]] = True
            best_before = top
    return mask


# --------------------------------------------------------------------------- best config


def best_config(experiment: Experiment, trial: Mapping[str, Any]) -> dict[str, Any]:
    """A config that reruns ``trial``: ``ftsearch run`` on it reproduces its sampled values.

    Each searched parameter becomes a one-value choice (a ``fraction`` a
    zero-width range), so the rerun samples exactly the trial's values and its
    ``trials.parquet`` keeps the same ``config.<name>`` columns. Parameters the
    trial never sampled (conditional ones) are dropped. The rerun is one trial,
    run for every epoch (no scheduler), named ``<name>-best`` beside the original.

    Raises:
        AnalysisError: The experiment has no ``config.yaml``.
    """
    if experiment.config is None:
        raise AnalysisError(f"{experiment.directory / CONFIG_FILE}: missing; best.yaml needs "
                            f"the experiment's config")
    raw = copy.deepcopy(experiment.config)
    sampled = sampled_params(experiment, trial["trial_id"])
    space: dict[str, Any] = {}
    for key, entry in (raw.get("space") or {}).items():
        if not isinstance(entry, dict):
            space[key] = entry
        elif entry.get("type") == "fraction":
            frac = sampled.get("freeze_fraction")
            space[key] = {"type": "fraction", "low": frac, "high": frac}
        elif (value := sampled.get(key)) is not None:
            space[key] = {"type": "choice", "values": [value]}
    search = {k: v for k, v in (raw.get("search") or {}).items()
              if k not in ("compound_constraint", "time_budget_s")}
    gamma = sampled.get("gamma")
    if (raw.get("search") or {}).get("compound_constraint") and gamma is not None:
        space["gamma"] = {"type": "choice", "values": [gamma]}  # sampled under the constraint
    raw.update(name=f"{experiment.name}-best", storage=str(experiment.directory.parent),
               space=space, scheduler={"type": "none"},
               search={**search, "algorithm": "random", "num_samples": 1, "max_concurrent": 1,
                       "points_to_evaluate": []})
    return raw


def sampled_params(experiment: Experiment, trial_id: str) -> dict[str, Any]:
    """What ``trial_id`` sampled, typed as in its trials.parquet (unsampled ones left out).

    A leaderboard row of several experiments holds floats where a column has
    gaps; this reads the experiment's own row instead.
    """
    rows = experiment.trials[experiment.trials["trial_id"] == trial_id]
    if rows.empty:
        raise AnalysisError(f"{experiment.directory / TRIALS_FILE}: no trial {trial_id!r}")
    row = rows.iloc[0]
    values = {c.removeprefix("config."): _py(row[c]) for c in rows.columns
              if c.startswith("config.")}
    return {k: v for k, v in values.items() if v is not None}


def trial_config(experiment: Experiment, trial: Mapping[str, Any]) -> dict[str, Any]:
    """The flat trial config ``trial`` ran with: fixed settings, data, seed, sampled values."""
    raw = experiment.config or {}
    fixed = {k: v for k, v in (raw.get("space") or {}).items() if not isinstance(v, dict)}
    sampled = sampled_params(experiment, trial["trial_id"])
    return {**(raw.get("train") or {}), **fixed, "data": raw.get("data", {"source": "digits"}),
            "seed": raw.get("seed", 0), **sampled}


# --------------------------------------------------------------------------- importance


@dataclass
class Importance:
    """Hyperparameter importance of one experiment for best top-1.

    Attributes:
        experiment: Experiment name.
        finished: Finished trials used (TERMINATED, STOPPED_EARLY, DIVERGED).
        values: Evaluator name -> parameter -> importance (summing to 1).
        messages: Why an evaluator gave no numbers (too few trials...).
    """

    experiment: str
    finished: int
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def _distribution(name: str, values: pd.Series, space: Mapping[str, Distribution]
                  ) -> optuna.distributions.BaseDistribution:
    spec = space.get("freeze_depth" if name == "freeze_fraction" else name)
    observed = [_py(v) for v in values.dropna().unique()]
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


def _study(experiment: Experiment, finished: pd.DataFrame) -> optuna.Study:
    params = [p for p in experiment.params if experiment.trials[f"config.{p}"].notna().any()]
    space = experiment.space
    dists = {p: _distribution(p, experiment.trials[f"config.{p}"], space) for p in params}
    study = optuna.create_study(direction="maximize")
    trials = []
    for _, row in finished.iterrows():
        values = {p: _py(row[f"config.{p}"]) for p in params}
        present = {p: v for p, v in values.items() if v is not None}  # conditional ones
        trials.append(optuna.trial.create_trial(
            params=present, distributions={p: dists[p] for p in present},
            value=float(row["best_top1"])))
    study.add_trials(trials)
    return study


def param_importance(experiment: Experiment, *, min_trials: int = 5,
                     fanova_min_trials: int = 20, seed: int = 0) -> Importance:
    """PED-ANOVA (and fANOVA from ``fanova_min_trials`` finished trials) importance for top-1.

    The study is rebuilt from ``trials.parquet``: one completed Optuna trial
    per finished trial, valued by its best top-1, with the config's
    distributions. fANOVA only assesses parameters every trial sampled; its
    random forest ranks a pure-noise parameter near the one that matters below
    about 20 trials, hence its higher threshold.
    """
    trials = experiment.trials
    finished = trials[trials["status"].isin(FINISHED) & trials["best_top1"].notna()]
    result = Importance(experiment=experiment.name, finished=len(finished))
    if not experiment.params:
        result.messages.append("no searched parameter in trials.parquet")
        return result
    if len(finished) < min_trials:
        result.messages.append(
            f"too few finished trials for importance: {len(finished)} finished "
            f"({', '.join(FINISHED)}), at least {min_trials} needed")
        return result
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(experiment, finished)
    n = len(finished)
    evaluators: dict[str, optuna.importance.BaseImportanceEvaluator] = {
        # Top set of at least two trials: one trial has no distribution to compare.
        "PED-ANOVA": optuna.importance.PedAnovaImportanceEvaluator(
            target_quantile=min(0.5, max(0.1, 2 / n))),
    }
    if n >= fanova_min_trials:
        evaluators["fANOVA"] = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    else:
        result.messages.append(f"fANOVA: too few finished trials ({n}, at least "
                               f"{fanova_min_trials} needed)")
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
