"""`ftsearch analyze` outputs: the PNG plots and the self-contained report.html."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html import unescape

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from search import contract as C
from search.analysis import leaderboard, load_experiment, summary
from search.cli import main
from search.importance import param_importance
from search.plotkit import STOPPED_EARLY_LABEL
from search.plots import build_figures
from tests.search.test_analysis import write_experiment

ALWAYS = ("freeze_depth.png", "lr_scale.png", "pareto.png", "learning_curves.png")


@pytest.fixture(scope="module")
def report_dir(tiny_experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["analyze", str(tiny_experiment), "--out", str(out)]) == 0
    return out


def _image(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=float)


def _expected_pngs(tiny_experiment) -> list[str]:
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    enough = trials.status.isin(["TERMINATED", "STOPPED_EARLY", "DIVERGED"]).sum() >= 5
    return [*ALWAYS, *(["importance.png"] if enough else [])]


def test_every_promised_png_is_a_non_empty_image(report_dir, tiny_experiment):
    expected = _expected_pngs(tiny_experiment)
    assert sorted(p.name for p in report_dir.glob("*.png")) == sorted(expected)
    for name in expected:
        pixels = _image(report_dir / name)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels.std() > 10, f"{name} is blank"


def test_report_embeds_every_png_and_states_the_experiment(report_dir, tiny_experiment):
    html = (report_dir / "report.html").read_text().replace("<wbr>", "")  # break hints
    embedded = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                          html)]
    pngs = sorted(report_dir.glob("*.png"))
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)
    # Self-contained: nothing is fetched, nothing runs.
    assert not re.search(r'(src|href)="(?!data:)', html) and "<script" not in html
    facts = summary(load_experiment(tiny_experiment))
    assert "ftsearch report: tiny" in html
    assert facts["started"].strftime("%Y-%m-%d %H:%M:%S") in html
    for status, n in facts["by_status"].items():
        if n:
            assert f"{n} {status}" in html
    assert f"{facts['trial_seconds']:,.1f} trial-seconds" in html
    best = facts["best"]
    assert f"Best trial: {best['trial_id']}" in html
    assert f"top-1 {best['best_top1']:.2f} %" in html
    # Importance states its fidelity; the plots say what a hollow marker is.
    imp = param_importance(load_experiment(tiny_experiment))
    assert f"compared at equal fidelity: {imp.describe_fidelity()}" in unescape(html)
    assert f"hollow marker is a trial {STOPPED_EARLY_LABEL}" in html


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                None)


# Appended to a copy of the report (the report itself runs no script): once everything has
# loaded, the page's layout as the title, which --dump-dom prints.
_PROBE = """<script>addEventListener("load", () => { document.title = JSON.stringify({
  width: innerWidth, scroll: document.documentElement.scrollWidth,
  height: document.documentElement.scrollHeight,
  tables: [...document.querySelectorAll("table")].map(t => t.getBoundingClientRect().right),
  images: [...document.querySelectorAll("img")].map(i => i.getBoundingClientRect().right)});
});</script>"""


def _chromium(tmp_path, *args: str, height: int = 2000) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--window-size=1000,{height}", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on this machine")
def test_report_in_headless_chromium_fits_a_1000_px_page(report_dir, tmp_path):
    html = (report_dir / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", _PROBE + "</body>"))
    proc = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    title = re.search(r"<title>(.*?)</title>", proc.stdout, re.S)
    assert title, proc.stdout[-2000:] + proc.stderr[-2000:]
    page = json.loads(unescape(title.group(1)))
    assert page["width"] == 1000
    assert len(page["tables"]) == html.count("<table") >= 4
    assert len(page["images"]) == html.count("<img") >= 4
    # No table (the leaderboard, the experiments' paths) nor plot wider than the page.
    assert max(page["tables"] + page["images"]) <= page["width"], page
    assert page["scroll"] <= page["width"], page

    # The whole page in one screenshot (a window as tall as the page), plots and their
    # stopped-early marks included.
    shot = tmp_path / "report.png"
    height = min(page["height"], 16000)
    proc = _chromium(tmp_path, f"--screenshot={shot}", (report_dir / "report.html").as_uri(),
                     height=height)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = _image(shot)
    assert pixels.shape[:2] == (height, 1000) and height > 3000
    not_white = (pixels < 240).any(axis=2).mean()
    assert pixels.std() > 20 and not_white > 0.02, "blank screenshot"
    assert f"hollow marker is a trial {STOPPED_EARLY_LABEL}" in html


def _stopped_experiments(root):
    """Two experiments, ASHA-like: hand-checkable equal-fidelity values (see the test)."""
    space = {"backbone": {"type": "choice", "values": ["efficientnet_lite0"]},
             "freeze_depth": {"type": "int", "low": 0, "high": 4},
             "lr_scale": {"type": "loguniform", "low": 0.01, "high": 1.0}}
    train = {"weights": {"efficientnet_lite0": "packaged", "default": "none"}}
    lite = {"backbone": "efficientnet_lite0"}
    alpha = [({**lite, "freeze_depth": 0, "lr_scale": 0.01}, [10.0, 20.0, 30.0, 40.0]),
             ({**lite, "freeze_depth": 1, "lr_scale": 0.02}, [15.0, 25.0, 35.0, 45.0]),
             ({**lite, "freeze_depth": 2, "lr_scale": 0.05}, [12.0, 22.0]),
             ({**lite, "freeze_depth": 3, "lr_scale": 0.1}, [11.0, 21.0]),
             ({**lite, "freeze_depth": 1, "lr_scale": 0.2}, [40.0]),
             ({**lite, "freeze_depth": 2, "lr_scale": 0.5}, [5.0])]
    beta = [({**lite, "freeze_depth": 0, "lr_scale": 0.01}, [60.0, 70.0]),
            ({**lite, "freeze_depth": 1, "lr_scale": 0.1}, [65.0, 75.0]),
            ({**lite, "freeze_depth": 2, "lr_scale": 0.3}, [50.0]),
            ({**lite, "freeze_depth": 3, "lr_scale": 0.9}, [55.0, 80.0])]
    return [load_experiment(write_experiment(root, "alpha", alpha, space=space, epochs=4,
                                             train=train)),
            load_experiment(write_experiment(root, "beta", beta, space=space, epochs=2,
                                             train=train))]


def _points(ax, gid: str) -> list[tuple[float, float]]:
    return sorted((float(x), float(y)) for c in ax.collections if c.get_gid() == gid
                  for x, y in c.get_offsets())


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_scatter_plots_mark_stopped_trials_and_keep_experiments_apart(tmp_path):
    experiments = _stopped_experiments(tmp_path)
    alpha_dir = experiments[0].directory
    # A ranking of alpha's cells, so the transferability plot is drawn too.
    ranking = pd.DataFrame([{c: 0.0 for c in C.TRANSFERABILITY_COLUMNS} | {
        "backbone": "efficientnet_lite0", "weights": "packaged", "depth": d, "rank": d,
        "in_space": True, C.TRANSFER_SCORE: -float(d)} for d in (1, 2, 3)])
    ranking.to_parquet(alpha_dir / C.TRANSFERABILITY_FILE)
    figures = build_figures(experiments, leaderboard(experiments), importances=[])
    # alpha: epoch 2 is the highest reached by 4 trials (two ran 4 epochs, two stopped at 2);
    # the two stopped at epoch 1 are left out. beta: epoch 2 has only 3, so epoch 1, all 4.
    freeze = figures["freeze_depth.png"]
    a, b = freeze.axes
    assert a.get_title().startswith("alpha: top-1 at epoch 2, the highest epoch reached by "
                                    "at least 4 trials (4 of 6 trials")
    assert b.get_title().startswith("beta: top-1 at epoch 1")
    assert a.get_ylabel() == "validation top-1 at epoch 2 (%)"
    assert _points(a, "complete") == [(0.0, 20.0), (1.0, 25.0)]
    assert _points(a, "stopped_early") == [(2.0, 22.0), (3.0, 21.0)]
    assert _points(b, "complete") == [(0.0, 60.0), (1.0, 65.0), (3.0, 55.0)]
    assert _points(b, "stopped_early") == [(2.0, 50.0)]
    # Best per depth, one line per experiment, never one pooled line.
    assert [list(line.get_ydata()) for line in a.lines] == [[20.0, 25.0, 22.0, 21.0]]
    assert [list(line.get_ydata()) for line in b.lines] == [[60.0, 65.0, 50.0, 55.0]]
    for name in ("freeze_depth.png", "lr_scale.png", "pareto.png", "transferability.png"):
        axes = figures[name].axes
        assert len(axes) == (1 if name == "transferability.png" else 2), name
        for ax in axes:
            hollow = [c for c in ax.collections if c.get_gid() == "stopped_early"]
            assert hollow and all(c.get_facecolor().size == 0 for c in hollow), name
            assert STOPPED_EARLY_LABEL in _legend(ax), name
    # The Pareto plot shows the objective (best top-1) of every trial, stopped ones hollow.
    pareto = figures["pareto.png"].axes[0]
    assert sorted(y for _, y in _points(pareto, "stopped_early")) == [5.0, 21.0, 22.0, 40.0]
    # A cell is hollow when its best trial was stopped early: depth 1's best ran to its end.
    cells = figures["transferability.png"].axes[0]
    assert [y for _, y in _points(cells, "complete")] == [45.0]
    assert sorted(y for _, y in _points(cells, "stopped_early")) == [21.0, 22.0]


def test_plots_use_the_epoch_importance_compared_trials_at(tmp_path):
    experiments = _stopped_experiments(tmp_path)
    alpha = experiments[0]
    imp = param_importance(alpha)
    # Importance needs 5 finished trials: only epoch 1 has them (all 6).
    assert (imp.fidelity.epoch, imp.fidelity.trials) == (1, 6)
    figures = build_figures([alpha], leaderboard([alpha]), importances=[imp])
    (ax,) = figures["freeze_depth.png"].axes
    assert ax.get_title().startswith("alpha: top-1 at epoch 1 (6 of 6 trials")
    assert "the epoch importance used" in ax.get_title()
    assert [y for _, y in _points(ax, "complete")] == [10.0, 15.0]
    assert "top-1 at epoch 1, the highest epoch reached by at least 5 trials" in (
        figures["importance.png"].axes[0].get_title().replace("\n", " "))
    curves = figures["learning_curves.png"].axes[0]
    assert "equal-fidelity epoch (1)" in _legend(curves)


def test_efficientnet_plot_and_importance_bars_for_a_free_efficientnet_search(tmp_path):
    space = {"backbone": {"type": "choice", "values": ["efficientnet"]},
             "width_mult": {"type": "uniform", "low": 0.5, "high": 1.5},
             "depth_mult": {"type": "uniform", "low": 0.5, "high": 1.5},
             "resolution": {"type": "choice", "values": [64, 96, 128]}}
    rng = np.random.default_rng(1)
    trials = [({"backbone": "efficientnet", "width_mult": float(rng.uniform(0.5, 1.5)),
                "depth_mult": float(rng.uniform(0.5, 1.5)), "resolution": [64, 96, 128][i % 3]},
               [float(rng.uniform(20, 90))] * (3 if i % 2 else 1)) for i in range(6)]
    directory = write_experiment(tmp_path, "effnet", trials, space=space)
    out = tmp_path / "out"
    assert main(["analyze", str(directory), "--out", str(out)]) == 0
    for name in (*ALWAYS, "efficientnet.png", "importance.png"):
        assert _image(out / name).std() > 10, name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6
    assert ("EfficientNet: top-1 at equal fidelity over width x depth, coloured by "
            "resolution") in html
    experiment = load_experiment(directory)
    figures = build_figures([experiment], leaderboard([experiment]),
                            [param_importance(experiment)])
    (ax,) = [a for a in figures["efficientnet.png"].axes if a.get_label() != "<colorbar>"]
    # Odd trials ran 3 epochs, even ones were stopped after 1: all compared at epoch 1.
    assert len(_points(ax, "stopped_early")) == 3 and len(_points(ax, "complete")) == 3
    assert ax.get_title().startswith("effnet: top-1 at epoch 1")
