from __future__ import annotations

import pytest

from search.config import parse_config
from search.space import column_types, sample_configs
from trainables.models import flops_ratio, stage_count


def _cfg(tmp_path, space: dict, **search) -> object:
    return parse_config({
        "name": "s", "storage": str(tmp_path), "train": {"epochs": 2},
        "space": space, "search": {"num_samples": 30, **search},
    })


MIXED = {
    "backbone": {"type": "choice", "values": ["resnet18", "efficientnet", "vgg11_bn"]},
    "freeze_depth": {"type": "int", "low": 0, "high": 9},
    "width_mult": {"type": "uniform", "low": 0.5, "high": 1.0},
    "depth_mult": {"type": "uniform", "low": 0.5, "high": 1.0},
    "resolution": {"type": "choice", "values": [32, 64]},
    "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
}


@pytest.mark.parametrize("algorithm", ["optuna", "random"])
def test_conditional_parameters_only_for_efficientnet(tmp_path, algorithm):
    configs = sample_configs(_cfg(tmp_path, MIXED, algorithm=algorithm), 30)
    backbones = {c["backbone"] for c in configs}
    assert backbones == {"resnet18", "efficientnet", "vgg11_bn"}
    for c in configs:
        eff = c["backbone"] == "efficientnet"
        for key in ("width_mult", "depth_mult", "resolution"):
            assert (key in c) == eff, c
        assert 0 <= c["freeze_depth"] <= stage_count(c["backbone"]), c


def test_freeze_depth_as_fraction_of_depth(tmp_path):
    space = {"backbone": {"type": "choice", "values": ["resnet18", "efficientnet_b0"]},
             "freeze_depth": {"type": "fraction", "low": 0.0, "high": 1.0}}
    for c in sample_configs(_cfg(tmp_path, space), 20):
        n = stage_count(c["backbone"])
        assert c["freeze_depth"] == min(n, round(c["freeze_fraction"] * n))
    assert column_types(_cfg(tmp_path, space))["freeze_depth"] == "int64"


def test_same_seed_same_configs(tmp_path):
    a = sample_configs(_cfg(tmp_path, MIXED), 15)
    b = sample_configs(_cfg(tmp_path, MIXED), 15)
    assert a == b
    c = sample_configs(parse_config({"name": "s", "storage": str(tmp_path), "seed": 1,
                                     "space": MIXED}), 15)
    assert a != c


def test_compound_constraint_holds(tmp_path):
    space = {"backbone": "efficientnet", "phi": {"type": "uniform", "low": 0.0, "high": 1.0},
             "alpha": {"type": "uniform", "low": 1.0, "high": 1.4},
             "beta": {"type": "uniform", "low": 1.0, "high": 1.3}}
    cfg = _cfg(tmp_path, space, compound_constraint={"tolerance": 0.05})
    for c in sample_configs(cfg, 20):
        assert abs(flops_ratio(c["alpha"], c["beta"], c["gamma"]) - 2) <= 0.05 + 1e-9


def test_points_to_evaluate_come_first(tmp_path):
    point = {"backbone": "resnet18", "freeze_depth": 3, "lr": 0.01}
    configs = sample_configs(_cfg(tmp_path, MIXED, points_to_evaluate=[point]), 3)
    assert configs[0] == point


def test_grid_enumerates_every_branch(tmp_path):
    space = {"backbone": {"type": "choice", "values": ["resnet18", "alexnet"]},
             "freeze_depth": {"type": "int", "low": 0, "high": 5},
             "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1, "grid_points": 2}}
    cfg = _cfg(tmp_path, space, algorithm="grid")
    n = 2 * (6 + 4)  # lr values x (resnet18: 0..5, alexnet: 0..3)
    configs = sample_configs(cfg, n)
    keys = {(c["backbone"], c["freeze_depth"], c["lr"]) for c in configs}
    assert len(keys) == n
