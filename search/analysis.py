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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import ValidationError

from search import contract as C
from search.config import Distribution
from trainables import metrics as M

__all__ = [
    "AnalysisError",
    "Experiment",
    "best_config",
    "format_leaderboard",
    "leaderboard",
    "leaderboard_table",
    "load_experiment",
    "py_value",
    "run_summary",
    "sampled_params",
    "summary",
    "trial_config",
]

# What analysis needs of each file; older files may lack later columns.
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
    if version and version not in C.READABLE_SCHEMA_VERSIONS:
        raise AnalysisError(f"{path}: results schema version {version}, this ftsearch reads "
                            f"versions {', '.join(C.READABLE_SCHEMA_VERSIONS)}")
    if "flops" in table.column_names:  # version 1: multiply-adds, the same as gmacs * 1e9
        table = table.drop(["flops"])
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
    first = directory / C.CONFIG_FILE if (directory / C.CONFIG_FILE).exists() else None
    return datetime.fromtimestamp(first.stat().st_mtime) if first else None


def load_experiment(directory: str | Path) -> Experiment:
    """Reads one experiment directory.

    Raises:
        AnalysisError: A missing or corrupt file, naming it and why.
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise AnalysisError(f"{directory}: not a directory")
    trials = _read_parquet(directory / C.TRIALS_FILE, _TRIAL_COLUMNS)
    epochs = _read_parquet(directory / C.EPOCHS_FILE, _EPOCH_COLUMNS)
    config = None
    if (directory / C.CONFIG_FILE).is_file():
        try:
            config = yaml.safe_load((directory / C.CONFIG_FILE).read_text())
        except yaml.YAMLError as err:
            raise AnalysisError(f"{directory / C.CONFIG_FILE}: not valid YAML ({err})") from None
        if not isinstance(config, dict):
            raise AnalysisError(f"{directory / C.CONFIG_FILE}: not a config mapping")
    exp = Experiment(name=str((config or {}).get("name") or directory.name), directory=directory,
                     trials=trials, epochs=epochs, config=config, started=_started(directory))
    try:
        exp.space  # noqa: B018 - validate once here, so later steps can rely on it
    except ValidationError as err:
        raise AnalysisError(f"{directory / C.CONFIG_FILE}: bad space ({err})") from None
    return exp


def py_value(value: Any) -> Any:
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


def _fmt(value: Any, spec: str) -> str:
    value = py_value(value)
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


# --------------------------------------------------------------------------- summary


def summary(experiment: Experiment) -> dict[str, Any]:
    """Name, start date, trials by status, total compute (trial-seconds) and best trial."""
    trials = experiment.trials
    counts = trials["status"].value_counts()
    return {
        "name": experiment.name,
        "directory": str(experiment.directory),
        "started": experiment.started,
        "trials": len(trials),
        "by_status": {s: int(counts.get(s, 0)) for s in C.STATUSES},
        "trial_seconds": float(trials["train_seconds"].fillna(0).sum()),
        "best": C.best_trial(leaderboard([experiment])),
    }


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
        raise AnalysisError(f"{experiment.directory / C.CONFIG_FILE}: missing; best.yaml needs "
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
        raise AnalysisError(f"{experiment.directory / C.TRIALS_FILE}: no trial {trial_id!r}")
    row = rows.iloc[0]
    values = {c.removeprefix("config."): py_value(row[c]) for c in rows.columns
              if c.startswith("config.")}
    return {k: v for k, v in values.items() if v is not None}


def trial_config(experiment: Experiment, trial: Mapping[str, Any]) -> dict[str, Any]:
    """The flat trial config ``trial`` ran with: fixed settings, data, seed, sampled values."""
    raw = experiment.config or {}
    fixed = {k: v for k, v in (raw.get("space") or {}).items() if not isinstance(v, dict)}
    sampled = sampled_params(experiment, trial["trial_id"])
    return {**(raw.get("train") or {}), **fixed, "data": raw.get("data", {"source": "digits"}),
            "seed": raw.get("seed", 0), **sampled}


# --------------------------------------------------------------------------- run summary


def _matching_trial(trials: pd.DataFrame, point: Mapping[str, Any]) -> pd.Series | None:
    """The trial whose searched values equal ``point`` (a points_to_evaluate entry)."""
    for _, row in trials.iterrows():
        same = True
        for key, value in point.items():
            got = py_value(row.get(C.config_column(key)))
            if isinstance(value, float) and isinstance(got, float):
                same &= math.isclose(value, got, rel_tol=1e-9)
            else:
                same &= got == value
        if same:
            return row
    return None


def _first_line(error: str) -> str:
    # `error` holds the exception's own line first, then traceback context.
    first = error.strip().splitlines()[0] if error.strip() else error
    return first.split(f"{M.SETUP_FAILURE}: ", 1)[-1]


def _against_baseline(directory: Path, baseline: pd.Series, best: pd.Series) -> str:
    """The best trial against a warm-start point's trial, both at one epoch.

    A scheduler may have stopped the baseline after 2 epochs while the best ran 6: the
    gain is read where both are measured (:mod:`search.fidelity`), not across fidelities.
    """
    from search.fidelity import TOP1_AT, equal_fidelity

    if baseline["trial_id"] == best["trial_id"]:
        return (f"warm-start baseline {baseline['trial_id']} is the best trial: nothing the "
                f"search tried beat it")
    pair = pd.DataFrame([baseline, best])
    cut = pair.loc[pair["status"] != C.Status.TERMINATED, "epochs"]
    epoch = int(cut.min() if not cut.empty else pair["epochs"].max())
    epochs = _read_parquet(directory / C.EPOCHS_FILE, ("trial_id", M.EPOCH, M.TOP1))
    at = equal_fidelity(pair, epochs, epoch=epoch)[0].set_index("trial_id")[TOP1_AT]
    was, now = at[baseline["trial_id"]], at[best["trial_id"]]
    return (f"warm-start baseline {baseline['trial_id']}: top-1 {was:.2f}% -> best "
            f"{now:.2f}% ({now - was:+.2f} points, both up to epoch {epoch})")


def run_summary(directory: str | Path, points: Sequence[Mapping[str, Any]] = ()
                ) -> tuple[list[str], bool]:
    """The end-of-run summary of an experiment, and whether any trial produced a result.

    Counts by status, the best trial (:func:`search.contract.best_trial`) and its config,
    the gain over warm-start points, the findings at equal fidelity
    (:mod:`search.findings`); when nothing finished, the first error, once.
    """
    directory = Path(directory)
    trials = _read_parquet(directory / C.TRIALS_FILE, ("trial_id", "status", "error"))
    counts = trials["status"].value_counts().to_dict()
    lines = ["", f"trials: {len(trials)} (" + ", ".join(
        f"{n} {s.lower()}" for s, n in sorted(counts.items())) + ")"]
    best = C.best_trial(trials)
    errors = trials["error"].dropna()
    setup = errors[errors.str.contains(M.SETUP_FAILURE, regex=False)]
    if not setup.empty:
        # The search stopped on it (search.callback.FailFast): the cause, once.
        lines.append(f"search stopped: a trial failed in setup, as every trial would:\n  "
                     f"{_first_line(setup.iloc[0])}\nfull text: `error` in "
                     f"{directory / C.TRIALS_FILE}")
        return lines, False
    interrupted = int(counts.get(C.Status.INTERRUPTED, 0))
    resume = (f"{interrupted} trial(s) interrupted before they ended: continue them with "
              f"`ftsearch resume {directory}`")
    if best is None:
        lines.append("no trial finished" + (f"; first error:\n  {_first_line(errors.iloc[0])}"
                                            if not errors.empty else ""))
        return lines + ([resume] if interrupted else []), False
    lines.append(f"best trial: {best['trial_id']}  top-1 {best['best_top1']:.2f}%  "
                 f"top-5 {best['best_top5']:.2f}%  epochs {best['epochs']}  "
                 f"{best['gmacs']:.3f} GMACs  {best['params'] / 1e6:.2f}M params")
    lines.append("best config:")
    lines += [f"  {c.removeprefix(C.CONFIG_PREFIX)}: {best[c]}" for c in trials.columns
              if c.startswith(C.CONFIG_PREFIX) and py_value(best[c]) is not None]
    finished = trials[trials["status"].isin(C.SELECTABLE) & trials["best_top1"].notna()]
    for point in points:
        baseline = _matching_trial(finished, point)
        if baseline is not None:
            lines.append(_against_baseline(directory, baseline, best))
    from search.findings import findings, format_findings  # it builds on this module

    lines += format_findings(*findings(load_experiment(directory)))
    if interrupted:
        lines.append(resume)
    lines.append(f"experiment directory: {directory}")
    return lines, not interrupted
