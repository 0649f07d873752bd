"""What ``ftsearch resume --set ...`` may change in a running experiment, and its record.

A resumed search continues trials from their checkpoints and its searcher from its history,
so a change to what a trial *is* (space, data, training, epochs, objectives, scheduler)
would mix two experiments in one results table: refused, naming each field. Changes to how
much more to search, how fast, and how patiently are allowed; they take effect in the
resumed run and each resume that changes something appends a line to
:data:`search.contract.CONFIG_HISTORY_FILE`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from search.config import ExperimentConfig, dump_config
from search.contract import CONFIG_FILE, CONFIG_HISTORY_FILE
from search.storage import replace_file

__all__ = [
    "RESUMABLE_FIELDS",
    "config_changes",
    "record_changes",
    "refused_changes",
    "write_config",
]

# Fields a resume may change: they bound the search, they do not define its trials.
RESUMABLE_FIELDS = (
    "search.num_samples",
    "search.max_concurrent",
    "search.time_budget_s",
    "failure.max_failures",
)
# Preset points (grid, PBT's initial population) are fixed when the search starts.
_PRESET_ONLY_FIXED = ("search.num_samples",)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def config_changes(saved: ExperimentConfig, new: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """Every field (dotted) whose value differs: ``{field: (saved, new)}``."""
    before, after = _flat(saved.model_dump()), _flat(new.model_dump())
    return {key: (before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)}


def refused_changes(changes: Mapping[str, tuple[Any, Any]], *, preset_points: bool) -> list[str]:
    """One problem line per change a resume cannot make."""
    problems = []
    for key, (old, new) in changes.items():
        if key not in RESUMABLE_FIELDS:
            problems.append(f"{key}: cannot change when resuming ({old!r} -> {new!r}): the "
                            f"experiment's trials were defined with the old value; start a "
                            f"new experiment (another --name) instead. A resume may change "
                            f"{', '.join(RESUMABLE_FIELDS)}")
        elif preset_points and key in _PRESET_ONLY_FIXED:
            problems.append(f"{key}: cannot change when resuming a grid or PBT search ({old!r}"
                            f" -> {new!r}): its trials were listed when it started")
        elif key == "search.num_samples" and new is not None and old is not None and new < old:
            problems.append(f"{key}: cannot shrink when resuming ({old} -> {new}): trials "
                            f"beyond {new} may already have run")
    return problems


def record_changes(cfg: ExperimentConfig, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Rewrites the experiment's config with ``cfg`` and logs ``changes`` beside it."""
    directory = Path(cfg.directory)
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
             "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}
    with (directory / CONFIG_HISTORY_FILE).open("a") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
    write_config(cfg)


def write_config(cfg: ExperimentConfig) -> None:
    """Writes ``cfg`` as the experiment's config.yaml, atomically (never a torn file)."""
    replace_file(Path(cfg.directory) / CONFIG_FILE, dump_config(cfg).encode())
