"""The results contract: ``trials.parquet`` and ``epochs.parquet``, typed, atomic, deduplicated.

:class:`ResultsStore` holds the rows and writes both files atomically (temp
file + rename), so a reader, or a driver killed mid-write, only ever sees a
complete file. Rows are keyed (``trial_id``; ``trial_id, epoch``), so a
result replayed after a resume replaces its earlier copy instead of
duplicating it. Trial aggregates (best top-1, epochs run...) are derived from
the epoch rows on every write, never kept twice.

This module never imports Ray: analysis reads the same files without it.
:mod:`search.callback` holds the Tune callback that feeds the store.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from search.contract import (
    EPOCH_COLUMNS,
    EPOCHS_FILE,
    JOURNAL_FILE,
    PARETO_COLUMN,
    SCHEMA_VERSION,
    SELECTABLE,
    TRIAL_COLUMNS,
    TRIALS_FILE,
    UNFINISHED,
    Status,
    config_column,
    objective_column,
    pareto_mask,
)
from search.journal import Journal
from trainables import metrics as M

__all__ = ["ResultsStore", "epochs_schema", "trials_schema"]

_META = {b"ftsearch.schema_version": SCHEMA_VERSION.encode()}

_EPOCH_FLOATS = tuple(c for c in EPOCH_COLUMNS if c not in ("trial_id", M.EPOCH, M.RESUMED_FROM))
_ARROW_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(),
                "bool": pa.bool_()}


# Arrow types of the contract's columns (search.contract names them).
_EPOCH_TYPES = {"trial_id": pa.string(), M.EPOCH: pa.int64(), M.RESUMED_FROM: pa.int64()}
_TRIAL_TYPES = {"trial_id": pa.string(), "status": pa.string(), "epochs": pa.int64(),
                M.PARAMS: pa.int64(), "node": pa.string(), "checkpoint": pa.string(),
                "error": pa.string()}


def epochs_schema() -> pa.Schema:
    fields = [pa.field(name, _EPOCH_TYPES.get(name, pa.float64())) for name in EPOCH_COLUMNS]
    return pa.schema(fields, metadata=_META)


def trials_schema(param_types: Mapping[str, str], *, pareto: bool) -> pa.Schema:
    columns = [pa.field(name, _TRIAL_TYPES.get(name, pa.float64())) for name in TRIAL_COLUMNS]
    params = [pa.field(config_column(k), _ARROW_TYPES[t]) for k, t in param_types.items()]
    fields = columns[:2] + params + columns[2:]
    if pareto:
        fields.append(pa.field(PARETO_COLUMN, pa.bool_()))
    return pa.schema(fields, metadata=_META)


def _filesystem(directory: str) -> tuple[pafs.FileSystem, str]:
    if "://" in directory:
        return pafs.FileSystem.from_uri(directory)
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return pafs.LocalFileSystem(), str(path)


def _cast(value: Any, arrow_type: str) -> Any:
    if value is None:
        return None
    if arrow_type == "int64":
        return int(value)
    if arrow_type == "float64":
        return float(value)
    if arrow_type == "bool":
        return bool(value)
    return str(value)


class ResultsStore:
    """The rows of both Parquet files for one experiment, and their atomic writer.

    Every update is first appended to the experiment's journal (local storage), so a result
    is on disk before the callback returns even though the Parquet files are rewritten only
    every few seconds; opening a store replays the journal over the files. Only the driver
    that holds the experiment's lock opens one.

    Args:
        directory: ``<storage>/<experiment>``: a local path or a pyarrow URI.
        param_types: Searched parameter -> arrow type name, see
            :func:`search.space.column_types`.
        max_epochs: Epochs a trial runs unless stopped early.
        objectives: (metric, mode) pairs; with more than one, a ``pareto``
            column flags the non-dominated finished trials.
    """

    def __init__(
        self,
        directory: str,
        *,
        param_types: Mapping[str, str],
        max_epochs: int,
        objectives: Sequence[tuple[str, str]] = (("top1", "max"),),
    ) -> None:
        self.directory = directory
        self.param_types = dict(param_types)
        self.max_epochs = max_epochs
        self.objectives = list(objectives)
        self._fs, self._root = _filesystem(directory)
        local = isinstance(self._fs, pafs.LocalFileSystem)
        # Remote storage cannot be appended to: there every update rewrites the files.
        self.journal = Journal(Path(self._root, JOURNAL_FILE)) if local else None
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: dict[tuple[str, int], dict[str, Any]] = {}
        if local:
            _remove_orphaned_temp_files(Path(self._root))
        self._load()

    @property
    def durable_on_update(self) -> bool:
        """Whether every update is on disk at once (local) or only after :meth:`write`."""
        return self.journal is not None

    # --- reading back what an earlier (interrupted) run wrote
    def _read(self, name: str) -> list[dict[str, Any]]:
        path = f"{self._root}/{name}"
        if self._fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        return pq.read_table(path, filesystem=self._fs).to_pylist()

    def _load(self) -> None:
        for row in self._read(EPOCHS_FILE):
            self.epochs[(row["trial_id"], row[M.EPOCH])] = row
        for row in self._read(TRIALS_FILE):
            meta = {k: row.get(k) for k in ("status", "params", "gmacs", "node", "checkpoint",
                                             "error")}
            meta["config"] = {k.removeprefix("config."): v for k, v in row.items()
                              if k.startswith("config.")}
            self.trials[row["trial_id"]] = meta
        for event in self.journal.events() if self.journal else ():
            self._apply(event)

    # --- updates: each one an event, journaled, then applied
    def _update(self, event: dict[str, Any]) -> None:
        if self.journal is not None:
            self.journal.append(event)
        self._apply(event)

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            trial = self._trial(event["trial_id"])
            trial["config"], trial["status"] = event["config"], Status.RUNNING
        elif kind == "result":
            self._apply_result(event)
        elif kind == "checkpoint":
            self._apply_checkpoint(event["trial_id"], event["path"], event.get("top1"),
                                   bool(event.get("replace")))
        elif kind == "finish":
            self._apply_finish(event["trial_id"], event.get("error"),
                               bool(event.get("interrupted")))
        elif kind == "forget":
            lost = set(event["trial_ids"])
            self.trials = {t: row for t, row in self.trials.items() if t not in lost}
            self.epochs = {k: v for k, v in self.epochs.items() if k[0] not in lost}

    def _trial(self, trial_id: str) -> dict[str, Any]:
        return self.trials.setdefault(trial_id, {"status": Status.RUNNING, "config": {}})

    def _config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _cast(config.get(k), t) for k, t in self.param_types.items()}

    def start(self, trial_id: str, config: Mapping[str, Any]) -> None:
        """Records a trial as soon as it starts, so one that fails at once still has its row."""
        self._update({"event": "start", "trial_id": trial_id, "config": self._config(config)})

    def forget_unfinished_except(self, known: set[str]) -> list[str]:
        """Drops unfinished (RUNNING, INTERRUPTED) trials missing from ``known``; returns them.

        A driver killed between a trial's start and Tune's next experiment
        snapshot leaves a row for a trial that the resumed search never heard of
        (it samples a replacement instead), so that row must go.
        """
        lost = [t for t, row in self.trials.items()
                if row["status"] in UNFINISHED and t not in known]
        if lost:
            self._update({"event": "forget", "trial_ids": lost})
        return lost

    def record_result(self, trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any],
                      *, node: str | None = None) -> None:
        """Records one epoch report of a running trial."""
        kept = {k: result.get(k) for k in (*_EPOCH_FLOATS, M.EPOCH, M.RESUMED_FROM, M.PARAMS,
                                           M.GMACS, M.DIVERGED, M.COMPLETE)}
        self._update({"event": "result", "trial_id": trial_id, "config": self._config(config),
                      "result": kept, "node": node})

    def _apply_result(self, event: Mapping[str, Any]) -> None:
        trial_id, result = event["trial_id"], event["result"]
        trial = self._trial(trial_id)
        trial["config"] = event["config"]
        trial["status"] = Status.RUNNING
        trial["params"] = result.get(M.PARAMS, trial.get("params"))
        trial["gmacs"] = result.get(M.GMACS, trial.get("gmacs"))
        trial["node"] = event.get("node") or trial.get("node")
        trial["diverged"] = bool(result.get(M.DIVERGED, False))
        trial["complete"] = bool(result.get(M.COMPLETE, False))
        epoch = int(result[M.EPOCH])
        row = {"trial_id": trial_id, M.EPOCH: epoch}
        row.update({k: _cast(result.get(k), "float64") for k in _EPOCH_FLOATS})
        row[M.RESUMED_FROM] = _cast(result.get(M.RESUMED_FROM), "int64")
        self.epochs[(trial_id, epoch)] = row

    def record_checkpoint(self, trial_id: str, path: str, *, top1: float | None,
                          replace: bool = False) -> None:
        """Keeps the path of the trial's best-scoring checkpoint (with ``replace``, this
        one whatever its score: the recorded one is gone)."""
        event = {"event": "checkpoint", "trial_id": trial_id, "path": path, "top1": top1}
        self._update({**event, "replace": True} if replace else event)

    def _apply_checkpoint(self, trial_id: str, path: str, top1: float | None,
                          replace: bool = False) -> None:
        trial = self._trial(trial_id)
        best = trial.get("checkpoint_top1")
        if (replace or trial.get("checkpoint") is None or best is None
                or (top1 is not None and top1 >= best)):
            trial["checkpoint"], trial["checkpoint_top1"] = path, top1

    def finish(self, trial_id: str, *, error: str | None = None,
               interrupted: bool = False) -> str:
        """Marks a trial ended; returns its status.

        Args:
            trial_id: The trial.
            error: Why it failed: the status is ERROR.
            interrupted: The search, not the trial, ended it (fail-fast, Ctrl-C): the status
                is INTERRUPTED, unless it had already run every epoch.
        """
        self._update({"event": "finish", "trial_id": trial_id, "error": error,
                      "interrupted": interrupted})
        return self.trials[trial_id]["status"]

    def interrupt_unfinished(self) -> list[str]:
        """Marks every RUNNING trial INTERRUPTED (the run is ending without them); returns them."""
        running = [t for t, row in self.trials.items() if row["status"] == Status.RUNNING]
        for trial_id in running:
            self.finish(trial_id, interrupted=True)
        return running

    def _apply_finish(self, trial_id: str, error: str | None, interrupted: bool) -> None:
        trial = self._trial(trial_id)
        runs = [e for (t, e) in self.epochs if t == trial_id]
        # A classical head's one result is complete: it has no other epoch to run.
        ran_all = trial.get("complete") or (max(runs) if runs else 0) >= self.max_epochs
        if error is not None:
            status = Status.ERROR
        elif trial.get("diverged"):
            status = Status.DIVERGED
        elif ran_all:
            status = Status.TERMINATED
        else:
            status = Status.INTERRUPTED if interrupted else Status.STOPPED_EARLY
        trial["status"] = status
        trial["error"] = error if status == Status.ERROR else None

    # --- derived tables
    def _trial_rows(self) -> list[dict[str, Any]]:
        by_trial: dict[str, list[dict[str, Any]]] = {}
        for (trial_id, _), row in sorted(self.epochs.items()):
            by_trial.setdefault(trial_id, []).append(row)
        rows = []
        for trial_id, trial in self.trials.items():
            eps = by_trial.get(trial_id, [])
            top1 = [r[M.TOP1] for r in eps if r[M.TOP1] is not None and not math.isnan(r[M.TOP1])]
            top5 = [r[M.TOP5] for r in eps if r[M.TOP5] is not None and not math.isnan(r[M.TOP5])]
            row = {"trial_id": trial_id, "status": trial["status"]}
            row.update({config_column(k): _cast(trial["config"].get(k), t)
                        for k, t in self.param_types.items()})
            row.update({
                "best_top1": max(top1) if top1 else None,
                "last_top1": eps[-1][M.TOP1] if eps else None,
                "best_top5": max(top5) if top5 else None,
                "last_val_loss": eps[-1][M.VAL_LOSS] if eps else None,
                "epochs": eps[-1][M.EPOCH] if eps else 0,
                "params": _cast(trial.get("params"), "int64"),
                "gmacs": trial.get("gmacs"),
                "train_seconds": sum(r[M.SECONDS] or 0.0 for r in eps),
                "node": trial.get("node"),
                "checkpoint": trial.get("checkpoint"),
                "error": trial.get("error"),
            })
            rows.append(row)
        if len(self.objectives) > 1:
            self._flag_pareto(rows)
        return rows

    def _flag_pareto(self, rows: list[dict[str, Any]]) -> None:
        columns = [objective_column(metric) for metric, _ in self.objectives]
        finished = [r for r in rows if r["status"] in SELECTABLE]
        front = pareto_mask([[r[c] for c in columns] for r in finished],
                            [mode for _, mode in self.objectives])
        on_front = {r["trial_id"] for r, flag in zip(finished, front, strict=True) if flag}
        for row in rows:
            row[PARETO_COLUMN] = row["trial_id"] in on_front

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """(trials, epochs) as typed Arrow tables."""
        trials = pa.Table.from_pylist(
            self._trial_rows(),
            schema=trials_schema(self.param_types, pareto=len(self.objectives) > 1))
        epochs = pa.Table.from_pylist([self.epochs[k] for k in sorted(self.epochs)],
                                      schema=epochs_schema())
        return trials, epochs

    def write(self) -> None:
        """Rewrites both files atomically (a temp file in the same directory, then a rename),
        then empties the journal they now include."""
        trials, epochs = self.tables()
        for name, table in ((EPOCHS_FILE, epochs), (TRIALS_FILE, trials)):
            final = f"{self._root}/{name}"
            tmp = f"{self._root}/{_temp_name(name, uuid.uuid4().hex)}"
            try:
                pq.write_table(table, tmp, filesystem=self._fs)
                if isinstance(self._fs, pafs.LocalFileSystem):
                    os.replace(tmp, final)  # atomic on POSIX
                else:
                    self._fs.move(tmp, final)
            except BaseException:
                # Disk full, Ctrl-C: the old file stays whole and no temp file is left.
                with contextlib.suppress(OSError):
                    self._fs.delete_file(tmp)
                raise
        if self.journal is not None:
            self.journal.clear()


def _temp_name(name: str, token: str = "*") -> str:
    """A temp file's name for ``name``; with the default token, the glob of all of them."""
    return f".{name}.{token}.tmp"


def _remove_orphaned_temp_files(root: Path) -> None:
    # A driver killed mid-write leaves its temp file; only the lock holder opens a store,
    # so no other writer's temp file can be among them.
    for name in (EPOCHS_FILE, TRIALS_FILE):
        for orphan in root.glob(_temp_name(name)):
            with contextlib.suppress(OSError):
                orphan.unlink()
