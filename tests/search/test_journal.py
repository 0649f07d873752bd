from __future__ import annotations

import os

import pytest

from search.journal import Journal


def test_events_come_back_in_order(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.append({"event": "start", "n": 1})
    journal.append({"event": "result", "value": float("nan")})
    events = list(journal.events())
    assert [e["event"] for e in events] == ["start", "result"]
    journal.clear()
    assert list(journal.events()) == [] and not journal.path.exists()


def test_a_line_cut_by_a_crash_is_skipped(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.append({"event": "start"})
    with journal.path.open("ab") as handle:
        handle.write(b'{"event": "res')  # the driver died mid-line
    assert [e["event"] for e in journal.events()] == ["start"]


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "j.jsonl")
    journal.append({"event": "start"})
    before = journal.path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        journal.append({"event": "result", "epoch": 1})
    assert journal.path.read_bytes() == before
    monkeypatch.undo()
    journal.append({"event": "finish"})
    assert [e["event"] for e in journal.events()] == ["start", "finish"]
