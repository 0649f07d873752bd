"""Classical classifier heads fitted on pooled, frozen CNN features.

A head is fitted with scikit-learn or XGBoost on ``[N, d]`` features and then evaluated
without the fitted estimator: logreg and svm as float64 torch tensors (reproducing sklearn's
``predict_proba`` / ``decision_function``), xgboost through a booster loaded from JSON text.
``FittedHead.state()`` holds only plain types and tensors, so a saved head loads with
``torch.load(weights_only=True)``: no pickle. sklearn and xgboost are imported where they
are used, so importing this module costs no more than importing torch.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainables.params import CLASSICAL_HEADS, SVM_KERNELS

__all__ = ["FittedHead", "fit_head", "head_from_state", "linear_probe"]

# linear_probe's bias for a class absent from the labels: finite, so LP-FT gradients stay
# finite, yet so far below any fitted logit that softmax gives the class exactly 0.
_ABSENT_BIAS = -1e4
# Elements of one [rows, n_support_vectors] RBF kernel block: bounds scores()' memory.
_KERNEL_BLOCK = 1 << 22
_LOGREG_MAX_ITER = 1000

log = logging.getLogger(__name__)


class FittedHead(nn.Module):
    """A fitted classical head; ``scores`` maps ``[N, d]`` features to ``[N, num_classes]``.

    Attributes:
        kind: One of ``CLASSICAL_HEADS``.
        num_classes: Output columns. Classes absent from the training labels score 0
            (probabilistic heads) or ``-inf`` (svm), so they are never the argmax.
        probabilistic: True when ``scores`` are class probabilities (logreg, xgboost); the
            svm's are decision values whose argmax is ``SVC.predict``.
        classes: The class indices seen in training, in column order of the fitted model.
    """

    kind: str
    probabilistic: bool
    _tensors: tuple[str, ...] = ()  # buffers, stored under the same keys in state()

    def __init__(self, num_classes: int, classes: list[int], **tensors: Tensor) -> None:
        super().__init__()
        self.num_classes, self.classes = num_classes, list(classes)
        for name in self._tensors:
            # float64 so that torch reproduces sklearn's double-precision decisions.
            self.register_buffer(name, tensors[name].to(torch.float64))

    @property
    def in_features(self) -> int:
        """Feature dimension ``d`` the head was fitted on."""
        return self.weight.shape[1]

    def forward(self, features: Tensor) -> Tensor:
        return self.scores(features)

    def scores(self, features: Tensor) -> Tensor:
        """Scores of ``features`` (any device and dtype): float32 on the input's device."""
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must be [N, {self.in_features}], "
                             f"got {list(features.shape)}")
        if not len(features):  # xgboost cannot predict on an empty DMatrix
            return features.new_zeros((0, self.num_classes), dtype=torch.float32)
        present = self._present(features.detach())  # [N, len(classes)], per subclass
        out = present.new_full((len(features), self.num_classes),
                               0.0 if self.probabilistic else float("-inf"))
        out[:, self.classes] = present
        return out.to(features.device, torch.float32)

    def _x64(self, features: Tensor) -> Tensor:
        return features.to(next(self.buffers()).device, torch.float64)

    def state(self) -> dict[str, Any]:
        """Plain-typed description of the head, the inverse of ``head_from_state``."""
        return {"kind": self.kind, "num_classes": self.num_classes, "classes": self.classes,
                **{k: v.detach().cpu().clone() for k, v in self.named_buffers()}}

    @property
    def num_params(self) -> int:
        """Numbers the head stores: tensor elements (xgboost: tree nodes)."""
        return sum(b.numel() for b in self.buffers())

    @property
    def macs_per_image(self) -> int:
        """Multiply-adds to score one feature vector (xgboost: summed tree depths)."""
        return self.weight.numel()


class _LogRegHead(FittedHead):
    kind, probabilistic = "logreg", True
    _tensors = ("weight", "bias")  # one linear layer, the StandardScaler folded in

    def _present(self, features: Tensor) -> Tensor:
        return torch.softmax(self._x64(features) @ self.weight.T + self.bias, dim=1)


class _SVMHead(FittedHead):
    """One-vs-one pair decisions aggregated to one-vs-rest like ``SVC.decision_function``."""

    kind, probabilistic = "svm", False
    kernel: str

    def _present(self, features: Tensor) -> Tensor:
        dec = self._pairs(self._x64(features))
        k = len(self.classes)
        if k == 2:  # sklearn's binary decision is one column, positive for classes[1]
            return torch.cat([-dec, dec], dim=1)
        # sklearn.utils.multiclass._ovr_decision_function(dec < 0, -dec, k), vectorised;
        # triu_indices walks the pairs in libsvm's (0,1), (0,2), ..., (1,2) order.
        i, j = torch.triu_indices(k, k, 1, device=dec.device)
        conf = dec.new_zeros(len(dec), k).index_add_(1, i, dec).index_add_(1, j, -dec)
        won = (dec >= 0).to(dec.dtype)
        votes = dec.new_zeros(len(dec), k).index_add_(1, i, won).index_add_(1, j, 1 - won)
        return votes + conf / (3 * (conf.abs() + 1))

    def state(self) -> dict[str, Any]:
        return {**super().state(), "kernel": self.kernel}


class _LinearSVMHead(_SVMHead):
    kernel = "linear"
    _tensors = ("weight", "bias")  # per-pair hyperplanes [pairs, d], the scaler folded in

    def _pairs(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


class _RBFSVMHead(_SVMHead):
    kernel = "rbf"
    # gamma is sklearn's resolved _gamma ("scale" depends on the data), as a 0-d tensor.
    _tensors = ("mean", "scale", "support_vectors", "dual_coef", "intercept", "gamma")

    @property
    def in_features(self) -> int:
        return self.support_vectors.shape[1]

    def _pairs(self, x: Tensor) -> Tensor:
        x, sv = (x - self.mean) / self.scale, self.support_vectors
        sv_sq = (sv * sv).sum(1)
        out = [self.intercept.expand(0, -1)]
        for block in x.split(max(1, _KERNEL_BLOCK // max(1, len(sv)))):
            sq = ((block * block).sum(1, keepdim=True) + sv_sq - 2 * block @ sv.T).clamp_min(0)
            out.append(torch.exp(-self.gamma * sq) @ self.dual_coef + self.intercept)
        return torch.cat(out)

    @property
    def macs_per_image(self) -> int:
        # Scaling, one squared distance per support vector, then the dual combination.
        return self.in_features + self.support_vectors.numel() + self.dual_coef.numel()


class _XGBoostHead(FittedHead):
    kind, probabilistic = "xgboost", True

    def __init__(self, num_classes: int, classes: list[int], model: str) -> None:
        import xgboost

        super().__init__(num_classes, classes)
        learner = json.loads(model)["learner"]
        trees = learner["gradient_booster"]["model"]["trees"]
        self.model, self._in_features = model, int(learner["learner_model_param"]["num_feature"])
        self._nodes = sum(int(t["tree_param"]["num_nodes"]) for t in trees)
        self._depths = sum(_tree_depth(t["left_children"], t["right_children"]) for t in trees)
        self.booster = xgboost.Booster()
        self.booster.load_model(bytearray(model, "utf-8"))
        # Predict on CPU whatever device fitted it: a saved head must load on any machine.
        self.booster.set_param({"device": "cpu"})

    @property
    def in_features(self) -> int:
        return self._in_features

    def _present(self, features: Tensor) -> Tensor:
        import xgboost

        prob = self.booster.predict(xgboost.DMatrix(features.to("cpu", torch.float32).numpy()))
        if prob.ndim == 1:  # binary:logistic predicts P(classes[1]) only, as predict_proba
            prob = np.stack([1.0 - prob, prob], axis=1)
        return torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))

    def state(self) -> dict[str, Any]:
        return {**super().state(), "model": self.model}

    @property
    def num_params(self) -> int:
        return self._nodes

    @property
    def macs_per_image(self) -> int:
        # A tree costs one comparison per level on the way to a leaf: count each tree's
        # deepest path (an upper bound) as that many multiply-adds.
        return self._depths


def _tree_depth(left: list[int], right: list[int]) -> int:
    level, depth = [0], 0
    while level := [c for n in level for c in (left[n], right[n]) if c != -1]:
        depth += 1
    return depth


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field} must be one of {choices}, got {value!r}")


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
             gamma: float | None, seed: int) -> _SVMHead:
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
        return _LinearSVMHead(num_classes, cls, weight=torch.from_numpy(weight),
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
    return _RBFSVMHead(num_classes, cls, **{n: torch.from_numpy(v) for n, v in tensors.items()})


def _fit_xgboost(features: Tensor, labels: Tensor, num_classes: int, *, n_estimators: int,
                 max_depth: int, learning_rate: float, subsample: float, seed: int,
                 use_cuda: bool) -> _XGBoostHead:
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
    return _XGBoostHead(num_classes, classes.tolist(), model)


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
    _check_choice("kind", kind, CLASSICAL_HEADS)
    _check_choice("svm_kernel", svm_kernel, SVM_KERNELS)
    if kind == "logreg":
        weight, bias, classes = _fit_logreg(features, labels, num_classes, logreg_c, seed)
        return _LogRegHead(num_classes, classes, weight=weight, bias=bias)
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


def head_from_state(state: Mapping[str, Any]) -> FittedHead:
    """Rebuild a head from ``FittedHead.state()`` (e.g. after ``torch.load(weights_only=True)``).

    Raises:
        ValueError: When ``state`` is not a head's state: unknown ``kind`` or ``kernel``,
            missing, malformed or mutually inconsistent fields.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"head state must be a mapping, got {type(state).__name__}")
    _check_choice("head state['kind']", state.get("kind"), CLASSICAL_HEADS)
    num_classes, classes = state.get("num_classes"), state.get("classes")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"head state['num_classes'] must be an int >= 2, got {num_classes!r}")
    if (not isinstance(classes, list) or len(set(classes)) != len(classes) or len(classes) < 2
            or not all(isinstance(c, int) and 0 <= c < num_classes for c in classes)):
        raise ValueError(f"head state['classes'] must list >= 2 distinct class indices in "
                         f"[0, {num_classes}), got {classes!r}")
    kind = state["kind"]
    if kind == "xgboost":
        if not isinstance(state.get("model"), str):
            raise ValueError("head state['model'] must be XGBoost JSON text")
        try:
            head: FittedHead = _XGBoostHead(num_classes, classes, state["model"])
        except Exception as err:  # xgboost's own errors, KeyError on foreign JSON
            raise ValueError(f"head state['model'] is no loadable XGBoost model: {err}") from err
    else:
        cls: type[FittedHead] = _LogRegHead
        if kind == "svm":
            _check_choice("head state['kernel']", state.get("kernel"), SVM_KERNELS)
            cls = _LinearSVMHead if state["kernel"] == "linear" else _RBFSVMHead
        for name in cls._tensors:
            if not isinstance(state.get(name), Tensor):
                raise ValueError(f"head state[{name!r}] must be a tensor, got "
                                 f"{type(state.get(name)).__name__}")
        head = cls(num_classes, classes, **{name: state[name] for name in cls._tensors})
    try:  # one probe row shows whether the fields' shapes fit each other and the classes
        head.scores(torch.zeros(1, head.in_features))
    except (RuntimeError, IndexError, ValueError) as err:
        raise ValueError(f"head state fields have inconsistent shapes: {err}") from err
    return head
