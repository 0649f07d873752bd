"""Frozen-stage cache: same results as the uncached path, keyed by what the stages compute."""

from __future__ import annotations

import logging

import pytest
import torch

from trainables import cache
from trainables import metrics as M
from trainables.data import load_data
from trainables.finetune import run_trial
from trainables.models import build_backbone
from trainables.optim import freeze_stages

DIGITS = {"source": "digits", "samples_per_class": 6, "val_fraction": 0.05}
TRIAL = {
    "backbone": "efficientnet_lite0",
    "weights": "packaged",
    "resolution": 32,
    "epochs": 2,
    "batch_size": 16,
    "data": DIGITS,
    "lr": 0.05,
    "max_steps_per_epoch": 2,
}


def _run(config: dict) -> tuple[list[dict], dict]:
    reports, states = [], []
    run_trial(config, report=lambda m, s: (reports.append(m), states.append(s)))
    return reports, states[-1]


def _weights_file(path, backbone: str) -> str:
    """A state-dict file of ``backbone`` (stands for a user's own pretrained weights)."""
    torch.manual_seed(1)
    torch.save(build_backbone(backbone, num_classes=1000, weights="none").state_dict(), path)
    return str(path)


# Half of Lite0 (batch norm and dropout in the trained stages and head), and ResNet-18's whole
# backbone (feature extraction) from a state-dict file.
@pytest.mark.parametrize(("backbone", "weights", "depth"),
                         [("efficientnet_lite0", "packaged", 4), ("resnet18", "file", 5)])
def test_cached_run_matches_the_uncached_run(tmp_path, backbone, weights, depth):
    if weights == "file":
        # Beside tmp_path, which holds the cache files only.
        weights = _weights_file(tmp_path.parent / f"{tmp_path.name}-own.pt", backbone)
    trial = {**TRIAL, "backbone": backbone, "weights": weights, "freeze_depth": depth}
    plain, plain_state = _run(trial)
    built, built_state = _run({**trial, "cache_dir": str(tmp_path)})
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1  # built once, by the first cached run
    mtime = files[0].stat().st_mtime_ns
    reused, _ = _run({**trial, "cache_dir": str(tmp_path)})
    assert files[0].stat().st_mtime_ns == mtime  # the second run read it

    for cached in (built, reused):
        for a, b in zip(plain, cached, strict=True):
            assert a[M.TOP1] == pytest.approx(b[M.TOP1], abs=1e-4)
            assert a[M.TOP5] == pytest.approx(b[M.TOP5], abs=1e-4)
            assert a[M.VAL_LOSS] == pytest.approx(b[M.VAL_LOSS], abs=1e-4)
            assert a[M.TRAIN_LOSS] == pytest.approx(b[M.TRAIN_LOSS], abs=1e-4)
    # every weight and BN statistic ends where the uncached run left it
    for key, value in plain_state["model"].items():
        assert torch.allclose(value.float(), built_state["model"][key].float(), atol=1e-5), key
    torch.manual_seed(0)
    fresh = build_backbone(backbone, num_classes=10, weights=weights).state_dict()
    trained = [k for k in fresh if not torch.equal(fresh[k], plain_state["model"][k])]
    assert any(k.startswith("head.") for k in trained)  # the comparison is not vacuous
    assert not any(k.startswith(f"stages.{depth - 1}.") for k in trained)  # frozen stayed


def test_augmentation_bypasses_the_cache_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache, "_said", set())
    config = {**TRIAL, "epochs": 1, "freeze_depth": 9, "augment": True,
              "max_steps_per_epoch": 1, "cache_dir": str(tmp_path)}
    with caplog.at_level(logging.WARNING, logger="trainables.cache"):
        _run(config)
        _run(config)
    said = [r.getMessage() for r in caplog.records if "cache bypassed" in r.getMessage()]
    assert len(said) == 1 and "augment" in said[0]
    assert not list(tmp_path.glob("*.pt"))


def _model(*, seed: int = 0, weights: str = "none"):
    torch.manual_seed(seed)
    model = build_backbone("resnet18", num_classes=10, weights=weights)
    freeze_stages(model, 2)
    return model


def test_fingerprint_changes_with_everything_the_frozen_stages_depend_on():
    data = load_data(DIGITS, seed=0)
    other_data = load_data(DIGITS, seed=1)
    base = {"depth": 2, "resolution": 32, "data_key": "digits", "train": data.train,
            "val": data.val, "device": torch.device("cpu"), "amp": True, "channels_last": True}
    model = _model()
    key = cache.fingerprint(model, **base)
    assert cache.fingerprint(_model(), **base) == key  # same seed, same random weights
    # stages past the frozen ones and the head do not matter
    with torch.no_grad():
        model.stages[3][0].conv1.weight.add_(1.0)
        model.classifier.weight.add_(1.0)
    assert cache.fingerprint(model, **base) == key
    changed = [
        cache.fingerprint(_model(seed=1), **base),
        cache.fingerprint(model, **{**base, "depth": 3}),
        cache.fingerprint(model, **{**base, "resolution": 64}),
        cache.fingerprint(model, **{**base, "data_key": "digits, other spec"}),
        cache.fingerprint(model, **{**base, "train": other_data.train, "val": other_data.val}),
        cache.fingerprint(model, **{**base, "channels_last": False}),  # CPU kernels differ too
    ]
    with torch.no_grad():
        model.stages[1][0].bn1.running_mean.add_(1.0)  # a frozen buffer
    changed.append(cache.fingerprint(model, **base))
    assert len({key, *changed}) == len(changed) + 1


def test_too_large_a_cache_is_not_built(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache, "_said", set())
    data = load_data(DIGITS, seed=0)
    with caplog.at_level(logging.WARNING, logger="trainables.cache"):
        got = cache.frozen_features(_model(), depth=2, train=data.train, val=data.val,
                                    resolution=32, data_key="digits", cache_dir=tmp_path,
                                    device=torch.device("cpu"), max_mb=0.01)
    assert got is None and not list(tmp_path.glob("*.pt"))
    assert "MB" in caplog.text


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    data = load_data(DIGITS, seed=0)
    kwargs = {"depth": 2, "train": data.train, "val": data.val, "resolution": 32,
              "data_key": "digits", "cache_dir": tmp_path, "device": torch.device("cpu")}
    first = cache.frozen_features(_model(), **kwargs)
    assert first is not None and first.build_seconds > 0
    first.path.write_bytes(b"truncated")
    again = cache.frozen_features(_model(), **kwargs)
    assert again is not None and again.build_seconds > 0
    assert torch.equal(again.train.features, first.train.features)
    assert again.train.features.shape == (len(data.train), 64, 8, 8)
    third = cache.frozen_features(_model(), **kwargs)
    assert third is not None and third.build_seconds == 0.0
