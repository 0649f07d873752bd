from __future__ import annotations

import pytest

from search.config import parse_config
from search.space import column_types, sample_configs
from trainables.models import flops_ratio, stage_count


def _cfg(tmp_path, space: dict, *, weights: str | dict | None = None, seed: int = 0,
         **search) -> object:
    # Frozen stages need pretrained weights: a state-dict path stands for the user's own
    # (parsing does not read it; pre-flight would).
    weights = str(tmp_path / "own-weights.pt") if weights is None else weights
    return parse_config({
        "name": "s", "storage": str(tmp_path), "seed": seed,
        "train": {"epochs": 2, "weights": weights},
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
    c = sample_configs(_cfg(tmp_path, MIXED, seed=1), 15)
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


def test_random_weights_are_never_frozen_and_the_space_shows_it(tmp_path):
    # resnet18 from scratch beside pretrained Lite0: freeze_depth is sampled for Lite0 only,
    # and is the constant 0 (not a sampled value) for resnet18.
    space = {"backbone": {"type": "choice", "values": ["efficientnet_lite0", "resnet18"]},
             "freeze_depth": {"type": "int", "low": 1, "high": 9},
             "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}
    cfg = _cfg(tmp_path, space, weights={"efficientnet_lite0": "packaged", "default": "none"})
    configs = sample_configs(cfg, 30)
    scratch = [c for c in configs if c["backbone"] == "resnet18"]
    lite = [c for c in configs if c["backbone"] == "efficientnet_lite0"]
    assert scratch and lite
    assert all(c["freeze_depth"] == 0 for c in scratch)
    assert all(1 <= c["freeze_depth"] <= stage_count("efficientnet_lite0") for c in lite)
    assert column_types(cfg)["freeze_depth"] == "int64"


HEADS = {
    "backbone": "efficientnet_lite0",
    "head": {"type": "choice", "values": ["linear", "logreg", "svm", "xgboost"]},
    "freeze_depth": {"type": "int", "low": 0, "high": 9},
    "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
    "svm_kernel": {"type": "choice", "values": ["linear", "rbf"]},
    "svm_c": {"type": "loguniform", "low": 0.1, "high": 10},
    "svm_gamma": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
    "xgb_max_depth": {"type": "int", "low": 2, "high": 6},
    "logreg_c": {"type": "loguniform", "low": 0.1, "high": 10},
    "features_from": {"type": "int", "low": 5, "high": 9},
}


@pytest.mark.parametrize("algorithm", ["optuna", "random"])
def test_each_head_samples_its_own_parameters_only(tmp_path, algorithm):
    cfg = _cfg(tmp_path, HEADS, weights="packaged", algorithm=algorithm)
    configs = sample_configs(cfg, 40)
    assert {c["head"] for c in configs} == {"linear", "logreg", "svm", "xgboost"}
    owned = {"logreg": {"logreg_c"}, "svm": {"svm_kernel", "svm_c"},
             "xgboost": {"xgb_max_depth"}, "linear": {"lr"}}
    n = stage_count("efficientnet_lite0")
    for c in configs:
        head = c["head"]
        for key in ("logreg_c", "svm_kernel", "svm_c", "xgb_max_depth", "lr"):
            assert (key in c) == (key in owned[head]), c
        assert ("svm_gamma" in c) == (head == "svm" and c["svm_kernel"] == "rbf"), c
        if head == "linear":
            assert "features_from" not in c and 0 <= c["freeze_depth"] <= n
        else:  # a classical head: frozen up to the stage its features come from
            assert 5 <= c["features_from"] <= n and c["freeze_depth"] == c["features_from"]
    types = column_types(cfg)
    assert types["head"] == "string" and types["svm_c"] == "float64"
    assert types["xgb_max_depth"] == "int64" and types["freeze_depth"] == "int64"


def test_a_searched_head_is_linear_for_random_weights(tmp_path):
    space = {"backbone": {"type": "choice", "values": ["efficientnet_lite0", "resnet18"]},
             "head": {"type": "choice", "values": ["linear", "svm"]},
             "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}
    cfg = _cfg(tmp_path, space, weights={"efficientnet_lite0": "packaged", "default": "none"})
    configs = sample_configs(cfg, 30)
    assert {c["head"] for c in configs if c["backbone"] == "resnet18"} == {"linear"}
    assert all(c["freeze_depth"] == 0 for c in configs if c["backbone"] == "resnet18")
    assert "svm" in {c["head"] for c in configs if c["backbone"] == "efficientnet_lite0"}


@pytest.mark.parametrize("algorithm", ["optuna", "random"])
@pytest.mark.parametrize("logreg_c_first", [False, True])
def test_lp_ft_is_searched_like_any_choice_and_its_probe_takes_logreg_c(tmp_path, algorithm,
                                                                        logreg_c_first):
    space = {"backbone": "efficientnet_lite0",
             "head": {"type": "choice", "values": ["linear", "svm"]},
             "head_init": {"type": "choice", "values": ["random", "probe"]},
             "logreg_c": {"type": "loguniform", "low": 0.1, "high": 10},
             "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}
    if logreg_c_first:  # the YAML's order of keys must not decide what is sampled
        space = {"logreg_c": space.pop("logreg_c"), **space}
    cfg = _cfg(tmp_path, space, weights="packaged", algorithm=algorithm)
    configs = sample_configs(cfg, 40)
    linear = [c for c in configs if c["head"] == "linear"]
    assert {c["head_init"] for c in linear} == {"random", "probe"}
    for c in configs:
        # head_init belongs to the SGD-trained linear head; logreg_c to its probe only.
        assert ("head_init" in c) == (c["head"] == "linear"), c
        assert ("logreg_c" in c) == (c.get("head_init") == "probe"), c
    assert column_types(cfg)["head_init"] == "string"


def test_logreg_c_without_a_logreg_head_or_a_probe_is_refused(tmp_path):
    space = {"backbone": "efficientnet_lite0",
             "head": {"type": "choice", "values": ["linear", "svm"]},
             "logreg_c": {"type": "loguniform", "low": 0.1, "high": 10}}
    with pytest.raises(ValueError, match=r"space.logreg_c: applies to head 'logreg' \(or a "
                                         r"linear head with head_init 'probe'\) only"):
        _cfg(tmp_path, space, weights="packaged")
