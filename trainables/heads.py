"""Classical classifier heads fitted on pooled, frozen CNN features.

A head is fitted with scikit-learn or XGBoost on ``[N, d]`` features and returned as a
:class:`~trainables.fitted_heads.FittedHead`, which scores without the fitted estimator
(:mod:`trainables.fitted_heads`). sklearn and xgboost are imported where they are used, so
importing this module costs no more than importing torch.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainables.fitted_heads import (
    FittedHead,
    LinearSVMHead,
    LogRegHead,
    RBFSVMHead,
    SVMHead,
    XGBoostHead,
    check_choice,
)
from trainables.params import CLASSICAL_HEADS, SVM_KERNELS

__all__ = ["fit_head", "linear_probe"]

# linear_probe's bias for a class absent from the labels: finite, so LP-FT gradients stay
# finite, yet so far below any fitted logit that softmax gives the class exactly 0.
_ABSENT_BIAS = -1e4
_LOGREG_MAX_ITER = 1000

log = logging.getLogger(__name__)


def _training_data(features: Tensor, labels: Tensor, num_classes: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """``(x float64, y, sorted classes present, StandardScaler fitted on x)``, validated."""
    from sklearn.preprocessing import StandardScaler

    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if features.ndim != 2:
        raise ValueError(f"features must be a [N, d] tensor, got shape {list(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be [{features.shape[0]}] to match features, "
                         f"got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class indices, got {labels.dtype}")
    y = labels.detach().to("cpu", torch.int64).numpy()
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"labels must hold at least 2 distinct classes, got {classes.tolist()}")
    x = features.detach().to("cpu", torch.float64).numpy()
    return x, y, classes, StandardScaler().fit(x)


def _fit_logreg(features: Tensor, labels: Tensor, num_classes: int, c: float, seed: int
                ) -> tuple[Tensor, Tensor, list[int]]:
    """Float64 ``(weight, bias)`` rows of the classes present (listed), the scaler folded in."""
    from sklearn.linear_model import LogisticRegression

    x, y, classes, scaler = _training_data(features, labels, num_classes)
    clf = LogisticRegression(C=c, max_iter=_LOGREG_MAX_ITER, random_state=seed)
    clf.fit(scaler.transform(x), y)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary predict_proba is expit(z) = softmax([0, z])
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    coef = coef / scaler.scale_
    return (torch.from_numpy(coef), torch.from_numpy(intercept - coef @ scaler.mean_),
            classes.tolist())


def _fit_svm(features: Tensor, labels: Tensor, num_classes: int, kernel: str, c: float,
             gamma: float | None, seed: int) -> SVMHead:
    from sklearn.svm import SVC

    x, y, classes, scaler = _training_data(features, labels, num_classes)
    svc = SVC(kernel=kernel, C=c, gamma="scale" if gamma is None else gamma,
              decision_function_shape="ovr", break_ties=True, random_state=seed)
    svc.fit(scaler.transform(x), y)
    cls, k = classes.tolist(), len(classes)
    # The public coef_/dual_coef_/intercept_ already carry sklearn's binary sign flip.
    if kernel == "linear":
        weight = svc.coef_ / scaler.scale_
        bias = svc.intercept_ - weight @ scaler.mean_
        return LinearSVMHead(num_classes, cls, weight=torch.from_numpy(weight),
                              bias=torch.from_numpy(bias))
    # Dense [n_SV, pairs] duals as in sklearn.svm._base._one_vs_one_coef: pair (i, j)
    # weighs class i's support vectors by dual_coef_[j - 1] and class j's by dual_coef_[i].
    dual, loc = svc.dual_coef_, np.concatenate([[0], np.cumsum(svc.n_support_)])
    a = np.zeros((dual.shape[1], k * (k - 1) // 2))
    for p, (i, j) in enumerate(itertools.combinations(range(k), 2)):
        a[loc[i]:loc[i + 1], p] = dual[j - 1, loc[i]:loc[i + 1]]
        a[loc[j]:loc[j + 1], p] = dual[i, loc[j]:loc[j + 1]]
    tensors = {"mean": scaler.mean_, "scale": scaler.scale_, "dual_coef": a,
               "support_vectors": svc.support_vectors_, "intercept": svc.intercept_,
               "gamma": np.array(svc._gamma, dtype=np.float64)}
    return RBFSVMHead(num_classes, cls, **{n: torch.from_numpy(v) for n, v in tensors.items()})


def _fit_xgboost(features: Tensor, labels: Tensor, num_classes: int, *, n_estimators: int,
                 max_depth: int, learning_rate: float, subsample: float, seed: int,
                 use_cuda: bool) -> XGBoostHead:
    import xgboost

    x, y, classes, _ = _training_data(features, labels, num_classes)
    device = "cpu"
    if use_cuda and xgboost.build_info().get("USE_CUDA"):
        device = "cuda"
    elif use_cuda:
        log.warning("use_cuda=True but this xgboost build has no CUDA support: fitting on "
                    "CPU. For GPU fitting: pip uninstall -y xgboost-cpu xgboost && "
                    "pip install xgboost")
    clf = xgboost.XGBClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                learning_rate=learning_rate, subsample=subsample,
                                tree_method="hist", random_state=seed, device=device)
    # XGBoost wants labels 0..K'-1; the head maps its columns back to the real classes.
    clf.fit(x.astype(np.float32), np.searchsorted(classes, y))
    model = clf.get_booster().save_raw(raw_format="json").decode()
    return XGBoostHead(num_classes, classes.tolist(), model)


def fit_head(kind: str, features: Tensor, labels: Tensor, *, num_classes: int,
             logreg_c: float = 1.0, svm_kernel: str = "rbf", svm_c: float = 1.0,
             svm_gamma: float | None = None, xgb_n_estimators: int = 200,
             xgb_max_depth: int = 6, xgb_learning_rate: float = 0.3,
             xgb_subsample: float = 1.0, seed: int = 0, use_cuda: bool = False) -> FittedHead:
    """Fit a classical head on frozen features.

    logreg and svm standardize the features (statistics of ``features`` only) first.

    Args:
        kind: One of ``CLASSICAL_HEADS``.
        features: ``[N, d]`` training features (any float dtype, any device).
        labels: ``[N]`` integer class indices in ``[0, num_classes)``, at least two classes.
        num_classes: Output columns; classes absent from ``labels`` are never predicted.
        logreg_c: ``LogisticRegression`` ``C`` (inverse L2 strength).
        svm_kernel: ``SVC`` kernel, ``"linear"`` or ``"rbf"``.
        svm_c: ``SVC`` ``C``.
        svm_gamma: ``SVC`` RBF ``gamma``; None uses sklearn's data-dependent ``"scale"``.
        xgb_n_estimators, xgb_max_depth, xgb_learning_rate, xgb_subsample: The
            ``XGBClassifier`` parameters of those names.
        seed: Random state of the estimator.
        use_cuda: Fit XGBoost on the GPU if the installed build supports CUDA (otherwise
            fit on CPU and log a warning).

    Raises:
        ValueError: On an unknown ``kind`` or ``svm_kernel``, or malformed features/labels.
    """
    check_choice("kind", kind, CLASSICAL_HEADS)
    check_choice("svm_kernel", svm_kernel, SVM_KERNELS)
    if kind == "logreg":
        weight, bias, classes = _fit_logreg(features, labels, num_classes, logreg_c, seed)
        return LogRegHead(num_classes, classes, weight=weight, bias=bias)
    if kind == "svm":
        return _fit_svm(features, labels, num_classes, svm_kernel, svm_c, svm_gamma, seed)
    return _fit_xgboost(features, labels, num_classes, n_estimators=xgb_n_estimators,
                        max_depth=xgb_max_depth, learning_rate=xgb_learning_rate,
                        subsample=xgb_subsample, seed=seed, use_cuda=use_cuda)


def linear_probe(features: Tensor, labels: Tensor, *, num_classes: int, c: float = 1.0,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """Logistic-regression weights to initialise an ``nn.Linear`` classifier (LP-FT).

    Args:
        features: ``[N, d]`` training features.
        labels: ``[N]`` integer class indices in ``[0, num_classes)``.
        num_classes: Rows of the returned weight.
        c: Inverse L2 strength of the logistic regression.
        seed: Random state of the estimator.

    Returns:
        Float32 ``(weight [num_classes, d], bias [num_classes])`` such that
        ``softmax(x @ weight.T + bias)`` equals ``predict_proba`` of ``StandardScaler`` +
        ``LogisticRegression(C=c)`` fitted on the same data (the scaler folded in). Classes
        absent from ``labels`` get a zero row and bias -1e4, so they are never predicted.
    """
    w, b, classes = _fit_logreg(features, labels, num_classes, c, seed)
    weight = torch.zeros(num_classes, w.shape[1])
    bias = torch.full((num_classes,), _ABSENT_BIAS)
    weight[classes], bias[classes] = w.float(), b.float()
    return weight, bias
