"""Equal fidelity: trials compared at one common epoch, not at whatever epoch each reached.

A scheduler (ASHA, HyperBand) stops weak-looking trials after 1 or 3 epochs and lets the
others run to the end, so a trial's ``best_top1`` mixes "how good is this config" with
"how long was it trained". Comparing configs on it (importance, a top-1-per-parameter
plot) partly measures what the scheduler cut. This module is the one place that decides
how trials are put on an equal footing; importance, the plots and the run's findings read
its :data:`TOP1_AT` column and state its :class:`Fidelity`.

The rule:

* The common epoch is the highest epoch at which at least ``min_trials`` trials are
  measured (``min_trials`` capped at the number of trials with any epoch). Under ASHA
  and HyperBand the candidates are the rungs, where stopped trials end: the highest rung
  enough trials passed is the most-trained comparison that still has a sample.
* A trial is measured at epoch ``e`` when it reached ``e``, or when it ended TERMINATED
  with fewer epochs: it was complete (a classical head is fitted in one go, a shorter
  experiment ran its every epoch) and training it longer is not possible, so its final
  value stands for epoch ``e``. A trial that stopped before ``e`` for any other reason
  (the scheduler, divergence, an error, an interrupted or still running search) is left
  out: it might have got better.
* Top-1 at epoch ``e`` is the best validation top-1 of epochs 1..e, the same "best so far"
  ``best_top1`` is and the checkpoint ``export`` keeps; a trial stopped at ``e`` would
  deliver that model.

Statuses do not otherwise matter here: a value at epoch ``e`` is a measurement whatever
happened after ``e``. Callers that want only finished trials filter ``trials`` first.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from search.contract import Status
from trainables import metrics as M

__all__ = ["MIN_TRIALS", "TOP1_AT", "Fidelity", "equal_fidelity"]

TOP1_AT = "top1_at_epoch"  # column equal_fidelity adds: top-1 (%) at the common epoch
MIN_TRIALS = 4  # default: trials that must be measured at the common epoch


@dataclass(frozen=True)
class Fidelity:
    """The common epoch trials are compared at, and how many could be.

    Attributes:
        epoch: The common epoch every compared trial is measured at.
        trials: Trials measured: they reached ``epoch``, or ended TERMINATED before it
            (complete: a classical head, one epoch by nature).
        total: Trials with at least one epoch.
        min_trials: Trials the rule asked for at ``epoch`` (after capping); None when the
            caller chose the epoch.
        complete_before: Of ``trials``, those that ended TERMINATED before ``epoch``.
    """

    epoch: int
    trials: int
    total: int
    min_trials: int | None = None
    complete_before: int = 0

    def describe(self) -> str:
        """One line for a report, e.g. "top-1 at epoch 2, the highest epoch reached by at
        least 4 trials (7 of 12 trials; best top-1 up to that epoch)"."""
        text = f"top-1 at epoch {self.epoch}"
        if self.min_trials is not None:
            text += f", the highest epoch reached by at least {self.min_trials} trials"
        counts = f"{self.trials} of {self.total} trials"
        if self.complete_before:
            counts += f", {self.complete_before} complete before it with their final top-1"
        return f"{text} ({counts}; best top-1 up to that epoch)"


def _keys(trials: pd.DataFrame, epochs: pd.DataFrame) -> list[str]:
    # trial_ids are unique within an experiment only: several experiments, concatenated
    # with an `experiment` column, are keyed by (experiment, trial_id).
    if "experiment" in trials.columns and "experiment" in epochs.columns:
        return ["experiment", "trial_id"]
    if "experiment" in trials.columns and trials["experiment"].nunique() > 1:
        raise ValueError("trials of several experiments need an `experiment` column in "
                         "epochs too: trial ids repeat across experiments")
    return ["trial_id"]


def _per_trial(trials: pd.DataFrame, epochs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per trial with a top-1: its keys, status, last epoch and its epochs' top-1."""
    ep = epochs.loc[epochs[M.TOP1].notna(), [*keys, M.EPOCH, M.TOP1]]
    ep = ep.merge(trials[[*keys, "status"]].drop_duplicates(keys), on=keys)
    reached = ep.groupby(keys, sort=False)[M.EPOCH].max().rename("reached")
    return ep.merge(reached.reset_index(), on=keys)


def _measured_at(per: pd.DataFrame, epoch: int) -> pd.Series:
    return (per["reached"] >= epoch) | (per["status"] == Status.TERMINATED)


def equal_fidelity(trials: pd.DataFrame, epochs: pd.DataFrame, *, min_trials: int = MIN_TRIALS,
                   epoch: int | None = None) -> tuple[pd.DataFrame, Fidelity | None]:
    """The trials comparable at one epoch, with their top-1 there.

    Args:
        trials: trials.parquet rows (``trial_id``, ``status``; ``experiment`` when rows of
            several experiments are concatenated, as in a leaderboard).
        epochs: epochs.parquet rows (``trial_id``, ``epoch``, ``top1``; ``experiment`` to
            match).
        min_trials: Trials that must be measured at the chosen epoch (capped at the trials
            with any epoch).
        epoch: Measure at this epoch instead of choosing one (to show other trials at the
            epoch another analysis chose).

    Returns:
        A copy of the rows of ``trials`` measured at the common epoch, in their order,
        with :data:`TOP1_AT` = the best top-1 of epochs 1..epoch (for a trial that ended
        TERMINATED before it, its final best); and the :class:`Fidelity`. An empty frame
        and None when fewer than 2 trials have any epoch.

    Raises:
        ValueError: ``min_trials`` or ``epoch`` below 1.
    """
    if min_trials < 1 or (epoch is not None and epoch < 1):
        raise ValueError(f"min_trials and epoch must be at least 1, got {min_trials}, {epoch}")
    keys = _keys(trials, epochs)
    per = _per_trial(trials, epochs, keys)
    last = per.drop_duplicates(keys)
    total = len(last)
    if total < 2:
        return trials.iloc[:0].assign(**{TOP1_AT: pd.Series(dtype=float)}), None
    need = min(min_trials, total)
    if epoch is None:
        # Measured counts only fall as the epoch rises, and only just after a trial that was
        # cut short ended, so the answer is one of the epochs trials ended at (the rungs).
        epoch = next(int(e) for e in sorted(last["reached"].unique(), reverse=True)
                     if _measured_at(last, e).sum() >= need)
        rule: int | None = need
    else:
        rule = None
    upto = per[per[M.EPOCH] <= epoch]
    values = (upto[_measured_at(upto, epoch)].groupby(keys, sort=False)[M.TOP1].max()
              .rename(TOP1_AT).reset_index())
    early = last[(last["reached"] < epoch) & _measured_at(last, epoch)]
    at = values.set_index(keys)[TOP1_AT]
    index = trials.set_index(keys).index
    kept = index.isin(at.index)
    out = trials[kept].copy()
    out[TOP1_AT] = at.reindex(index[kept]).to_numpy(dtype=float)
    return out, Fidelity(epoch=epoch, trials=len(out), total=total, min_trials=rule,
                         complete_before=len(early))
