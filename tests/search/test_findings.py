"""search.findings: each question answered at one epoch, from the trials that can answer it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from search.analysis import Experiment
from search.contract import Status
from search.findings import findings

T, S = Status.TERMINATED, Status.STOPPED_EARLY
LITE = "efficientnet_lite0"
WEIGHTS = {LITE: "packaged", "default": "none"}

# (trial, status, backbone, head, freeze_depth, lr_scale, top-1 per epoch)
TRIALS = [
    ("p3", T, LITE, "linear", 3, 0.1, [60.0, 80.0]),
    ("p3b", T, LITE, "linear", 3, 1.0, [50.0, 70.0]),
    ("p6", T, LITE, "linear", 6, 0.1, [70.0, 75.0]),
    ("lr6", T, LITE, "logreg", 6, None, [95.0]),  # a classical head on stage 6's features
    ("sc1", T, "resnet18", "linear", 0, 1.0, [10.0, 20.0]),
    ("sc2", S, "resnet18", "linear", 0, 0.5, [12.0]),
]


def _experiment() -> Experiment:
    trials = pd.DataFrame([{"trial_id": t, "status": s, "config.backbone": b, "config.head": h,
                            "config.freeze_depth": d, "config.lr_scale": x}
                           for t, s, b, h, d, x, _ in TRIALS])
    epochs = pd.DataFrame([{"trial_id": t, "epoch": e, "top1": v}
                           for t, *_, curve in TRIALS for e, v in enumerate(curve, 1)])
    return Experiment(name="f", directory=Path("."), trials=trials, epochs=epochs,
                      config={"train": {"weights": WEIGHTS}}, started=None)


def test_each_question_from_the_trials_that_can_answer_it():
    fidelity, answers = findings(_experiment())
    assert fidelity is not None and fidelity.epoch == 2
    by = {f.question: f for f in answers}
    assert by["pretrained vs from scratch"].answer.startswith("pretrained, +75.0 points")
    # Freezing: the fine-tuned linear trials only; logreg's stage 6 (95 %) is not "depth 6".
    depth = by["freeze depth"]
    assert depth.answer == "depth 3, +5.0 points over depth 6 (80.0% vs 75.0%)"
    assert "depth 3 2, depth 6 1" in depth.evidence
    assert "also differ" not in depth.evidence  # p3 and p6 share lr_scale 0.1
    # lr_scale: the best ~1/10 trial (p3) against the best ~1 trial (p3b), same depth
    assert by["backbone/head lr ratio (lr_scale)"].answer.startswith(
        "lr_scale 1/30..1/3 (~1/10), +10.0 points")
    head = by["head"]
    assert head.answer == "logreg (stage 6 features), +15.0 points over linear (95.0% vs 80.0%)"


def test_the_evidence_names_what_else_the_compared_trials_differ_in():
    exp = _experiment()
    # p3 now at lr_scale 1: the depth comparison is also one of lr_scale
    exp.trials.loc[exp.trials.trial_id == "p3", "config.lr_scale"] = 1.0
    by = {f.question: f for f in findings(exp)[1]}
    assert by["freeze depth"].evidence.endswith("their best trials also differ in lr_scale")
