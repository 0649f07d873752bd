"""Scoring every stage of a real pretrained backbone on real digits, through the cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainables import cache
from trainables import metrics as M
from trainables.data import load_data
from trainables.finetune import build_model, resolve_trial_config
from trainables.ranking import imagenet_confidence, score_stages
from trainables.runtime import place_model

DIGITS = {"source": "digits", "samples_per_class": 8, "val_fraction": 0.05}
JOB = {"backbone": "efficientnet_lite0", "weights": "packaged", "resolution": 32,
       "data": DIGITS}


@pytest.mark.parametrize("channels_last", [True, False])
def test_one_pass_gives_each_depths_cache_file_bit_for_bit(tmp_path, channels_last):
    p = resolve_trial_config({**JOB, "channels_last": channels_last})
    data = load_data(DIGITS, seed=0)
    model = place_model(build_model(p, num_classes=data.num_classes), torch.device("cpu"),
                        channels_last=channels_last)
    common = {"train": data.train, "val": data.val, "resolution": 32,
              "data_key": json.dumps(DIGITS, sort_keys=True), "cache_dir": tmp_path,
              "device": torch.device("cpu"), "batch_size": 64, "channels_last": channels_last}
    sets, seconds = cache.pooled_stage_features(model, depths=[2, 5, 9], **common)
    assert seconds > 0 and len(list(tmp_path.glob("*.pt"))) == 3
    for depth in (2, 5, 9):
        alone = cache.frozen_features(model, depth=depth, pool=True, **common)
        assert alone.build_seconds == 0.0  # read the file the one pass wrote
        assert torch.equal(alone.train.features, sets[depth][0].features)
        fresh = cache.compute_features(model, data.val, depth=depth, resolution=32,
                                       device=torch.device("cpu"), batch_size=64, pool=True,
                                       channels_last=channels_last)
        assert torch.equal(fresh.features, sets[depth][1].features)
    _, again = cache.pooled_stage_features(model, depths=[2, 5, 9], **common)
    assert again == 0.0


def test_score_stages_scores_every_stage_boundary(tmp_path):
    result = score_stages({**JOB, "cache_dir": str(tmp_path)})
    assert result["stages"] == 9 and [c["depth"] for c in result["cells"]] == list(range(1, 10))
    assert result["train_images"] == 80 and result["classes"] == 10
    for cell in result["cells"]:
        assert all(math.isfinite(cell[name]) for name in M.TRANSFER_SCORES)
    # The pretrained network's late features separate digits better than its first stage's.
    by_depth = {c["depth"]: c[M.LOGME] for c in result["cells"]}
    assert max(by_depth[k] for k in (6, 7, 8, 9)) > by_depth[1]
    assert result["feature_seconds"] > 0
    assert score_stages({**JOB, "cache_dir": str(tmp_path)})["feature_seconds"] == 0.0


def test_imagenet_confidence_separates_photos_from_digits(tmp_path):
    from PIL import Image
    from skimage import data as photos

    folder = tmp_path / "photos"
    for name in ("chelsea", "coffee"):  # a cat and an espresso: ImageNet's kind of image
        for i in range(2):
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(getattr(photos, name)()).save(folder / name / f"{i}.png")
    cat = imagenet_confidence({**JOB, "data": {"source": "imagefolder", "path": str(folder),
                                               "val_fraction": 0.5}})
    digits = imagenet_confidence(JOB)
    assert cat["resolution"] == 224 and digits["images"] == 80
    assert digits["msp"] < 0.3 <= cat["msp"]
