"""TrialParams is the only list of trial parameters: every field is checked before Ray starts.

The invalid values are derived from the schema itself (``TrialParams.model_json_schema()``),
so a field added later gets its bad value, and this test, without anyone writing it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from search import session
from tests.conftest import FTSEARCH, ROOT, ftsearch_env, refused
from trainables.params import TRIAL_PARAMS, TrialParams, field_problems

# A schema error is reported by a fresh `ftsearch run` within this many seconds.
_SCHEMA_ERROR_LIMIT_S = 2.0


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    def start_ray(**_kwargs):
        raise AssertionError("a config with a bad trial parameter got as far as starting Ray")

    monkeypatch.setattr(session, "start_ray", start_ray)


def _invalid_value(rule: dict[str, Any]) -> Any:
    """One value the JSON-schema ``rule`` of a field refuses.

    Raises:
        AssertionError: The rule says nothing this can break: a new kind of field needs a
            case here (and a check in the product).
    """
    if "anyOf" in rule:  # Optional[X]: X's rule; null is always allowed
        return _invalid_value(next(b for b in rule["anyOf"] if b.get("type") != "null"))
    if "enum" in rule:
        return "bogus"
    kind = rule.get("type")
    if kind == "boolean":
        return "yes"
    if kind in ("integer", "number"):
        cast = int if kind == "integer" else float
        if "minimum" in rule:
            return cast(rule["minimum"] - 1)
        if "exclusiveMinimum" in rule:
            return cast(rule["exclusiveMinimum"])
        if "maximum" in rule:
            return cast(rule["maximum"] + 1)
        if "exclusiveMaximum" in rule:
            return cast(rule["exclusiveMaximum"])
        return "fast"
    if kind in ("string", "object", "array"):
        return 12345
    raise AssertionError(f"no invalid value can be derived from the schema rule {rule}")


def _invalid_values() -> dict[str, Any]:
    properties = TrialParams.model_json_schema()["properties"]
    return {name: _invalid_value(properties[name]) for name in TRIAL_PARAMS}


def _config(tmp_path: Path, name: str = "c", **train: Any) -> Path:
    # The searched parameter must not be the one under test (`train.lr` and `space.lr`
    # together is a different error).
    searched = "lr_scale" if "lr" in train else "lr"
    raw = {
        "name": "params",
        "storage": str(tmp_path / "runs"),
        "data": {"source": "digits"},
        "space": {searched: {"type": "loguniform", "low": 0.001, "high": 0.1}},
        "train": train,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path



# ---------------------------------------------------------------------------- the generator


def test_invalid_values_follow_each_kind_of_rule():
    values = _invalid_values()
    assert set(values) == set(TRIAL_PARAMS)
    assert values["lr"] == 0.0  # exclusiveMinimum 0
    assert values["batch_size"] == 0  # integer, minimum 1
    assert values["resolution"] == 31  # Optional[int >= 32]
    assert values["optimizer"] == "bogus" and values["amp"] == "yes"
    assert values["backbone"] == 12345 and values["weights"] == 12345
    with pytest.raises(AssertionError, match="no invalid value"):
        _invalid_value({"title": "Anything"})


def test_each_invalid_value_is_refused_by_its_field():
    for name, value in _invalid_values().items():
        assert field_problems(name, value), (name, value)


# ---------------------------------------------------------------------------- every field, CLI

_EVERY_FIELD = """
import contextlib, io, json, sys
import search.preflight
search.preflight._download_reachable = lambda url: False  # never the network
from search.cli import main
results = {}
for field, path in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", path])
    results[field] = {"code": code, "stderr": err.getvalue()}
print(json.dumps({"results": results, "ray": "ray" in sys.modules}))
"""


def test_every_trial_parameter_is_checked_before_ray(tmp_path):
    configs = {field: str(_config(tmp_path, field, **{field: value}))
               for field, value in _invalid_values().items()}
    proc = subprocess.run([sys.executable, "-c", _EVERY_FIELD, json.dumps(configs)], cwd=ROOT,
                          env=ftsearch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for field, result in out["results"].items():
        assert result["code"] == 2, (field, result)
        assert result["stderr"].startswith(f"ftsearch: train.{field}: "), (field, result)
        assert result["stderr"].count("\n") == 1, (field, result)
    assert set(out["results"]) == set(TRIAL_PARAMS)
    assert out["ray"] is False
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- named cases


@pytest.mark.parametrize(("key", "space", "field"), [
    ("lr", {"type": "uniform", "low": -1, "high": 1}, "space.lr.low"),
    ("batch_size", {"type": "int", "low": 0, "high": 4}, "space.batch_size.low"),
])
def test_a_searched_range_outside_the_field(tmp_path, capsys, key, space, field):
    raw = yaml.safe_load(_config(tmp_path).read_text())
    raw["space"][key] = space
    path = tmp_path / "range.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert refused(capsys, path).startswith(f"{field}: ")


_BOOLEANS = ("amp", "channels_last", "compile", "augment")


def test_the_boolean_fields_are_the_ones_named_here():
    properties = TrialParams.model_json_schema()["properties"]
    assert {k for k in TRIAL_PARAMS if properties[k].get("type") == "boolean"} == set(_BOOLEANS)


@pytest.mark.parametrize("key", _BOOLEANS)
def test_a_boolean_given_a_string(tmp_path, capsys, key):
    line = refused(capsys, _config(tmp_path, **{key: "yes"}))
    assert line.startswith(f"train.{key}: ") and "'yes'" in line


# The eight values of the issue, each once silently coerced or passed to the trial.
_ISSUE = {
    "device": "gpu",
    "layer_decay": 5,
    "warmup_epochs": -3,
    "unfreeze_at_epoch": "soon",
    "eval_batch_size": 0,
    "freeze_fraction": 7,
    "amp": "yes",
    "max_steps_per_epoch": -1,
}


@pytest.mark.parametrize(("key", "value"), _ISSUE.items(), ids=list(_ISSUE))
def test_the_issue_values(tmp_path, capsys, key, value):
    line = refused(capsys, _config(tmp_path, **{key: value}))
    assert line.startswith(f"train.{key}: ") and f"(got {value!r})" in line
    assert not (tmp_path / "runs").exists()


def test_a_schema_error_answers_quickly_in_a_fresh_process(tmp_path):
    config = _config(tmp_path, eval_batch_size=0)
    start = time.perf_counter()
    proc = subprocess.run([*FTSEARCH, "run", str(config)], cwd=ROOT, env=ftsearch_env(),
                          capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("ftsearch: train.eval_batch_size: ")
    assert proc.stderr.count("\n") == 1
    assert wall < _SCHEMA_ERROR_LIMIT_S, f"{wall:.2f} s"


def test_heads_and_kernels_are_the_fields_choices():
    from typing import get_args

    from trainables.params import HEADS, SVM_KERNELS

    assert get_args(TrialParams.model_fields["head"].annotation) == HEADS
    assert get_args(TrialParams.model_fields["svm_kernel"].annotation) == SVM_KERNELS


@pytest.mark.parametrize(("config", "field", "words"), [
    ({"backbone": "resnet18", "freeze_depth": 2}, "freeze_depth", "random initial values"),
    ({"backbone": "resnet18", "freeze_fraction": 0.5}, "freeze_depth", "random initial values"),
    ({"backbone": "resnet18", "head": "svm"}, "head", "weights 'none'"),
    ({"backbone": "efficientnet_lite0", "weights": "packaged", "features_from": 3},
     "features_from", "classical heads"),
    ({"backbone": "efficientnet_lite0", "weights": "packaged", "head": "logreg",
      "features_from": 10}, "features_from", "1..9"),
    ({"backbone": "efficientnet_lite0", "weights": "packaged", "head": "svm",
      "head_init": "probe"}, "head_init", "linear head"),
    ({"backbone": "efficientnet_lite0", "weights": "packaged", "head": "svm",
      "freeze_depth": 4}, "freeze_depth", "leave freeze_depth out"),
])
def test_a_trial_refuses_freezing_random_weights_and_mismatched_head_settings(config, field,
                                                                               words):
    with pytest.raises(ValueError) as err:
        TrialParams.model_validate(config)
    assert field in str(err.value) and words in str(err.value)


def test_a_classical_head_freezes_up_to_its_feature_stage():
    lite = {"backbone": "efficientnet_lite0", "weights": "packaged"}
    assert TrialParams(**lite, head="xgboost").resolved().freeze_depth == 9
    assert TrialParams(**lite, head="logreg", features_from=6).resolved().freeze_depth == 6
    # random weights train from scratch with the linear head
    assert TrialParams(backbone="resnet18").resolved().freeze_depth == 0
