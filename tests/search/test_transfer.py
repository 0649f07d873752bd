"""``ftsearch rank`` and ``ftsearch advise`` as a user runs them: no Ray, real data and weights."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pandas as pd
import pytest
import yaml

from search import contract as C
from search.config import load_config
from search.preflight import preflight_problems
from search.transfer import kendall_tau
from tests.conftest import ROOT, ftsearch_env, write_config

CONFIG = {
    "name": "rank", "seed": 0,
    "data": {"source": "digits", "samples_per_class": 10, "val_fraction": 0.1},
    "train": {"resolution": 32, "epochs": 2,
              "weights": {"efficientnet_lite0": "packaged", "default": "none"}},
    "space": {"backbone": {"type": "choice", "values": ["efficientnet_lite0", "resnet18"]},
              "freeze_depth": {"type": "int", "low": 0, "high": 6},
              "lr": {"type": "loguniform", "low": 0.003, "high": 0.3},
              "lr_scale": {"type": "loguniform", "low": 0.01, "high": 1.0}},
    "search": {"num_samples": 4},
}
# Runs the CLI and reports whether Ray was imported at all.
_NO_RAY = ("import sys; from search.cli import main; code = main(sys.argv[1:]); "
           "print('RAY LOADED' if 'ray' in sys.modules else 'no ray'); sys.exit(code)")


def _ftsearch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_RAY, *args], cwd=ROOT, env=ftsearch_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    config = write_config(root / "rank.yaml", {**CONFIG, "storage": str(root / "runs")})
    return config, _ftsearch("rank", str(config)), root / "runs" / "rank"


def test_rank_prints_the_ranked_cells_and_writes_the_contract_file_without_ray(ranked):
    _, proc, directory = ranked
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "no ray"
    assert lines[0].split()[:3] == ["rank", "backbone", "depth"]
    assert any(line.startswith("skipped resnet18: weights 'none'") for line in lines)
    table = pd.read_parquet(directory / C.TRANSFERABILITY_FILE)
    assert list(table.columns) == list(C.TRANSFERABILITY_COLUMNS)
    assert list(table["rank"]) == list(range(1, 10))
    assert table[C.TRANSFER_SCORE].is_monotonic_decreasing
    assert set(table.depth) == set(range(1, 10)) and (table.backbone == "efficientnet_lite0").all()
    assert list(table.sort_values("depth").in_space) == [True] * 6 + [False] * 3
    # each printed cell line is a row, best first
    shown = [line.split() for line in lines[1:10]]
    assert [int(s[2].split("/")[0]) for s in shown] == list(table.depth)
    # each cell's scoring seconds, then the backbone's total: what the ranking cost
    assert [float(s[-1]) for s in shown] == pytest.approx(list(table.score_seconds), abs=0.006)
    total = next(line for line in lines if line.startswith("efficientnet_lite0 (packaged"))
    assert total.endswith(f"{table.backbone_seconds.iloc[0]:.1f} s in all")
    assert table.backbone_seconds.iloc[0] >= table.feature_seconds.iloc[0] > 0
    via_sql = duckdb.sql(f"SELECT depth FROM '{directory / C.TRANSFERABILITY_FILE}' "
                         f"WHERE rank = 1").fetchall()[0][0]
    assert via_sql == table.depth.iloc[0]


def test_a_second_rank_reads_the_features_from_the_cache(ranked):
    config, first, directory = ranked
    again = _ftsearch("rank", str(config))
    assert again.returncode == 0, again.stderr
    assert "read from the frozen-stage cache" in again.stdout
    assert "one forward pass" in first.stdout
    table = pd.read_parquet(directory / C.TRANSFERABILITY_FILE)
    assert (table.feature_seconds == 0).all()


def test_rank_refuses_a_bad_config_before_any_work(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", {**CONFIG, "storage": str(tmp_path),
                                               "data": {"source": "imagefolder",
                                                        "path": str(tmp_path / "none")}})
    proc = _ftsearch("rank", str(bad))
    assert proc.returncode == 2 and proc.stderr.startswith("ftsearch: data.path")
    assert not (tmp_path / "rank").exists()


def test_rank_of_an_experiment_without_pretrained_backbones_names_the_cause(tmp_path):
    scratch = {**CONFIG, "storage": str(tmp_path), "train": {"resolution": 32},
               "space": {"backbone": "resnet18", "lr": CONFIG["space"]["lr"]}}
    proc = _ftsearch("rank", str(write_config(tmp_path / "s.yaml", scratch)))
    assert proc.returncode == 2
    assert "nothing to rank: no backbone of ['resnet18'] has pretrained weights" in proc.stderr


MINE = [{"backbone": "efficientnet_lite0", "freeze_depth": d, "lr": 0.01} for d in (0, 4)]


# 10 per class, and every digit there is: about 160 per class (digits has no 300 of a class).
@pytest.fixture(scope="module", params=[(10, "small"), (None, "large")], ids=["10", "all"])
def advised(request, tmp_path_factory):
    """`ftsearch advise` on CONFIG (with two points of the user's) at a data size: the
    config file, the process, the size it should find."""
    per_class, size = request.param
    root = tmp_path_factory.mktemp(f"advise-{size}")
    raw = {**CONFIG, "storage": str(root / "runs"),
           "data": {**CONFIG["data"], "samples_per_class": per_class},
           "search": {**CONFIG["search"], "points_to_evaluate": MINE}}
    config = write_config(root / "c.yaml", raw)
    return config, _ftsearch("advise", str(config)), size


def test_advise_moves_quadrant_with_data_size_and_writes_a_runnable_config(advised):
    config, proc, size = advised
    assert proc.returncode == 0, proc.stderr
    out = config.with_name("c-advised.yaml")
    said = proc.stdout.splitlines()
    assert said[0].startswith("size:") and f"-> {size}" in said[0]
    assert "-> different" in said[1]  # digits are unlike ImageNet to Lite0's own classifier
    quadrant = f"quadrant: {size} & different"
    assert said[2].startswith(quadrant)
    advised = load_config(out)
    assert not preflight_problems(advised, local=True)  # what `ftsearch run` checks first
    depth = advised.space["freeze_depth"]
    # the rule: less data, more frozen (Lite0's 9 stages: small & different 30-70 % of
    # them, large & different at most 25 %), within the user's own 0..6
    assert (depth.low, depth.high) == ((3, 6) if size == "small" else (0, 2))
    assert advised.space["head"].values == (["linear", "logreg", "svm"] if size == "small"
                                            else ["linear"])
    assert advised.space["lr_scale"].low == 0.1 and advised.space["lr_scale"].high == 1.0
    # the ranking's best cells first, then the user's points inside the advised space
    kept, dropped = (MINE[1], MINE[0]) if size == "small" else (MINE[0], MINE[1])
    points = advised.search.points_to_evaluate
    assert points[-1] == kept and dropped not in points and len(points) >= 2
    low, high = (3, 6) if size == "small" else (0, 2)
    assert f"left out of points_to_evaluate: backbone efficientnet_lite0, freeze_depth " \
           f"{dropped['freeze_depth']}, lr 0.01 (freeze_depth: {dropped['freeze_depth']} is " \
           f"outside [{low}, {high}])" in proc.stdout
    assert yaml.safe_load(out.read_text())["name"] == "rank-advised"
    again = _ftsearch("advise", str(config))  # the user's file is never replaced unasked
    assert again.returncode == 2 and "--out" in again.stderr and "exists" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("advised", [(10, "small")], indirect=True, ids=["10"])
def test_an_advised_config_runs_with_the_prior_and_its_best_cell_first(advised, tmp_path):
    # The small quadrant's advised space has classical heads: one run covers both kinds.
    config, proc, _ = advised
    assert proc.returncode == 0, proc.stderr
    # advise put the ranking's best cells into points_to_evaluate; without them, the order
    # below can come from the run's own prior only.
    advised = yaml.safe_load(config.with_name("c-advised.yaml").read_text())
    assert advised["search"].pop("points_to_evaluate")
    run_config = write_config(tmp_path / "run.yaml", {**advised,
                                                     "storage": str(tmp_path / "runs")})
    run = subprocess.run([sys.executable, "-m", "search.cli", "run", str(run_config),
                          "--set", "search.prior=transferability", "--set", "search.prior_top=2",
                          "--set", "search.num_samples=2", "--set", "search.max_concurrent=1",
                          "--set", "train.max_steps_per_epoch=2",
                          "--set", "train.eval_batch_size=512"],
                         cwd=ROOT, env=ftsearch_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    directory = tmp_path / "runs" / "rank-advised"
    ranking = pd.read_parquet(directory / C.TRANSFERABILITY_FILE)
    said = [line for line in run.stdout.splitlines() if line.startswith("transferability prior")]
    assert len(said) == 1 and "9 cells ranked" in said[0]
    trials = pd.read_parquet(directory / C.TRIALS_FILE)
    in_space = ranking[ranking.in_space].sort_values("rank")
    first = trials.iloc[0]
    # the advised small & different space has classical heads: logreg on the best cell
    assert first["config.head"] == "logreg"
    assert first["config.features_from"] == in_space.depth.iloc[0]
    assert trials.iloc[1]["config.features_from"] == in_space.depth.iloc[1]
    assert len(trials) == 2 and set(trials.status) == {"TERMINATED"}


def test_kendall_tau_counts_concordant_and_discordant_cell_pairs():
    cells = pd.DataFrame({C.TRANSFER_SCORE: [0.1, 0.2, 0.3, 0.4],
                          "best_top1": [50.0, 60.0, 80.0, 70.0]})
    # 6 pairs, one discordant (the last two): (5 - 1) / 6
    assert kendall_tau(cells) == pytest.approx(4 / 6)
    assert kendall_tau(cells.assign(best_top1=-cells.best_top1)) == pytest.approx(-4 / 6)
    assert kendall_tau(cells.head(2)) != kendall_tau(cells.head(2))  # NaN: too few cells
