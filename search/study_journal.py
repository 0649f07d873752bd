"""The search as an Optuna study in the experiment directory, for ``optuna-dashboard``.

Tune's Optuna searcher keeps its study in memory and Tune pickles it with the experiment,
so after a killed driver the resumed search holds an older copy: it cannot be the study a
dashboard watches. :class:`StudyJournal` mirrors the results store instead, into an
Optuna ``JournalStorage`` file, ``<storage>/<name>/optuna-journal.log``
(:data:`~search.contract.STUDY_JOURNAL_FILE`), appended (and fsynced) by Optuna as trials
start, report epochs and end, for every search algorithm (grid and random too):

- a trial that starts becomes an Optuna trial in state RUNNING with its sampled parameters
  (those it has: conditional ones only where they apply) and user attributes ``trial_id``
  (Tune's) and ``status`` (its ``trials.parquet`` status);
- each epoch of a single-objective search reports the objective's value at that epoch as an
  intermediate value (Optuna has none for several objectives), at most once per epoch;
- a TERMINATED trial is COMPLETE with the values of its last result, the values Tune tells
  its own Optuna searcher (so ``top1`` is ``last_top1``, not the leaderboard's
  ``best_top1``); STOPPED_EARLY is PRUNED (single-objective: valued, as Optuna does, by
  its last intermediate value); ERROR and DIVERGED are FAIL; an INTERRUPTED trial stays
  RUNNING, as ``ftsearch resume`` continues it.

Every write is derived from the store's rows, keyed by ``trial_id``, so it is idempotent: a
resumed driver opens the same file, finds each trial by its ``trial_id`` attribute and
writes only what the file lacks (a trial the dead driver started or finished after its
last journal write included). A trial the resumed search drops (its driver died before
Tune saved it) is FAIL with user attribute ``forgotten``; one that ended ERROR and that a
resume runs again gets a new Optuna trial with ``retry_of`` (the failed trial's number),
as Optuna's own ``RetryFailedTrialCallback`` does: a finished Optuna trial cannot reopen.

Only local storage has the file: ``JournalFileBackend`` appends to a POSIX file and
optuna-dashboard reads one, and a copy on the driver's disk would not be in the
experiment directory. The Parquet files are the results contract, so a failing write
(disk full, a broken file) does not stop the search: it is reported once on stderr and
this driver writes the study no more; ``ftsearch resume`` catches it up.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.contract import CONFIG_FILE, STUDY_JOURNAL_FILE, Status
from search.storage import is_uri

if TYPE_CHECKING:
    import optuna

    from search.config import Distribution
    from search.store import ResultsStore

__all__ = ["FORGOTTEN_ATTR", "RETRY_ATTR", "STATUS_ATTR", "TRIAL_ID_ATTR", "StudyJournal",
           "load_study"]

# User attributes of each Optuna trial.
TRIAL_ID_ATTR = "trial_id"  # Tune's trial id, the key of trials.parquet
STATUS_ATTR = "status"  # the trial's trials.parquet status
FORGOTTEN_ATTR = "forgotten"  # True: the resumed search never knew this trial
RETRY_ATTR = "retry_of"  # the number of the FAIL trial this one runs again
_ERROR_ATTR = "error"

_ERROR_CHARS = 2000  # of the error text kept as a user attribute (the full text: Parquet)
_FREEZE_FRACTION = "freeze_fraction"  # search.space.FREEZE_FRACTION (no torch import here)


def _journal_storage(path: Path) -> optuna.storages.JournalStorage:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def load_study(directory: str | Path) -> optuna.Study:
    """The Optuna study of the experiment in ``directory``, as optuna-dashboard shows it."""
    import optuna

    path = Path(directory, STUDY_JOURNAL_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Optuna study journal (remote storage, or a run "
                                f"from before ftsearch wrote one)")
    storage = _journal_storage(path)
    return optuna.load_study(study_name=None, storage=storage)


def _cast(value: Any, column_type: str) -> Any:
    # As the store casts a config value for its `config.<name>` column.
    if column_type == "int64":
        return int(value)
    if column_type == "float64":
        return float(value)
    if column_type == "bool":
        return bool(value)
    return str(value)


def _on_grid(value: float, low: float, high: float, step: float | None) -> bool:
    if not low <= value <= high:
        return False
    if not step:
        return True
    k = (value - low) / step
    return abs(k - round(k)) < 1e-6


def _distribution(spec: Distribution | None, value: Any, column_type: str
                  ) -> optuna.distributions.BaseDistribution | None:
    """The Optuna distribution of a trial's ``value``; None leaves the parameter out.

    The config's declared one where the value lies in it (Optuna requires a parameter's
    distribution kind, and a categorical's choices, to be the same in every trial).
    Derived values (a fraction's ``freeze_depth``, ``gamma`` under the compound
    constraint, a grid's rounded points) widen the declared range, without its step.
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if spec is not None and spec.type == "choice":
        choices = tuple(_cast(v, column_type) for v in spec.values or ())
        # A derived value outside the choices (head `linear` for random weights) cannot
        # join a categorical whose choices are fixed for the study: left out.
        return CategoricalDistribution(choices) if value in choices else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if spec is None or spec.type == "fraction":  # derived: no declared range of its own
        low = high = value
        step, log = None, False
    else:
        low, high, step, log = spec.low, spec.high, spec.step, spec.type == "loguniform"
    if not _on_grid(value, low, high, step):
        low, high, step = min(low, value), max(high, value), None
    if column_type == "int64":
        return IntDistribution(int(low), int(high), step=int(step or 1))
    with warnings.catch_warnings():  # a step that does not divide the range: Optuna trims
        warnings.simplefilter("ignore")
        return FloatDistribution(low, high, log=log, step=None if log else step)


@dataclass
class _Entry:
    """What the journal holds of one trial id: its latest Optuna trial."""

    number: int
    storage_id: int
    state: optuna.trial.TrialState
    status: str | None
    steps: set[int] = field(default_factory=set)


class StudyJournal:
    """The Optuna study file of one experiment, kept in step with its results store.

    Args:
        directory: ``<storage>/<experiment>``; a URI writes nothing.
        objectives: (metric, mode) pairs: the study's directions and metric names.
        param_types: Searched parameter -> arrow type name (the store's).
    """

    def __init__(self, directory: str, *, objectives: Sequence[tuple[str, str]],
                 param_types: Mapping[str, str]) -> None:
        self.directory = directory
        self.path = None if is_uri(directory) else Path(directory, STUDY_JOURNAL_FILE)
        self.objectives = list(objectives)
        self.param_types = dict(param_types)
        self._study: optuna.Study | None = None
        self._storage: optuna.storages.JournalStorage | None = None
        self._study_id = 0
        self._space: dict[str, Distribution] = {}
        self._trials: dict[str, _Entry] = {}
        self._broken = False

    # --- the one guard: the Parquet files are the contract, the study a view of them
    def sync(self, store: ResultsStore, trial_ids: Iterable[str] | None = None) -> None:
        """Writes what the journal lacks of ``trial_ids`` (default: every trial).

        With the default, Optuna trials still RUNNING whose trial id the store no longer
        has (the resumed search dropped it) end as FAIL, ``forgotten``.
        """
        if self.path is None or self._broken:
            return
        try:
            self._open()
            ids = list(store.trials) if trial_ids is None else list(trial_ids)
            for trial_id in ids:
                if trial_id in store.trials:
                    epochs = sorted((e, row) for (t, e), row in store.epochs.items()
                                    if t == trial_id)
                    self._sync_trial(trial_id, store.trials[trial_id], epochs)
            if trial_ids is None:
                self._forget(set(store.trials))
        except Exception as err:  # noqa: BLE001 - any failure: the search goes on without it
            self._broken = True
            print(f"ftsearch: warning: the Optuna study journal {self.path} is not updated "
                  f"any more by this run ({type(err).__name__}: {err}); trials.parquet and "
                  f"epochs.parquet are not affected, and `ftsearch resume` catches it up",
                  file=sys.stderr, flush=True)

    # --- opening: the study, the config's space, and what the file already holds
    def _open(self) -> None:
        if self._study is not None:
            return
        import optuna

        from search.config import load_config

        directory = Path(self.directory)
        cfg = load_config(directory / CONFIG_FILE,
                          [f"storage={directory.parent}", f"name={directory.name}"])
        self._space = cfg.searched()
        _cut_partial_line(self.path)
        storage = _journal_storage(self.path)
        existing = storage.get_all_studies()
        # One study per file; a copied experiment directory keeps its study's old name.
        name = existing[0].study_name if existing else directory.name
        study = optuna.create_study(
            storage=storage, study_name=name, load_if_exists=True,
            directions=["maximize" if mode == "max" else "minimize"
                        for _, mode in self.objectives])
        if study.metric_names is None:
            with warnings.catch_warnings():  # experimental in Optuna; the dashboard shows them
                warnings.simplefilter("ignore")
                study.set_metric_names([metric for metric, _ in self.objectives])
        self._study_id = storage.get_study_id_from_name(name)
        for frozen in storage.get_all_trials(self._study_id, deepcopy=False):
            trial_id = frozen.user_attrs.get(TRIAL_ID_ATTR)
            if trial_id is None:  # not ours (added by hand): never touched
                continue
            known = self._trials.get(trial_id)
            if known is None or frozen.number > known.number:
                storage_id = storage.get_trial_id_from_study_id_trial_number(
                    self._study_id, frozen.number)
                self._trials[trial_id] = _Entry(
                    frozen.number, storage_id, frozen.state,
                    frozen.user_attrs.get(STATUS_ATTR), set(frozen.intermediate_values))
        self._study, self._storage = study, storage

    # --- one trial
    def _sync_trial(self, trial_id: str, trial: Mapping[str, Any],
                    epochs: list[tuple[int, Mapping[str, Any]]]) -> None:
        import optuna

        status = trial["status"]
        entry = self._trials.get(trial_id)
        if entry is not None and entry.state.is_finished():
            # Only an errored trial runs again (a resume continues ERROR trials); any other
            # finished one is final, even if a resume replays its last epochs.
            if not (entry.state == optuna.trial.TrialState.FAIL
                    and entry.status == Status.ERROR and status != Status.ERROR):
                return
            entry = self._create(trial_id, trial, status, retry_of=entry.number)
        elif entry is None:
            entry = self._create(trial_id, trial, status)
        self._report(entry, epochs)
        if entry.status != status:
            self._set_attr(entry, STATUS_ATTR, status)
            if status == Status.ERROR and trial.get("error"):
                self._set_attr(entry, _ERROR_ATTR, str(trial["error"])[-_ERROR_CHARS:])
            entry.status = status
        self._finish(entry, status, trial, epochs)

    def _create(self, trial_id: str, trial: Mapping[str, Any], status: str, *,
                retry_of: int | None = None) -> _Entry:
        import optuna

        params, distributions = {}, {}
        for name, value in (trial.get("config") or {}).items():
            if value is None or name not in self.param_types:
                continue  # a conditional parameter this trial does not have
            spec = self._space.get("freeze_depth" if name == _FREEZE_FRACTION else name)
            dist = _distribution(spec, value, self.param_types[name])
            if dist is not None:
                params[name], distributions[name] = value, dist
        attrs: dict[str, Any] = {TRIAL_ID_ATTR: trial_id, STATUS_ATTR: status}
        if retry_of is not None:
            attrs[RETRY_ATTR] = retry_of
        template = optuna.trial.create_trial(  # validates the params against distributions
            state=optuna.trial.TrialState.RUNNING, params=params,
            distributions=distributions, user_attrs=attrs)
        # One journal line: a trial is never in the file without its trial id.
        storage_id = self._storage.create_new_trial(self._study_id, template_trial=template)
        entry = _Entry(self._storage.get_trial_number_from_id(storage_id), storage_id,
                       template.state, status)
        self._trials[trial_id] = entry
        return entry

    def _report(self, entry: _Entry, epochs: list[tuple[int, Mapping[str, Any]]]) -> None:
        if len(self.objectives) != 1 or entry.state.is_finished():
            return
        metric = self.objectives[0][0]
        for epoch, row in epochs:
            value = row.get(metric)
            if epoch in entry.steps or value is None or not math.isfinite(value):
                continue
            self._storage.set_trial_intermediate_value(entry.storage_id, epoch, float(value))
            entry.steps.add(epoch)

    def _set_attr(self, entry: _Entry, key: str, value: Any) -> None:
        self._storage.set_trial_user_attr(entry.storage_id, key, value)

    def _values(self, trial: Mapping[str, Any],
                epochs: list[tuple[int, Mapping[str, Any]]]) -> list[float] | None:
        # The last result's values: what Tune's searcher is told (its `result`).
        last = epochs[-1][1] if epochs else {}
        values = []
        for metric, _ in self.objectives:
            value = last.get(metric) if metric in last else trial.get(metric)
            if value is None or not math.isfinite(value):
                return None
            values.append(float(value))
        return values

    def _finish(self, entry: _Entry, status: str, trial: Mapping[str, Any],
                epochs: list[tuple[int, Mapping[str, Any]]]) -> None:
        from optuna.trial import TrialState

        values = None
        if status == Status.TERMINATED:
            values = self._values(trial, epochs)
            state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        elif status == Status.STOPPED_EARLY:
            state = TrialState.PRUNED
        elif status in (Status.ERROR, Status.DIVERGED):
            state = TrialState.FAIL
        else:  # RUNNING, or INTERRUPTED: a resume continues it
            return
        frozen = self._study.tell(entry.number, values, state=state, skip_if_finished=True)
        entry.state = frozen.state

    def _forget(self, known: set[str]) -> None:
        from optuna.trial import TrialState

        for trial_id, entry in self._trials.items():
            if trial_id in known or entry.state.is_finished():
                continue
            self._set_attr(entry, FORGOTTEN_ATTR, True)
            entry.state = self._study.tell(entry.number, state=TrialState.FAIL,
                                           skip_if_finished=True).state


def _cut_partial_line(path: Path) -> None:
    """Removes a last line cut by a killed driver, which the next append would corrupt.

    Optuna skips such a line when it is last, but a line appended after it joins it and
    both fail to parse. Only the driver holding the experiment's lock writes the file.
    """
    if not path.is_file():
        return
    with path.open("rb+") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        handle.truncate(handle.read().rfind(b"\n") + 1)
