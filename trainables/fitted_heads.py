"""A fitted classical head as a torch module: scoring, its plain state, and back.

:mod:`trainables.heads` fits the heads with scikit-learn or XGBoost; what it returns lives
here and needs neither to score: logreg and svm as float64 torch tensors (reproducing
sklearn's ``predict_proba`` / ``decision_function``), xgboost through a booster loaded from
JSON text. ``FittedHead.state()`` holds only plain types and tensors, so a saved head loads
with ``torch.load(weights_only=True)`` (no pickle) and :func:`head_from_state` rebuilds it,
as ``ftsearch predict`` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainables.params import CLASSICAL_HEADS, SVM_KERNELS

__all__ = ["FittedHead", "LinearSVMHead", "LogRegHead", "RBFSVMHead", "SVMHead",
           "XGBoostHead", "check_choice", "head_from_state"]

# Elements of one [rows, n_support_vectors] RBF kernel block: bounds scores()' memory.
_KERNEL_BLOCK = 1 << 22


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


class LogRegHead(FittedHead):
    kind, probabilistic = "logreg", True
    _tensors = ("weight", "bias")  # one linear layer, the StandardScaler folded in

    def _present(self, features: Tensor) -> Tensor:
        return torch.softmax(self._x64(features) @ self.weight.T + self.bias, dim=1)


class SVMHead(FittedHead):
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


class LinearSVMHead(SVMHead):
    kernel = "linear"
    _tensors = ("weight", "bias")  # per-pair hyperplanes [pairs, d], the scaler folded in

    def _pairs(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


class RBFSVMHead(SVMHead):
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


class XGBoostHead(FittedHead):
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


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field} must be one of {choices}, got {value!r}")


def head_from_state(state: Mapping[str, Any]) -> FittedHead:
    """Rebuild a head from ``FittedHead.state()`` (e.g. after ``torch.load(weights_only=True)``).

    Raises:
        ValueError: When ``state`` is not a head's state: unknown ``kind`` or ``kernel``,
            missing, malformed or mutually inconsistent fields.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"head state must be a mapping, got {type(state).__name__}")
    check_choice("head state['kind']", state.get("kind"), CLASSICAL_HEADS)
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
            head: FittedHead = XGBoostHead(num_classes, classes, state["model"])
        except Exception as err:  # xgboost's own errors, KeyError on foreign JSON
            raise ValueError(f"head state['model'] is no loadable XGBoost model: {err}") from err
    else:
        cls: type[FittedHead] = LogRegHead
        if kind == "svm":
            check_choice("head state['kernel']", state.get("kernel"), SVM_KERNELS)
            cls = LinearSVMHead if state["kernel"] == "linear" else RBFSVMHead
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
