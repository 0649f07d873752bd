"""The results contract: file names, columns, statuses, objectives, the best trial, exit codes.

Everything a reader of an experiment directory relies on is named here once: the callback
and the store write by these names, analysis, export and the CLI read by them, and the
README's results section lists the same columns. No Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from trainables import metrics as M

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CONFIG_FILE",
    "CONFIG_HISTORY_FILE",
    "CONFIG_PREFIX",
    "EPOCHS_FILE",
    "EPOCH_COLUMNS",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_OK",
    "FINISHED",
    "JOURNAL_FILE",
    "LOCK_FILE",
    "LOCK_OWNER_FILE",
    "OBJECTIVE_COLUMNS",
    "PARETO_COLUMN",
    "READABLE_SCHEMA_VERSIONS",
    "RESERVE_FILE",
    "SCHEMA_VERSION",
    "SELECTABLE",
    "SIGNATURES_FILE",
    "STATUSES",
    "STUDY_JOURNAL_FILE",
    "TRANSFERABILITY_COLUMNS",
    "TRANSFERABILITY_FILE",
    "TRANSFER_SCORE",
    "TRIALS_FILE",
    "TRIAL_COLUMNS",
    "UNFINISHED",
    "Status",
    "best_trial",
    "config_column",
    "objective_column",
    "pareto_mask",
]

# --- files of an experiment directory, <storage>/<name>/
TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
CONFIG_FILE = "config.yaml"  # the resolved config the search ran with
# (backbone, depth) cells scored before training: `ftsearch rank`, search.prior.
TRANSFERABILITY_FILE = "transferability.parquet"
# The search as an Optuna study (JournalStorage), for `optuna-dashboard`: search.study_journal.
STUDY_JOURNAL_FILE = "optuna-journal.log"
# Driver-side bookkeeping, hidden: not results, but what keeps them exactly once and safe.
JOURNAL_FILE = ".ftsearch-journal.jsonl"  # results not yet in the Parquet files
LOCK_FILE = ".ftsearch.lock"  # held by the one driver running or resuming the experiment
LOCK_OWNER_FILE = ".ftsearch.lock.owner"  # who holds it: pid, host, command
# HMACs of the Tune state files resume loads. Not *.json: on resume Tune copies every
# *.json and *.pkl of the directory into its staging area and later back, which would put
# back a stale copy over the signatures written meanwhile.
SIGNATURES_FILE = ".ftsearch-signatures"
CONFIG_HISTORY_FILE = "config-changes.jsonl"  # what each resume changed in the config
RESERVE_FILE = ".ftsearch-reserve"  # disk space held back to record how a failed run ended

# Parquet metadata key b"ftsearch.schema_version". Version 2 dropped `flops`, which held
# multiply-adds (2 x gmacs x 1e9 would have been FLOPs); version-1 files still read.
SCHEMA_VERSION = "2"
READABLE_SCHEMA_VERSIONS = ("1", "2")


class Status:
    """A trial's status in ``trials.parquet``."""

    RUNNING = "RUNNING"
    TERMINATED = "TERMINATED"  # ran every epoch
    STOPPED_EARLY = "STOPPED_EARLY"  # stopped by the scheduler
    ERROR = "ERROR"  # raised; the message is in `error`
    DIVERGED = "DIVERGED"  # loss went NaN/inf; stopped at once
    # The run ended (Ctrl-C, a killed or failed driver, fail-fast) before the trial did;
    # `ftsearch resume` continues it unless fail-fast ended the search.
    INTERRUPTED = "INTERRUPTED"


STATUSES = (Status.RUNNING, Status.TERMINATED, Status.STOPPED_EARLY, Status.ERROR,
            Status.DIVERGED, Status.INTERRUPTED)
# Trials that have not ended: a resume continues them (or drops them if Tune never knew them).
UNFINISHED = (Status.RUNNING, Status.INTERRUPTED)
# Trials whose top-1 is an outcome of their config (a diverged one says "lr too high").
FINISHED = (Status.TERMINATED, Status.STOPPED_EARLY, Status.DIVERGED)
# Trials that can be rerun or exported as "the best": they ended cleanly.
SELECTABLE = (Status.TERMINATED, Status.STOPPED_EARLY)

# --- columns. trials.parquet: these plus one `config.<param>` per searched parameter, and
# `pareto` in a multi-objective search.
TRIAL_COLUMNS = ("trial_id", "status", "best_top1", "last_top1", "best_top5", "last_val_loss",
                 "epochs", M.PARAMS, M.GMACS, "train_seconds", "node", "checkpoint", "error")
PARETO_COLUMN = "pareto"
CONFIG_PREFIX = "config."
# epochs.parquet: one row per (trial, epoch).
EPOCH_COLUMNS = ("trial_id", M.EPOCH, M.TRAIN_LOSS, M.VAL_LOSS, M.TOP1, M.TOP5, M.LR,
                 M.SAMPLES_PER_S, M.SECONDS, M.PEAK_RSS_MB, M.PEAK_GPU_MB, M.RESUMED_FROM)

# transferability.parquet: one row per (backbone, weights, depth) cell, `rank` 1 = best by
# TRANSFER_SCORE; `in_space` says whether the search can sample the cell. The seconds: this
# cell's scoring; its backbone's forward pass (shared by its cells, 0 when cached); and the
# backbone's whole job, wall and CPU (setup, features, every cell).
TRANSFER_SCORE = M.TRANSFER_SCORES[0]
TRANSFERABILITY_COLUMNS = ("backbone", "weights", "depth", "stages", "resolution",
                           "feature_dim", *M.TRANSFER_SCORES, "rank", "in_space",
                           "score_seconds", "feature_seconds", "backbone_seconds",
                           "backbone_cpu_seconds", "train_images", "classes")

# --- objectives: the metric a search optimises -> the trials.parquet column that ranks it.
# The same column orders the leaderboard, flags the Pareto front and picks the best trial.
OBJECTIVE_COLUMNS = {M.TOP1: "best_top1", M.TOP5: "best_top5", M.VAL_LOSS: "last_val_loss",
                     M.GMACS: M.GMACS, M.PARAMS: M.PARAMS}

# --- exit codes of every ftsearch command
EXIT_OK = 0
EXIT_FAILED = 1  # the search (or a job) ran and failed
EXIT_BAD_INPUT = 2  # refused before any work: config, paths, arguments


def config_column(param: str) -> str:
    """The trials.parquet column of searched parameter ``param``."""
    return f"{CONFIG_PREFIX}{param}"


def objective_column(metric: str) -> str:
    """The trials.parquet column that ranks trials by ``metric``."""
    try:
        return OBJECTIVE_COLUMNS[metric]
    except KeyError:
        raise ValueError(f"unknown objective metric {metric!r}; choose one of "
                         f"{list(OBJECTIVE_COLUMNS)}") from None


def pareto_mask(values: Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    """Which rows no other row dominates, for objectives with ``modes`` (``max``/``min``).

    A row dominates another when it is at least as good in every objective and better in
    one. Rows with a missing (NaN/None) value are never on the front.

    Args:
        values: One row per trial, one value per objective.
        modes: ``"max"`` or ``"min"`` per objective.
    """
    signs = np.array([1.0 if m == "max" else -1.0 for m in modes])
    raw = np.array([[np.nan if v is None else float(v) for v in row] for row in values],
                   dtype=float).reshape(len(values), len(modes))
    scores = raw * signs
    valid = ~np.isnan(scores).any(axis=1)
    mask = np.zeros(len(values), dtype=bool)
    points = scores[valid]
    for i, point in zip(np.flatnonzero(valid), points, strict=True):
        dominated = (points >= point).all(axis=1) & (points > point).any(axis=1)
        mask[i] = not dominated.any()
    return mask


def best_trial(trials: pd.DataFrame, *, metric: str = M.TOP1, mode: str = "max"
               ) -> pd.Series | None:
    """The best trial that ended cleanly (TERMINATED or STOPPED_EARLY) by ``metric``.

    Ties go to the later of ``last_top1``, then the smaller trial id, so the choice is
    stable across reads.
    """
    column = objective_column(metric)
    ok = trials[trials["status"].isin(SELECTABLE) & trials[column].notna()]
    if ok.empty:
        return None
    ranked = ok.sort_values([column, "last_top1", "trial_id"],
                            ascending=[mode == "min", False, True], kind="stable")
    return ranked.iloc[0]

