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
    PARETO_COLUMN,
    SCHEMA_VERSION,
    SELECTABLE,
    TRIAL_COLUMNS,
    TRIALS_FILE,
    Status,
    config_column,
    objective_column,
    pareto_mask,
)
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
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: dict[tuple[str, int], dict[str, Any]] = {}
        self._load()

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

    # --- updates
    def _trial(self, trial_id: str) -> dict[str, Any]:
        return self.trials.setdefault(trial_id, {"status": Status.RUNNING, "config": {}})

    def start(self, trial_id: str, config: Mapping[str, Any]) -> None:
        """Records a trial as soon as it starts, so one that fails at once still has its row."""
        trial = self._trial(trial_id)
        trial["config"] = {k: config.get(k) for k in self.param_types}
        trial["status"] = Status.RUNNING

    def forget_unfinished_except(self, known: set[str]) -> list[str]:
        """Drops RUNNING trials missing from ``known``; returns their ids.

        A driver killed between a trial's start and Tune's next experiment
        snapshot leaves a row for a trial that the resumed search never heard of
        (it samples a replacement instead), so that row must go.
        """
        lost = [t for t, row in self.trials.items()
                if row["status"] == Status.RUNNING and t not in known]
        for trial_id in lost:
            del self.trials[trial_id]
        self.epochs = {k: v for k, v in self.epochs.items() if k[0] not in lost}
        return lost

    def record_result(self, trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any],
                      *, node: str | None = None) -> None:
        """Records one epoch report of a running trial."""
        trial = self._trial(trial_id)
        trial["config"] = {k: config.get(k) for k in self.param_types}
        trial["status"] = Status.RUNNING
        trial["params"] = result.get(M.PARAMS, trial.get("params"))
        trial["gmacs"] = result.get(M.GMACS, trial.get("gmacs"))
        trial["node"] = node or trial.get("node")
        trial["diverged"] = bool(result.get(M.DIVERGED, False))
        epoch = int(result[M.EPOCH])
        row = {"trial_id": trial_id, M.EPOCH: epoch}
        row.update({k: _cast(result.get(k), "float64") for k in _EPOCH_FLOATS})
        row[M.RESUMED_FROM] = _cast(result.get(M.RESUMED_FROM), "int64")
        self.epochs[(trial_id, epoch)] = row

    def record_checkpoint(self, trial_id: str, path: str, *, top1: float | None) -> None:
        """Keeps the path of the trial's best-scoring checkpoint."""
        trial = self._trial(trial_id)
        best = trial.get("checkpoint_top1")
        if trial.get("checkpoint") is None or best is None or (top1 is not None and top1 >= best):
            trial["checkpoint"], trial["checkpoint_top1"] = path, top1

    def finish(self, trial_id: str, *, error: str | None = None) -> str:
        """Marks a trial ended; returns ERROR, DIVERGED, STOPPED_EARLY or TERMINATED."""
        trial = self._trial(trial_id)
        runs = [e for (t, e) in self.epochs if t == trial_id]
        if error is not None:
            status = Status.ERROR
            trial["error"] = error
        elif trial.get("diverged"):
            status = Status.DIVERGED
        elif (max(runs) if runs else 0) < self.max_epochs:
            status = Status.STOPPED_EARLY
        else:
            status = Status.TERMINATED
        trial["status"] = status
        if status != Status.ERROR:
            trial["error"] = None
        return status

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
        """Rewrites both files atomically: a temp file in the same directory, then a rename."""
        trials, epochs = self.tables()
        for name, table in ((EPOCHS_FILE, epochs), (TRIALS_FILE, trials)):
            final = f"{self._root}/{name}"
            tmp = f"{self._root}/.{name}.{uuid.uuid4().hex}.tmp"
            pq.write_table(table, tmp, filesystem=self._fs)
            if isinstance(self._fs, pafs.LocalFileSystem):
                os.replace(tmp, final)  # atomic on POSIX
            else:
                self._fs.move(tmp, final)
