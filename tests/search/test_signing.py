from __future__ import annotations

import fnmatch
import stat

import pytest
from ray.tune.callback import CallbackList
from ray.tune.execution.tune_controller import TuneController
from ray.tune.impl.tuner_internal import _TUNER_PKL
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.search_generator import SearchGenerator
from ray.tune.search.searcher import Searcher

from search.signing import (
    TUNE_STATE_PATTERNS,
    key_file,
    sign_files,
    tune_state_files,
    unsigned_files,
)


@pytest.fixture(autouse=True)
def private_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FTSEARCH_KEY_FILE", str(tmp_path / "key" / "signing.key"))


def test_patterns_are_every_file_ray_tune_unpickles_on_restore():
    names = [_TUNER_PKL] + [cls.CKPT_FILE_TMPL.format("2026-11-25_10-00-00") for cls in (
        TuneController, SearchGenerator, Searcher, BasicVariantGenerator, CallbackList)]
    for name in names:
        assert any(fnmatch.fnmatchcase(name, p) for p in TUNE_STATE_PATTERNS), name
    assert len(TUNE_STATE_PATTERNS) == len(names)


def test_key_is_created_once_with_user_only_permissions(tmp_path):
    (tmp_path / "exp").mkdir()
    state = tmp_path / "exp" / "tuner.pkl"
    state.write_bytes(b"state")
    sign_files(tmp_path / "exp", [state])
    key = key_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_bytes()
    sign_files(tmp_path / "exp", [state])
    assert key.read_bytes() == first and len(first) == 32


def test_signed_files_verify_and_changed_planted_or_unsigned_ones_do_not(tmp_path):
    exp, staging = tmp_path / "exp", tmp_path / "staging"
    exp.mkdir()
    staging.mkdir()
    (staging / "experiment_state-1.json").write_text('{"trials": []}')
    sign_files(exp, tune_state_files(staging))
    # the background copy puts the same bytes into the experiment directory
    (exp / "experiment_state-1.json").write_text('{"trials": []}')
    assert unsigned_files(exp) == []
    (exp / "experiment_state-1.json").write_text('{"trials": ["changed"]}')
    (exp / "searcher-state-2.pkl").write_bytes(b"planted")
    (exp / "notes.txt").write_text("not Tune state: not checked")
    assert unsigned_files(exp) == ["experiment_state-1.json", "searcher-state-2.pkl"]


def test_the_previous_version_of_a_file_still_verifies(tmp_path):
    # Tune copies the state into the directory in a background thread: after a crash the
    # directory may hold the version before the newest signed one.
    state = tmp_path / "experiment_state-1.json"
    for version in (b"v1", b"v2"):
        state.write_bytes(version)
        sign_files(tmp_path, [state])
    state.write_bytes(b"v1")
    assert unsigned_files(tmp_path) == []


def test_another_key_does_not_verify(tmp_path, monkeypatch):
    state = tmp_path / "tuner.pkl"
    state.write_bytes(b"state")
    sign_files(tmp_path, [state])
    monkeypatch.setenv("FTSEARCH_KEY_FILE", str(tmp_path / "other.key"))
    assert unsigned_files(tmp_path) == ["tuner.pkl"]
