"""Tune callback on the driver: every result into the :class:`~search.store.ResultsStore`.

It also mirrors the search into the experiment's Optuna study journal
(:mod:`search.study_journal`, for optuna-dashboard), prints a one-line progress summary
(trials running / done / stopped early, best top-1 so far, elapsed) when trials end (at most every
PROGRESS_INTERVAL_S seconds), and stops a hopeless search:
a trial that fails in setup (``TrialSetupError``, :data:`trainables.metrics.SETUP_FAILURE`:
weights or data
that cannot load) fails the same way in every retry and every later trial, so the first
one ends the search (:class:`FailFast`) instead of burning ``max_failures`` retries per
trial. Other failures (a lost node, OOM on one configuration) retry as configured.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune

from search.contract import STATUSES, Status
from search.signing import sign_files, tune_state_files
from search.store import ResultsStore
from search.study_journal import StudyJournal
from trainables import metrics as M

__all__ = ["FailFast", "ParquetCallback"]



def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text = Path(path).read_text(errors="replace").strip()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        # The last line of a traceback names the exception: it goes first, then context.
        return "\n".join([lines[-1], *lines[-9:-1]])[-4000:] if lines else text
    return str(getattr(trial, "error_msg", None) or "trial failed (no error file)")


def _cut_short(trial: Any) -> bool:
    """Whether Tune ended ``trial`` without a final result: Ctrl-C, fail-fast, time budget.

    A trial that returned, or that the scheduler stopped, ends on a result marked ``done``;
    one the search stopped (Tune calls the same on_trial_complete) does not.
    """
    return not (trial.last_result or {}).get("done", False)


def _staging_dirs(experiment: str) -> list[Path]:
    """Tune's driver staging directories of ``experiment`` in this Ray session.

    Tune saves its state there first (``StorageContext.experiment_driver_staging_path``:
    ``<session>/artifacts/<timestamp>/<experiment>/driver_artifacts``); the controller's
    storage context is not handed to callbacks, and its state may be saved before any trial
    exists, so the directory is found by its layout.
    """
    from ray.train.constants import _get_ray_train_session_dir

    return sorted(Path(_get_ray_train_session_dir()).glob(f"*/{experiment}/driver_artifacts"))


class FailFast(tune.Stopper):
    """Stops the whole search once a trial failed in setup; Tune asks it after every step.

    The callback sets :attr:`reason`; both live in the same Tune run config (and pickle),
    so a resumed driver gets a fresh, unset one.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.reason is not None


PROGRESS_INTERVAL_S = 10.0  # seconds between two progress lines, at least


class ParquetCallback(tune.Callback):
    """Feeds a :class:`ResultsStore` and prints progress.

    Tune pickles callbacks with the experiment state; the rows themselves are
    re-read from Parquet on a resumed driver, never pickled.
    """

    def __init__(self, *, directory: str, param_types: Mapping[str, str], max_epochs: int,
                 objectives: Sequence[tuple[str, str]], fail_fast: FailFast | None = None,
                 sign_state: bool = False, min_interval_s: float = 2.0) -> None:
        self.fail_fast = fail_fast
        self.sign_state = sign_state
        self.store_args = {"directory": directory, "param_types": dict(param_types),
                           "max_epochs": max_epochs, "objectives": list(objectives)}
        self.min_interval_s = min_interval_s
        self._store: ResultsStore | None = None
        self._study: StudyJournal | None = None
        self._reconciled = False
        self._deferred: BaseException | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; the rows live in Parquet. A resumed
        # driver builds new callbacks anyway (search.tuner.restore_tuner).
        return {**self.__dict__, "_store": None, "_study": None, "_reconciled": False,
                "_deferred": None}

    @contextlib.contextmanager
    def _raised_at_step_end(self) -> Iterator[None]:
        """Keeps what a store update raises for :meth:`on_step_end` to raise.

        Tune wraps ``on_trial_complete`` and ``on_checkpoint`` in its own ``except``, which
        prints a traceback to the console and goes on (a full disk then fails every later
        write once more). Raised from ``on_step_end`` the error ends ``fit()`` like one from
        ``on_trial_result``: the runner closes the run out and prints it once. Deferring is
        safe for these two, where it would not be for an epoch's result: a trial's end is
        recorded again when the resumed driver sees it, and a checkpoint Tune kept but the
        store missed is taken from Tune's restored trials (:meth:`_checkpoint_from_tune`).
        """
        try:
            yield
        except Exception as err:  # noqa: BLE001 - re-raised at the end of this step
            if self._deferred is None:
                self._deferred = err

    def _raise_deferred(self) -> None:
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            raise err

    def get_state(self) -> dict | None:
        # Tune calls this while it saves its experiment state, right after writing the
        # experiment and search state files into its staging directory and before a
        # background copy moves them into the experiment directory: sign them now.
        if self.sign_state:
            directory = self.store_args["directory"]
            for staging in _staging_dirs(Path(directory).name):
                sign_files(directory, tune_state_files(staging))
        return None  # nothing to save: the rows live in Parquet

    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            # (Re)loads what is already on disk: a resumed run continues the same files.
            self._store = ResultsStore(**self.store_args)
            self._last_write = 0.0
            self._start = time.monotonic()
            self._last_ended: dict[str, int] = {}
            self._last_line = -PROGRESS_INTERVAL_S
        return self._store

    def _sync_study(self, trial_ids: list[str] | None = None) -> None:
        # After the store's update, never before: the study is derived from its rows.
        if self._study is None:
            self._study = StudyJournal(
                self.store_args["directory"], objectives=self.store_args["objectives"],
                param_types=self.store_args["param_types"])
        self._study.sync(self.store, trial_ids)

    def setup(self, **info: Any) -> None:
        self.store  # noqa: B018 - load existing rows before the first result

    def _write(self, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        # Without a journal (remote storage) the files are the only durable copy.
        force = force or not self.store.durable_on_update
        if force or now - self._last_write >= self.min_interval_s:
            self.store.write()
            self._last_write = now
            self._progress(final)

    def _progress(self, final: bool = False) -> None:
        counts = {s: 0 for s in STATUSES}
        for trial in self.store.trials.values():
            counts[trial["status"]] += 1
        top1 = [r[M.TOP1] for r in self.store.epochs.values()
                if r[M.TOP1] is not None and not math.isnan(r[M.TOP1])]
        best = max(top1) if top1 else None
        elapsed = time.monotonic() - self._start
        ended = {s: n for s, n in counts.items() if s != Status.RUNNING}
        # One line when trials have ended (not on every epoch), at most one per
        # PROGRESS_INTERVAL_S: a search of many short trials keeps a short output. The
        # last one is never held back: it gives the run's final counts.
        too_soon = not final and elapsed - self._last_line < PROGRESS_INTERVAL_S
        if ended == self._last_ended or too_soon:
            return
        self._last_ended = ended
        self._last_line = elapsed
        line = (f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] trials: "
                f"{counts[Status.RUNNING]} running, {counts[Status.TERMINATED]} done, "
                f"{counts[Status.STOPPED_EARLY]} stopped early, {counts[Status.ERROR]} errored, "
                f"{counts[Status.DIVERGED]} diverged | best top-1 so far: "
                + ("-" if best is None else f"{best:.2f}%"))
        print(line, file=sys.stdout, flush=True)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._reconciled:
            # First step of this driver: Tune now knows every restored trial.
            self._reconciled = True
            changed = bool(self.store.forget_unfinished_except({t.trial_id for t in trials}))
            for trial in trials:
                changed |= self._checkpoint_from_tune(trial)
            if changed:
                self._write(force=True)
            # Catches the study up with the store: what a killed driver did not write,
            # trials it left RUNNING that ended meanwhile, trials the store just dropped.
            self._sync_study()

    def _checkpoint_from_tune(self, trial: Any) -> bool:
        """Points the store at the checkpoint Tune kept for ``trial`` where the recorded one
        is missing: its record was lost (a full disk in ``on_checkpoint``, after which Tune
        registered the checkpoint and deleted the one before). Returns whether it did."""
        row = self.store.trials.get(trial.trial_id)
        kept = trial.run_metadata.checkpoint_manager.best_checkpoint_result
        if row is None or kept is None or kept.checkpoint is None:
            return False
        recorded = row.get("checkpoint")
        # A remote path cannot be checked here; a local one that exists is the store's own.
        if recorded == kept.checkpoint.path or (recorded and ("://" in recorded
                                                              or os.path.exists(recorded))):
            return False
        self.store.record_checkpoint(trial.trial_id, kept.checkpoint.path,
                                     top1=(kept.metrics or {}).get(M.TOP1), replace=True)
        return True

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.store.start(trial.trial_id, trial.config)
        self._sync_study([trial.trial_id])
        self._write()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if M.EPOCH not in result:
            return
        node = result.get("node_id") or result.get("node_ip")
        self.store.record_result(trial.trial_id, trial.config, result, node=node)
        self._sync_study([trial.trial_id])
        self._write()

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any,
                      **info: Any) -> None:
        top1 = (trial.last_result or {}).get(M.TOP1)
        with self._raised_at_step_end():
            self.store.record_checkpoint(trial.trial_id, checkpoint.path, top1=top1)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                          **info: Any) -> None:
        with self._raised_at_step_end():
            self.store.finish(trial.trial_id, interrupted=_cut_short(trial))
            self._sync_study([trial.trial_id])
            self._write(force=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._raise_deferred()

    def _check_setup_failure(self, trial: Any) -> str:
        text = _error_text(trial)
        if self.fail_fast is not None and M.SETUP_FAILURE in text and not self.fail_fast.reason:
            self.fail_fast.reason = text
        return text

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # A retry is about to start; a setup failure would only repeat.
        text = self._check_setup_failure(trial)
        if self.fail_fast is not None and self.fail_fast.reason:
            self.store.finish(trial.trial_id, error=text)
            self._sync_study([trial.trial_id])
            self._write(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.store.finish(trial.trial_id, error=self._check_setup_failure(trial))
        self._sync_study([trial.trial_id])
        self._write(force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._raise_deferred()
        # Trials the search stopped without a result of theirs (fail-fast, time budget)
        # end with the experiment; none stays RUNNING in trials.parquet.
        for trial in trials:
            row = self.store.trials.get(trial.trial_id)
            if row is None or row["status"] != Status.RUNNING:
                continue
            if trial.status == "ERROR":
                self.store.finish(trial.trial_id, error=_error_text(trial))
            elif trial.status == "TERMINATED":
                self.store.finish(trial.trial_id, interrupted=_cut_short(trial))
        # Ctrl-C or SIGTERM: the rest were cut off mid-run; `ftsearch resume` continues them.
        self.store.interrupt_unfinished()
        self._sync_study()
        self._write(force=True, final=True)
