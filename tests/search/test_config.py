from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from search.config import ConfigError, apply_overrides, dump_config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def _base(tmp_path) -> dict:
    return {
        "name": "t",
        "storage": str(tmp_path),
        "data": {"source": "digits"},
        "train": {"epochs": 3},
        "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}},
    }


def _problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


def test_demo_config_is_valid_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"storage={tmp_path}"])
    assert cfg.search.points_to_evaluate
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("patch", "field", "hint"),
    [
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"space": {"lr": {"type": "loguniform", "low": 0, "high": 1}}}, "space.lr", "> 0"),
        ({"space": {"lr": {"type": "loguniform", "low": 0.1, "high": 0.01}}}, "space.lr",
         "below high"),
        ({"space": {"freeze_depth": {"type": "int", "low": 0, "high": 99}}},
         "space.freeze_depth.high", "0..5"),
        ({"space": {"backbone": {"type": "choice", "values": ["resnet18", "nope"]}}},
         "space.backbone.values", "resnet50"),
        ({"space": {"lr": {"type": "gaussian", "low": 1, "high": 2}}}, "space.lr.type",
         "loguniform"),
        ({"space": {}}, "space", "no parameter is searched"),
        ({"search": {"algorithm": "bayes"}}, "search.algorithm", "optuna"),
        ({"scheduler": {"type": "fifo"}}, "scheduler.type", "asha"),
        ({"scheduler": {"grace_period": 5}}, "scheduler.grace_period", "3 epochs"),
        ({"search": {"num_samples": 0}}, "search.num_samples", "greater than or equal to 1"),
        ({"resources": {"gpu": -1}}, "resources.gpu", "greater than or equal to 0"),
        ({"train": {"epochs": 3, "lr_scale": -1}}, "train.lr_scale", "greater than 0"),
        ({"train": {"epochs": 3, "lr_scale": "fast"}}, "train.lr_scale", "valid number"),
        ({"train": {"epochs": 3, "resolution": 0}}, "train.resolution",
         "greater than or equal to 32"),
        ({"train": {"epochs": 3, "weights": "packaged"}}, "train.weights", "efficientnet_lite0"),
        ({"train": {"epochs": 3, "wat": 1}}, "train.wat", "unknown key"),
        ({"data": {"source": "imagefolder", "val_fraction": 2, "path": "/x"}},
         "data.val_fraction", "(0, 1)"),
        ({"name": ".."}, "name", "plain directory name"),
        ({"name": "a/b"}, "name", "plain directory name"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, patch, field, hint):
    # Files (data paths, storage) are pre-flight's: tests/search/test_preflight.py.
    raw = {**_base(tmp_path), **patch}
    problems = _problems(raw)
    assert any(p.startswith(field) and hint in p for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path):
    raw = {**_base(tmp_path), "search": {"num_samples": 0, "algorithm": "nope"}, "extra": 1}
    problems = _problems(raw)
    assert len(problems) == 3


def test_overrides_parse_as_yaml_and_are_validated(tmp_path):
    raw = apply_overrides(_base(tmp_path), ["train.epochs=5", "search.num_samples=2",
                                            "space.lr.high=0.5"])
    cfg = parse_config(raw)
    assert cfg.epochs == 5 and cfg.search.num_samples == 2
    assert cfg.space["lr"].high == 0.5
    with pytest.raises(ConfigError, match="search.num_samples"):
        parse_config(apply_overrides(_base(tmp_path), ["search.num_samples=-3"]))


def test_not_yaml_or_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_gpu_template_is_valid_once_pointed_at_data(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            image = Image.new("RGB", (20, 20), (i * 90, 40, 200))
            image.save(tmp_path / "train" / name / f"{i}.png")
    cfg = load_config(ROOT / "configs" / "imagefolder-gpu.yaml",
                      [f"data.path={tmp_path / 'train'}", f"storage={tmp_path / 'runs'}"])
    assert cfg.resources.gpu == 0.5 and cfg.train["weights"] == "imagenet"
    assert {"resnet50", "efficientnet_b0", "efficientnet_b3", "vgg16_bn"} <= set(
        cfg.space["backbone"].values)
    assert cfg.scheduler.type == "asha"
    # A missing data.path is pre-flight's to refuse: tests/search/test_preflight.py.
