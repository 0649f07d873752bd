"""`ftsearch analyze`: leaderboard, best.yaml, importance, Pareto front, bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from search.analysis import best_config, leaderboard, load_experiment
from search.cli import main
from search.config import dump_config, load_config, parse_config
from search.contract import pareto_mask
from search.fidelity import Fidelity
from search.importance import param_importance
from search.space import column_types, sample_configs
from search.store import ResultsStore
from tests.conftest import ROOT, ftsearch_env, run_ftsearch

SEARCHED = {"backbone", "freeze_depth", "lr", "lr_scale"}


def write_experiment(root: Path, name: str, trials: list[tuple[dict, list[float]]], *,
                     space: dict, epochs: int = 3, gmacs: float = 0.1,
                     train: dict | None = None) -> Path:
    """A real results directory (config.yaml + both Parquet files) without training.

    ``trials`` holds (sampled config, top-1 per epoch run) pairs.
    """
    cfg = parse_config({"name": name, "storage": str(root), "data": {"source": "digits"},
                        "train": {"epochs": epochs, **(train or {})}, "space": space,
                        "search": {"num_samples": len(trials)}})
    directory = root / name
    store = ResultsStore(str(directory), param_types=column_types(cfg), max_epochs=epochs)
    for i, (config, curve) in enumerate(trials):
        trial_id = f"{name[:4]}{i:04d}"
        store.start(trial_id, config)
        for epoch, top1 in enumerate(curve, 1):
            store.record_result(trial_id, config, {
                "epoch": epoch, "top1": top1, "top5": min(100.0, top1 + 20), "train_loss": 1.0,
                "val_loss": 1.0, "lr": 0.01, "samples_per_s": 100.0, "seconds": 1.5,
                "params": 1000, "gmacs": gmacs * (1 + i % 3)})
        store.finish(trial_id)
    store.write()
    (directory / "config.yaml").write_text(dump_config(cfg))
    return directory


def analyze_in_subprocess(*args: str) -> subprocess.CompletedProcess:
    """`ftsearch analyze ...` in a fresh interpreter that reports whether Ray got imported."""
    code = ("import sys; from search.cli import main; rc = main(sys.argv[1:]); "
            "print('RAY_IMPORTED', 'ray' in sys.modules); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, "analyze", *args], cwd=ROOT,
                          env=ftsearch_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def analyzed(tiny_experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    proc = analyze_in_subprocess(str(tiny_experiment), "--out", str(out), "--top", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def _expected_order(trials: pd.DataFrame) -> list[str]:
    ranked = trials.sort_values(["best_top1", "last_top1", "trial_id"],
                                ascending=[False, False, True], na_position="last")
    return ranked.trial_id.tolist()


def test_analyze_reads_parquet_only_without_importing_ray(analyzed):
    proc, _ = analyzed
    assert "RAY_IMPORTED False" in proc.stdout


def test_leaderboard_is_trials_parquet_ordered_by_best_top1(analyzed, tiny_experiment):
    proc, out = analyzed
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    expected = _expected_order(trials)
    lines = proc.stdout.split("leaderboard (top 4")[1].splitlines()[2:6]
    assert [line.split()[1] for line in lines] == expected[:4]
    header = proc.stdout.split("leaderboard (top 4")[1].splitlines()[1].split()
    assert {"backbone", "freeze_depth", "lr", "lr_scale", "GMACs", "status"} <= set(header)
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.trial_id.tolist() == expected
    assert board["rank"].tolist() == list(range(1, len(trials) + 1))
    best = trials.set_index("trial_id").loc[expected[0]]
    assert f"best trial: {expected[0]}" in proc.stdout
    assert f"top-1 {best.best_top1:.2f}%" in proc.stdout
    assert f"lr: {best['config.lr']}" in proc.stdout


def test_importance_gives_a_value_per_searched_parameter_or_says_too_few(analyzed,
                                                                         tiny_experiment):
    proc, _ = analyzed
    imp = param_importance(load_experiment(tiny_experiment))
    # The fidelity it compared trials at is stated, in the CLI output too.
    assert (f"importance for top-1 at equal fidelity (tiny, {imp.finished} finished trials): "
            f"{imp.describe_fidelity()}") in proc.stdout
    if imp.finished >= 5:
        assert imp.fidelity.trials >= 5
        values = imp.values["PED-ANOVA"]
        assert set(values) == SEARCHED
        assert all(v >= 0 for v in values.values())
        assert sum(values.values()) == pytest.approx(1.0)
        assert "PED-ANOVA: " in proc.stdout
    else:
        assert imp.values == {} and "too few finished trials" in imp.messages[0]
    if imp.finished < 20:
        assert any("fANOVA: too few finished trials" in m for m in imp.messages)


def test_too_few_finished_trials_is_a_message_not_a_number(tmp_path):
    space = {"lr": {"type": "loguniform", "low": 1e-3, "high": 1.0}}
    directory = write_experiment(tmp_path, "few", [({"lr": 0.01}, [50.0]), ({"lr": 0.1}, [60.0]),
                                                   ({"lr": 0.5}, [20.0])], space=space)
    imp = param_importance(load_experiment(directory))
    assert imp.finished == 3 and imp.values == {}
    assert imp.messages == ["too few finished trials for importance: 3 finished (TERMINATED, "
                            "STOPPED_EARLY, DIVERGED), at least 5 needed"]


def test_both_evaluators_find_the_parameter_that_drives_top1(tmp_path):
    rng = np.random.default_rng(0)
    space = {"lr": {"type": "loguniform", "low": 1e-4, "high": 1.0},
             "lr_scale": {"type": "loguniform", "low": 0.01, "high": 1.0},
             "optimizer": {"type": "choice", "values": ["sgd", "adamw"]}}
    trials = []
    for i in range(40):
        lr, scale = 10 ** rng.uniform(-4, 0), 10 ** rng.uniform(-2, 0)
        top1 = 95 - 20 * abs(np.log10(lr) + 2) + rng.normal(0, 0.5)  # peaks at lr = 0.01
        trials.append(({"lr": lr, "lr_scale": scale, "optimizer": ["sgd", "adamw"][i % 2]},
                       [top1 - 5, top1]))
    imp = param_importance(load_experiment(write_experiment(tmp_path, "lrs", trials,
                                                            space=space)))
    assert set(imp.values) == {"PED-ANOVA", "fANOVA"}
    for values in imp.values.values():
        assert set(values) == {"lr", "lr_scale", "optimizer"}
        assert max(values, key=values.get) == "lr"
    assert imp.values["fANOVA"]["lr"] > 0.5


def test_importance_compares_trials_at_equal_fidelity_not_what_the_scheduler_cut(tmp_path):
    # lr_scale sets top-1 at every epoch; optimizer only how long a trial ran (sgd every
    # epoch, adamw stopped after one). By best top-1 optimizer splits the trials cleanly
    # (fANOVA gave it 0.94); at the common epoch (4) only sgd trials are compared.
    rng = np.random.default_rng(0)
    space = {"lr_scale": {"type": "loguniform", "low": 0.01, "high": 1.0},
             "optimizer": {"type": "choice", "values": ["sgd", "adamw"]}}
    trials = []
    for i in range(20):
        scale, optimizer = 10 ** rng.uniform(-2, 0), ["sgd", "adamw"][i % 2]
        curve = [20 + 10 * (np.log10(scale) + 2) + 10 * epoch for epoch in range(4)]
        trials.append(({"lr_scale": scale, "optimizer": optimizer},
                       curve if optimizer == "sgd" else curve[:1]))
    imp = param_importance(load_experiment(write_experiment(tmp_path, "cut", trials,
                                                            space=space, epochs=4)),
                           fanova_min_trials=10)
    assert imp.finished == 20
    assert imp.fidelity == Fidelity(epoch=4, trials=10, total=20, min_trials=5)
    assert set(imp.values) == {"PED-ANOVA", "fANOVA"}
    for values in imp.values.values():
        assert values["lr_scale"] > 0.9 and values.get("optimizer", 0.0) < 0.1


def test_pareto_mask_keeps_the_non_dominated_points():
    gmacs = [0.1, 0.1, 0.2, 0.3, 0.3, 0.5, float("nan")]
    top1 = [50.0, 40.0, 70.0, 60.0, 80.0, 80.0, 99.0]
    points = list(zip(gmacs, top1, strict=True))
    assert pareto_mask(points, ["min", "max"]).tolist() == [True, False, True, False, True, False,
                                                            False]
    assert pareto_mask([(1.0, 5.0), (1.0, 5.0)], ["min", "max"]).tolist() == [True, True]


def test_best_config_pins_sampled_fraction_and_drops_unsampled_conditionals(tmp_path):
    space = {"backbone": {"type": "choice", "values": ["resnet18", "efficientnet"]},
             "width_mult": {"type": "uniform", "low": 0.5, "high": 1.0},
             "freeze_depth": {"type": "fraction", "low": 0.0, "high": 1.0},
             "lr": {"type": "loguniform", "low": 1e-3, "high": 1.0}}
    trials = [({"backbone": "resnet18", "freeze_fraction": 0.4, "freeze_depth": 2, "lr": 0.05},
               [70.0, 80.0, 85.0]),
              ({"backbone": "efficientnet", "width_mult": 0.7, "freeze_fraction": 0.1,
                "freeze_depth": 1, "lr": 0.2}, [60.0])]
    # Frozen stages need pretrained weights: a state-dict path stands for the user's own.
    exp = load_experiment(write_experiment(tmp_path, "frac", trials, space=space,
                                           train={"weights": str(tmp_path / "own.pt")}))
    assert exp.params == ["backbone", "width_mult", "freeze_fraction", "lr"]
    best = leaderboard([exp]).iloc[0]
    raw = best_config(exp, best)
    assert raw["space"] == {"backbone": {"type": "choice", "values": ["resnet18"]},
                            "freeze_depth": {"type": "fraction", "low": 0.4, "high": 0.4},
                            "lr": {"type": "choice", "values": [0.05]}}
    cfg = parse_config(raw)  # a valid config that `ftsearch run` accepts
    assert cfg.name == "frac-best" and cfg.search.num_samples == 1
    assert cfg.scheduler.type == "none" and cfg.storage == str(tmp_path)


def test_best_config_of_derived_values_is_a_valid_config(tmp_path):
    # freeze_depth 0 of a random backbone, the head it must use, and a classical head's
    # feature depth were derived, not sampled: pinned, they still make a config that runs
    # the same trial (and keeps the same columns).
    space = {"backbone": {"type": "choice", "values": ["efficientnet_lite0", "resnet18"]},
             "head": {"type": "choice", "values": ["linear", "svm"]},
             "freeze_depth": {"type": "int", "low": 0, "high": 9},
             "svm_c": {"type": "loguniform", "low": 0.1, "high": 10.0},
             "lr": {"type": "loguniform", "low": 1e-3, "high": 1.0}}
    trials = [({"backbone": "resnet18", "head": "linear", "freeze_depth": 0, "lr": 0.05},
               [70.0, 80.0, 90.0]),
              ({"backbone": "efficientnet_lite0", "head": "svm", "freeze_depth": 9,
                "svm_c": 2.0}, [85.0])]
    train = {"weights": {"efficientnet_lite0": "packaged", "default": "none"}}
    exp = load_experiment(write_experiment(tmp_path, "heads", trials, space=space, train=train))
    for (config, _), (_, row) in zip(trials, exp.trials.iterrows(), strict=True):
        cfg = parse_config(best_config(exp, row))
        assert sample_configs(cfg, 1) == [config]


@pytest.mark.slow
def test_best_yaml_reruns_the_best_trials_sampled_parameters(analyzed, tiny_experiment):
    _, out = analyzed
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    best = trials.set_index("trial_id").loc[_expected_order(trials)[0]]
    cfg = load_config(out / "best.yaml")
    assert cfg.name == "tiny-best" and cfg.search.num_samples == 1
    proc = run_ftsearch("run", str(out / "best.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rerun = pd.read_parquet(tiny_experiment.parent / "tiny-best" / "trials.parquet")
    assert len(rerun) == 1
    columns = [c for c in trials.columns if c.startswith("config.")]
    assert [c for c in rerun.columns if c.startswith("config.")] == columns
    assert rerun.iloc[0][columns].to_dict() == best[columns].to_dict()


def _copy(experiment: Path, tmp_path: Path) -> Path:
    copy = tmp_path / experiment.name
    copy.mkdir()
    for name in ("trials.parquet", "epochs.parquet", "config.yaml"):
        shutil.copy(experiment / name, copy / name)
    return copy


def test_corrupt_trials_parquet_names_the_file_and_exits_2(tiny_experiment, tmp_path, capsys):
    copy = _copy(tiny_experiment, tmp_path)
    (copy / "trials.parquet").write_bytes(b"PAR1 this is not parquet")
    assert main(["analyze", str(copy), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{copy / 'trials.parquet'}: unreadable Parquet file" in err
    assert not (tmp_path / "out").exists()


def test_missing_epochs_parquet_names_the_file_and_exits_2(tiny_experiment, tmp_path, capsys):
    copy = _copy(tiny_experiment, tmp_path)
    (copy / "epochs.parquet").unlink()
    assert main(["analyze", str(copy)]) == 2
    assert f"{copy / 'epochs.parquet'}: missing" in capsys.readouterr().err


def test_parquet_without_the_results_columns_names_them_and_exits_2(tiny_experiment, tmp_path,
                                                                    capsys):
    copy = _copy(tiny_experiment, tmp_path)
    trials = pd.read_parquet(copy / "trials.parquet").drop(columns=["best_top1"])
    trials.to_parquet(copy / "trials.parquet")
    assert main(["analyze", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy / 'trials.parquet'}: missing column(s) ['best_top1']" in err


def test_several_experiments_share_one_leaderboard_with_an_experiment_column(
        tiny_experiment, tmp_path, capsys):
    space = {"backbone": {"type": "choice", "values": ["resnet18"]},
             "lr": {"type": "loguniform", "low": 1e-3, "high": 1.0}}
    other = write_experiment(tmp_path, "other", [({"backbone": "resnet18", "lr": 0.01},
                                                   [90.0, 99.0, 99.5]),
                                                  ({"backbone": "resnet18", "lr": 0.5}, [1.0])],
                             space=space)
    out = tmp_path / "both"
    assert main(["analyze", str(tiny_experiment), str(other), "--out", str(out)]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    tiny = pd.read_parquet(tiny_experiment / "trials.parquet")
    assert set(board.experiment) == {"tiny", "other"} and len(board) == len(tiny) + 2
    assert board.trial_id.iloc[0] == "othe0000" and board.experiment.iloc[0] == "other"
    assert board.best_top1.is_monotonic_decreasing
    stdout = capsys.readouterr().out
    assert "experiment" in stdout.split("leaderboard (top")[1].splitlines()[1]
    assert "best trial: othe0000 (other)" in stdout
    assert yaml.safe_load((out / "best.yaml").read_text())["name"] == "other-best"
    html = (out / "report.html").read_text()
    assert "ftsearch report: tiny, other" in html
