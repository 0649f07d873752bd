"""An append-only, fsynced log of the store's updates: results survive a killed driver.

Rewriting both Parquet files on every result would cost O(rows) per result, so the store
rewrites them at most every few seconds; what arrived since lives here. Each update is one
JSON line, flushed and fsynced before :meth:`Journal.append` returns. The callback calls it
from ``on_trial_result``, which Tune runs *before* it registers the checkpoint reported with
that result, so an experiment snapshot never points at a checkpoint whose epoch is not on
disk: a resumed trial never skips a result that only the dead driver had seen.

After the Parquet files are rewritten the journal is removed. Replaying it twice is
harmless: rows are keyed, and events replay in their original order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Journal"]


class Journal:
    """The journal file at ``path`` (a local path; remote storage has none)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, event: Mapping[str, Any]) -> None:
        """Writes ``event`` durably, or leaves the file as it was and raises ``OSError``."""
        line = (json.dumps(event, default=str) + "\n").encode()
        with self.path.open("ab") as handle:
            start = handle.tell()
            try:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            except OSError:
                # Disk full mid-line: cut the partial line, or the next append would be
                # glued to it and both lost on replay.
                handle.truncate(start)
                raise

    def events(self) -> Iterator[dict[str, Any]]:
        """The logged events, oldest first; a line cut by a crash mid-write is skipped."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as handle:
            for raw in handle:
                try:
                    event = json.loads(raw)
                except ValueError:  # only the last line can be cut: nothing follows it
                    continue
                if isinstance(event, dict):
                    yield event

    def clear(self) -> None:
        """Removes the journal once everything in it is in the Parquet files."""
        self.path.unlink(missing_ok=True)
