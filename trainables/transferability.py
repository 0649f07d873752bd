"""Transferability scores: how well frozen features already separate a dataset's classes.

Computed before any training, on the pooled output of a pretrained backbone's stages
(:func:`trainables.cache.pooled_stage_features`), they rank (backbone, depth) cells at a
fraction of a fine-tuning run's cost:

* :func:`logme` -- LogME (You et al., *LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning*, ICML 2021): the log marginal evidence, per sample, of a Bayesian
  linear model from the features to each class's one-hot indicator, with the prior and
  noise precisions (alpha, beta) set by the paper's evidence-maximisation fixed point;
  averaged over classes. Higher is better.
* :func:`hscore` -- the shrinkage-regularised H-score (Bao et al., *An Information-Theoretic
  Approach to Transferability in Task Transfer Learning*, ICIP 2019; regularised by Ibrahim
  et al., *Newer is not always better: Rethinking transferability metrics*, WACV 2023):
  ``tr(cov_f^-1 cov_g)`` with ``cov_g`` the covariance of the class-conditional means and
  ``cov_f`` shrunk towards a scaled identity by the Ledoit-Wolf estimate, so it stays
  defined when there are fewer images than feature dimensions. Higher is better.

Both are vectorised in float64 torch and need no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from trainables import metrics as M

__all__ = ["SCORES", "hscore", "logme"]

# The fixed point converges in two or three steps in practice; the paper caps it at 11.
_LOGME_MAX_STEPS = 11
_LOGME_TOL = 1e-3
_EPS = 1e-5


def _checked(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(f"features must be [N, D] and labels [N], got {list(features.shape)} "
                         f"and {list(labels.shape)}")
    if len(labels) < 2 or int(labels.unique().numel()) < 2:
        raise ValueError("a score needs at least two images of at least two classes")
    if not torch.isfinite(features).all():
        raise ValueError("features hold NaN or infinite values")
    return features.detach().to("cpu", torch.float64), labels.detach().to("cpu", torch.long)


def logme(features: Tensor, labels: Tensor) -> float:
    """LogME of ``features`` ``[N, D]`` for class ``labels`` ``[N]`` (mean over classes).

    For each class c, with y the indicator of c, the model is y = F w + noise, w ~ N(0, I/alpha),
    noise ~ N(0, I/beta). Writing F = U S V^T (thin SVD, k = min(N, D) singular values s_i,
    sigma_i = s_i^2) and x = U^T y, the paper's fixed point iterates, with t = alpha / beta,

        gamma = sum sigma_i / (sigma_i + t)
        |m|^2 = sum sigma_i x_i^2 / (sigma_i + t)^2          (m: the posterior mean of w)
        |y - F m|^2 = sum x_i^2 t^2 / (sigma_i + t)^2 + (|y|^2 - |x|^2)
        alpha = gamma / |m|^2,   beta = (N - gamma) / |y - F m|^2

    and the evidence per sample is

        [D/2 log alpha + N/2 log beta - 1/2 log det(alpha I + beta F^T F)
         - beta/2 |y - F m|^2 - alpha/2 |m|^2 - N/2 log 2 pi] / N,

    where the log-determinant runs over all D eigenvalues of F^T F: the D - k zero ones add
    (D - k) log alpha, as in the paper's own formulation on F^T F. All classes iterate at
    once; a class stops moving once its t changes by less than 0.1 %.
    """
    f, y = _checked(features, labels)
    n, d = f.shape
    onehot = torch.nn.functional.one_hot(y).to(torch.float64)  # [N, C]
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    sigma = (s**2)[:, None]  # [k, 1]
    x = u.T @ onehot  # [k, C]
    x2 = x**2
    rest = (onehot**2).sum(0) - x2.sum(0)  # |y|^2 - |x|^2: y outside F's column space
    classes = onehot.shape[1]
    alpha = torch.ones(classes, dtype=torch.float64)
    beta = torch.ones(classes, dtype=torch.float64)
    moving = torch.ones(classes, dtype=torch.bool)
    for _ in range(_LOGME_MAX_STEPS):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum(0)
        m2 = (sigma * x2 / (sigma + t) ** 2).sum(0)
        res2 = (x2 * t**2 / (sigma + t) ** 2).sum(0) + rest
        new_alpha = gamma / (m2 + _EPS)
        new_beta = (n - gamma) / (res2 + _EPS)
        alpha = torch.where(moving, new_alpha, alpha)
        beta = torch.where(moving, new_beta, beta)
        moving &= ((alpha / beta - t).abs() / t) > _LOGME_TOL
        if not moving.any():
            break
    t = alpha / beta
    m2 = (sigma * x2 / (sigma + t) ** 2).sum(0)
    res2 = (x2 * t**2 / (sigma + t) ** 2).sum(0) + rest
    k = sigma.shape[0]
    log_det = torch.log(alpha + beta * sigma).sum(0) + (d - k) * torch.log(alpha)
    evidence = (d / 2 * torch.log(alpha) + n / 2 * torch.log(beta) - log_det / 2
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi)) / n
    return float(evidence.mean())


def hscore(features: Tensor, labels: Tensor) -> float:
    """Shrinkage-regularised H-score of ``features`` ``[N, D]`` for ``labels`` ``[N]``.

    ``tr(((1 - a) cov_f + a mu I)^-1 (1 - a) cov_g)``, with ``cov_f`` the feature covariance,
    ``mu`` its mean eigenvalue, ``a`` the Ledoit-Wolf shrinkage (scikit-learn's
    ``ledoit_wolf_shrinkage``), and ``cov_g`` the covariance of the features with each image
    replaced by its class mean: how much of the features' variance, whitened, lies between
    classes. It is at most the number of classes minus one.
    """
    from sklearn.covariance import ledoit_wolf_shrinkage

    f, y = _checked(features, labels)
    f = f - f.mean(0)
    n, d = f.shape
    shrink = float(ledoit_wolf_shrinkage(f.numpy(), assume_centered=True))
    cov_f = f.T @ f / n
    mu = torch.trace(cov_f) / d
    regularised = (1 - shrink) * cov_f + shrink * mu * torch.eye(d, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(y).to(torch.float64)
    counts = onehot.sum(0).clamp_min(1)
    means = (onehot.T @ f) / counts[:, None]  # [C, D]
    g = means[y]  # every image as its class mean
    cov_g = g.T @ g / n
    solved = torch.linalg.solve(regularised, (1 - shrink) * cov_g)
    return float(torch.trace(solved))


# Name -> score, in the order of metrics.TRANSFER_SCORES (the first ranks the cells).
SCORES: dict[str, Callable[[Tensor, Tensor], float]] = {M.LOGME: logme, M.HSCORE: hscore}
