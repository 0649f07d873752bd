"""The transferability prior: which trials a ranking puts first, and what pruning leaves out."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest

from search import contract as C
from search.config import parse_config
from search.prior import build_prior, cell_of, order_points, space_cells
from search.space import grid_points, make_define_by_run


def _cfg(space: dict, **search) -> object:
    return parse_config({
        "name": "p", "data": {"source": "digits"},
        "train": {"weights": {"efficientnet_lite0": "packaged", "resnet50": "imagenet",
                              "default": "none"}},
        "space": space, "search": {"algorithm": "optuna", **search}})


def _ranking(scores: dict[tuple[str, int], float]) -> pd.DataFrame:
    rows = sorted(scores.items(), key=lambda kv: -kv[1])
    return pd.DataFrame([{"backbone": b, "depth": d, C.TRANSFER_SCORE: s, "rank": i + 1}
                         for i, ((b, d), s) in enumerate(rows)])


LITE = {("efficientnet_lite0", k): s for k, s in
        zip(range(1, 10), [-0.2, -0.19, -0.1, -0.09, 0.0, 0.1, 0.13, 0.09, 0.1], strict=True)}
SPACE = {"backbone": {"type": "choice", "values": ["efficientnet_lite0", "resnet18"]},
         "freeze_depth": {"type": "int", "low": 0, "high": 9},
         "lr": {"type": "loguniform", "low": 0.001, "high": 0.1}}


def test_random_weights_have_no_cells_and_depth_zero_is_no_cell():
    cells = space_cells(_cfg(SPACE))
    assert set(cells) == {"efficientnet_lite0"}
    assert cells["efficientnet_lite0"] == {"linear": list(range(1, 10)), "classical": []}


def test_best_cells_become_the_first_trials_best_first():
    prior = build_prior(_cfg(SPACE, prior="transferability", prior_top=2), _ranking(LITE))
    assert prior.points == [{"backbone": "efficientnet_lite0", "freeze_depth": 7},
                            {"backbone": "efficientnet_lite0", "freeze_depth": 6}]
    assert prior.pruned == [] and prior.depth_limits == {}


def test_a_classical_head_on_the_cell_goes_first_when_the_space_has_one():
    space = {**SPACE, "head": {"type": "choice", "values": ["linear", "svm", "logreg"]},
             "features_from": {"type": "int", "low": 5, "high": 9}}
    prior = build_prior(_cfg(space, prior="transferability", prior_top=3), _ranking(LITE))
    assert prior.points[0] == {"backbone": "efficientnet_lite0", "head": "logreg",
                               "features_from": 7}
    # depth 4 is below features_from's range: the linear head frozen up to it stands for it
    low = build_prior(_cfg(space, prior="transferability", prior_top=9), _ranking(LITE))
    assert {"backbone": "efficientnet_lite0", "head": "linear", "freeze_depth": 4} in low.points


def test_cells_outside_the_space_are_never_enqueued():
    space = {**SPACE, "freeze_depth": {"type": "int", "low": 0, "high": 5}}
    prior = build_prior(_cfg(space, prior="transferability", prior_top=2), _ranking(LITE))
    assert [p["freeze_depth"] for p in prior.points] == [5, 4]


def test_prune_limits_depths_and_drops_a_backbone_left_without_cells():
    space = {**SPACE, "backbone": {"type": "choice",
                                   "values": ["efficientnet_lite0", "resnet50", "resnet18"]}}
    scores = {**LITE, **{("resnet50", k): -1.0 - k for k in range(1, 6)}}
    cfg = _cfg(space, prior="transferability", prune_below=0.8)
    prior = build_prior(cfg, _ranking(scores))
    # threshold: -6 + 0.8 * (0.13 + 6) = -1.096: Lite0's cells all stay, resnet50's go
    assert prior.depth_limits == {"efficientnet_lite0": (1, 9)}
    assert prior.backbones == ["efficientnet_lite0", "resnet18"]  # random weights stay
    assert set(prior.pruned) == {("resnet50", k) for k in range(1, 6)}
    narrow = build_prior(_cfg(SPACE, prior="transferability", prune_below=0.7), _ranking(LITE))
    assert narrow.depth_limits == {"efficientnet_lite0": (6, 9)}


def test_a_pruned_space_samples_only_kept_depths_and_the_enqueued_cells_first():
    cfg = _cfg(SPACE, prior="transferability", prune_below=0.7, prior_top=2)
    prior = build_prior(cfg, _ranking(LITE))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in prior.points:
        study.enqueue_trial(point)
    define = make_define_by_run(prior.config(cfg), prior.depth_limits)
    seen = []
    for _ in range(40):
        trial = study.ask()
        constants = define(trial)  # fills trial.params
        seen.append({**trial.params, **constants})
        study.tell(trial, 0.0)
    assert [s["freeze_depth"] for s in seen[:2]] == [7, 6]
    lite = [s["freeze_depth"] for s in seen if s["backbone"] == "efficientnet_lite0"]
    assert set(lite) <= set(range(6, 10)) and len(set(lite)) > 1
    assert all(s["freeze_depth"] == 0 for s in seen if s["backbone"] == "resnet18")


def test_a_grid_runs_the_best_cells_first_and_skips_pruned_ones():
    space = {**SPACE, "lr": {"type": "loguniform", "low": 0.001, "high": 0.1,
                             "grid_points": 2}}
    grid = _cfg(space, algorithm="grid", prior="transferability", prune_below=0.7, prior_top=2)
    points = grid_points(grid)
    prior = build_prior(grid, _ranking(LITE))
    ordered = order_points(points, grid, prior)
    cells = [cell_of({**grid.fixed(), **p}) for p in ordered]
    assert cells[:4] == [("efficientnet_lite0", 7)] * 2 + [("efficientnet_lite0", 6)] * 2
    assert not {("efficientnet_lite0", k) for k in range(1, 6)} & set(cells)
    assert len(ordered) == len(points) - 5 * 2  # depths 1..5 at two learning rates each


@pytest.mark.parametrize(("problem", "search", "extra"), [
    ("prune_below", {"prune_below": 0.5}, {}),
    ("PBT", {"prior": "transferability", "algorithm": "random"},
     {"scheduler": {"type": "pbt"}}),
])
def test_prior_settings_that_cannot_work_are_refused_naming_the_field(problem, search, extra):
    from search.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"name": "p", "train": {"weights": "packaged",
                                             "backbone": "efficientnet_lite0"},
                      "space": {"lr": {"type": "loguniform", "low": 0.01, "high": 0.1}},
                      "search": search, **extra})
    assert any(p.startswith("search.") and problem in p for p in err.value.problems)


def test_a_prior_over_random_weights_only_is_refused():
    from search.config import ConfigError

    with pytest.raises(ConfigError, match="search.prior: transferability scores pretrained"):
        parse_config({"name": "p", "space": {"backbone": {"type": "choice",
                                                          "values": ["resnet18", "alexnet"]}},
                      "search": {"prior": "transferability"}})
