"""`ftsearch analyze` outputs: the PNG plots and the self-contained report.html."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from search.analysis import load_experiment, summary
from search.cli import main
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
    html = (report_dir / "report.html").read_text()
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


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on this machine")
def test_report_loads_in_headless_chromium(report_dir, tmp_path):
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,2000", (report_dir / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = _image(shot)
    assert pixels.shape[:2] == (2000, 1200)
    not_white = (pixels < 240).any(axis=2).mean()
    assert pixels.std() > 20 and not_white > 0.02, "blank screenshot"


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
    assert "EfficientNet: top-1 over width x depth, coloured by resolution" in html
