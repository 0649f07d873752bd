"""The frozen-stage cache hands a trial its activations in the dtype the frozen stages emit.

Found on a GPU (BENCHMARKS.md, section 4's GPU rows, NVIDIA H200, 2026-12-04): with bf16
autocast, a trial at feature-extraction depth trained its head on float32 cached activations
where the uncached trial fed it the stages' bf16 output, so its pooling and dropout ran in
another dtype and the two trials' top-1 differed by up to 7.4 points (two uncached runs: 0).
These tests catch that on a CPU: CPU autocast in bf16 stands in for CUDA's.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import trainables.cache as cache
import trainables.finetune as finetune
import trainables.scoring as scoring
from trainables.data import load_data
from trainables.models import build_backbone
from trainables.optim import freeze_stages

DATA = {"source": "digits", "samples_per_class": 6, "val_fraction": 0.1}


@contextlib.contextmanager
def cpu_bf16_autocast():
    """Every autocast of a trial (training, validation, the cache's forward) as bf16 on CPU."""

    def trial_autocast(device, amp):
        return torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def compute_autocast(self):
        return (torch.autocast("cpu", dtype=torch.bfloat16) if self.amp
                else contextlib.nullcontext())

    with mock.patch.object(finetune, "autocast", trial_autocast), \
            mock.patch.object(scoring, "autocast", trial_autocast), \
            mock.patch.object(cache._Compute, "_autocast", compute_autocast):
        yield


def _features(tmp_path, *, amp: bool, pool: bool = False):
    torch.manual_seed(0)
    data = load_data(DATA, seed=0)
    model = build_backbone("efficientnet_lite0", num_classes=10, weights="packaged")
    freeze_stages(model, 9)
    return cache.frozen_features(model, depth=9, train=data.train, val=data.val, resolution=32,
                                 data_key="digits", cache_dir=tmp_path, device=torch.device("cpu"),
                                 amp=amp, pool=pool)


@pytest.mark.parametrize("amp", [True, False])
def test_cached_activations_come_in_the_dtype_the_frozen_stages_emit(tmp_path, amp):
    with cpu_bf16_autocast():
        built = _features(tmp_path, amp=amp)   # computes the file
        read = _features(tmp_path, amp=amp)    # reads it back
    expected = torch.bfloat16 if amp else torch.float32
    assert built.build_seconds > 0 and read.build_seconds == 0
    assert built.train.features.dtype == read.train.features.dtype == expected
    assert read.val.features.dtype == expected
    # The file itself stays float32, whatever the trial's numerics.
    stored = torch.load(read.path, weights_only=True)
    assert stored["train"].dtype == torch.float32
    torch.testing.assert_close(read.train.features.float(), stored["train"], rtol=0, atol=0)


def test_pooled_features_stay_float32_under_autocast(tmp_path):
    with cpu_bf16_autocast():
        pooled = _features(tmp_path, amp=True, pool=True)
    assert pooled.train.features.dtype == torch.float32  # they feed scikit-learn


def test_cached_and_uncached_trials_agree_under_bf16_autocast(tmp_path):
    # Feature-extraction depth, where the GPU run drifted (bf16 convolutions are slow on a
    # CPU: the smallest trial that trains and validates the head).
    config = {"backbone": "efficientnet_lite0", "weights": "packaged", "resolution": 32,
              "epochs": 2, "batch_size": 16, "lr": 0.05, "lr_scale": 0.1, "freeze_depth": 9,
              "max_steps_per_epoch": 2, "device": "cpu", "amp": True,
              "data": {**DATA, "val_fraction": 0.05}}
    runs = []
    with cpu_bf16_autocast():
        for cache_dir in (None, str(tmp_path)):
            reports: list[dict] = []
            finetune.run_trial({**config, "cache_dir": cache_dir},
                               report=lambda m, s, out=reports: out.append(m))
            runs.append([(r["top1"], r["val_loss"], r["train_loss"]) for r in reports])
    assert list(tmp_path.glob("*.pt")), "the cached run did not use the cache"
    assert runs[0] == runs[1]
