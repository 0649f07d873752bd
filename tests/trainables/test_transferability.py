"""LogME and the regularised H-score: known answers, and the paper's own formulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables import metrics as M
from trainables.transferability import SCORES, hscore, logme


def _features(n: int, d: int, classes: int, *, separation: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    means = rng.normal(size=(classes, d)) * separation
    features = means[labels] + rng.normal(size=(n, d))
    return torch.tensor(features), torch.tensor(labels)


def _logme_on_gram(f: np.ndarray, y: np.ndarray) -> float:
    """LogME as the paper writes it: eigenvalues of the D x D matrix F^T F, the posterior
    mean m = beta A^-1 F^T y with A = alpha I + beta F^T F, fixed point to convergence."""
    n, d = f.shape
    sigma, v = np.linalg.eigh(f.T @ f)
    sigma = np.clip(sigma, 0, None)
    evidences = []
    for c in range(int(y.max()) + 1):
        target = (y == c).astype(float)
        proj = v.T @ (f.T @ target)
        alpha, beta = 1.0, 1.0
        for _ in range(100):
            gamma = np.sum(beta * sigma / (alpha + beta * sigma))
            m = v @ (beta * proj / (alpha + beta * sigma))
            m2, res2 = m @ m, np.sum((target - f @ m) ** 2)
            new_alpha, new_beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 1e-9
            alpha, beta = new_alpha, new_beta
            if done:
                break
        m = v @ (beta * proj / (alpha + beta * sigma))
        m2, res2 = m @ m, np.sum((target - f @ m) ** 2)
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta)
                    - 0.5 * np.sum(np.log(alpha + beta * sigma)) - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize("score", [logme, hscore])
@pytest.mark.parametrize(("n", "d"), [(400, 32), (120, 300)])  # more images than dims, and fewer
def test_separable_features_score_above_shuffled_labels(score, n, d):
    features, labels = _features(n, d, 5, separation=1.5)
    shuffled = labels[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    good, bad = score(features, labels), score(features, shuffled)
    assert math.isfinite(good) and math.isfinite(bad)
    assert good > bad


@pytest.mark.parametrize("score", [logme, hscore])
def test_more_separated_classes_score_higher(score):
    values = [score(*_features(300, 20, 4, separation=s)) for s in (0.2, 0.6, 1.5)]
    assert values == sorted(values) and values[0] < values[-1]


@pytest.mark.parametrize(("n", "d"), [(200, 16), (60, 150)])
def test_logme_matches_the_papers_formulation_on_the_gram_matrix(n, d):
    features, labels = _features(n, d, 3, separation=0.8, seed=3)
    ours = logme(features, labels)
    assert ours == pytest.approx(_logme_on_gram(features.numpy(), labels.numpy()), abs=2e-3)


def test_hscore_is_bounded_by_the_classes_minus_one():
    # Perfectly separated classes put all whitened variance between them: close to C - 1.
    features, labels = _features(500, 10, 4, separation=50.0)
    assert 2.5 < hscore(features, labels) <= 3.0 + 1e-9


def test_scores_are_named_as_the_metrics_module_names_them():
    assert tuple(SCORES) == M.TRANSFER_SCORES


@pytest.mark.parametrize("score", [logme, hscore])
def test_one_class_or_bad_values_are_refused(score):
    features = torch.randn(10, 4)
    with pytest.raises(ValueError, match="two classes"):
        score(features, torch.zeros(10, dtype=torch.long))
    features[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        score(features, torch.arange(10) % 2)
