"""Every trial parameter in one place: its type, default, range and choices.

:class:`TrialParams` is the schema of the flat dict a trial receives. The driver checks a
config's ``train:`` values and every ``space:`` distribution's bounds and choices against
the same fields (:func:`field_problems`), before Ray starts; the trial validates its dict
with the model again, so a parameter cannot be accepted on one side and refused (or
silently misread) on the other. Strict types: ``amp: "yes"`` or ``lr: "fast"`` is an error,
not a coercion.

No torch here: the registry metadata (:mod:`trainables.models.registry`) and the data spec
(:mod:`trainables.data.spec`) are plain data, so a typo fails fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from trainables.data.spec import parse_spec
from trainables.models.registry import (
    PRETRAINED_WEIGHTS,
    WEIGHT_CHOICES,
    backbone_names,
    backbone_spec,
    default_resolution,
    is_efficientnet,
    stage_count,
)
from trainables.models.scaling import resolve_efficientnet_coefficients

__all__ = [
    "CLASSICAL_HEADS",
    "EFFICIENTNET_KEYS",
    "HEADS",
    "HEAD_PARAMS",
    "OPTIMIZERS",
    "PROBE_C",
    "SVM_KERNELS",
    "TRAINING_PARAMS",
    "TRIAL_PARAMS",
    "TrialParams",
    "field_problems",
    "is_integer_field",
    "is_numeric_field",
    "param_applies",
    "resolve_weights",
    "trial_defaults",
]

# Coefficients of the free `efficientnet` backbone; sampled only for it.
EFFICIENTNET_KEYS = ("width_mult", "depth_mult", "phi", "alpha", "beta", "gamma")
OPTIMIZERS = ("sgd", "adamw")
# The classifier on top of the backbone. `linear` is the network's own head, trained by SGD
# with the unfrozen stages; the others are fitted in one go (scikit-learn, xgboost) on the
# pooled features of a frozen, pretrained backbone (trainables/heads.py).
HEADS = ("linear", "logreg", "svm", "xgboost")
CLASSICAL_HEADS = HEADS[1:]
SVM_KERNELS = ("linear", "rbf")
# Parameters of one classical head: sampled, and recorded, only for trials of that head.
HEAD_PARAMS: dict[str, tuple[str, ...]] = {
    "logreg": ("logreg_c",),
    "svm": ("svm_kernel", "svm_c", "svm_gamma"),
    "xgboost": ("xgb_n_estimators", "xgb_max_depth", "xgb_learning_rate", "xgb_subsample"),
}
# The inverse L2 strength of a logistic regression: the logreg head's, and the one that
# fits LP-FT's probe (``head_init: probe``) for the linear head.
PROBE_C = "logreg_c"
# Parameters of training by SGD: a classical head has no epochs, rates or batches.
TRAINING_PARAMS = ("lr", "lr_scale", "layer_decay", "unfreeze_at_epoch", "head_init",
                   "optimizer", "momentum", "weight_decay", "batch_size", "epochs",
                   "warmup_epochs", "label_smoothing", "augment", "max_steps_per_epoch")
# The network's total stride: a smaller input leaves no pixel for the last stage.
_MIN_RESOLUTION = 32

def _known_backbone(name: str) -> str:
    backbone_spec(name)  # ValueError listing the valid names
    return name


def _check_weights_value(value: str) -> None:
    if not value:
        raise ValueError(f"{value!r} must be one of {list(WEIGHT_CHOICES)} or a state-dict path")


def _valid_weights(weights: str | dict[str, str]) -> str | dict[str, str]:
    if isinstance(weights, dict):
        unknown = [k for k in weights if k != "default" and k not in backbone_names()]
        if unknown:
            raise ValueError(f"unknown backbone(s) {unknown} as keys; keys are backbone names "
                             f"or 'default'; valid backbones are {backbone_names()}")
        for value in weights.values():
            _check_weights_value(value)
    else:
        _check_weights_value(weights)
    return weights


def _valid_data(data: dict[str, Any]) -> dict[str, Any]:
    parse_spec(data)  # ValueError naming data.<key>
    return data


# Validators live in the types, so checking one field alone (field_problems) runs them too.
_Backbone = Annotated[str, AfterValidator(_known_backbone)]
_Weights = Annotated[str | dict[str, str], AfterValidator(_valid_weights)]
_Data = Annotated[dict[str, Any], AfterValidator(_valid_data)]
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# The paper keeps alpha, beta, gamma >= 1: scaling up never shrinks a dimension.
_Coefficient = Annotated[float, Field(ge=1, allow_inf_nan=False)]
_Count = Annotated[int, Field(ge=1)]


class TrialParams(BaseModel):
    """One trial's parameters. Unknown keys are errors that name the key.

    Attributes are grouped as the trial uses them: the model, fine-tuning, optimisation,
    data and execution. ``weights`` may be a mapping backbone -> weights (key ``default``
    for the rest) because a search may mix backbones; :meth:`resolved` picks the entry.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # --- model
    backbone: _Backbone = "resnet18"
    # none | imagenet | packaged | a state-dict path, or a mapping backbone -> one of those
    weights: _Weights = "none"
    resolution: Annotated[int, Field(ge=_MIN_RESOLUTION)] | None = None  # None: the default
    width_mult: _Positive | None = None
    depth_mult: _Positive | None = None
    phi: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    alpha: _Coefficient | None = None
    beta: _Coefficient | None = None
    gamma: _Coefficient | None = None
    # --- head (HEADS; a classical head's own parameters are in HEAD_PARAMS)
    head: Literal[HEADS] = "linear"
    # LP-FT (Kumar et al. 2022): `probe` fits the linear head by logistic regression on the
    # frozen features before fine-tuning starts, instead of starting it from random.
    head_init: Literal["random", "probe"] = "random"
    # Classical heads: pooled output of stage `features_from` (1..stages) instead of the last.
    features_from: Annotated[int, Field(ge=1)] | None = None
    logreg_c: _Positive = 1.0  # inverse L2 strength, as scikit-learn's C (also the probe's)
    svm_kernel: Literal[SVM_KERNELS] = "rbf"
    svm_c: _Positive = 1.0
    svm_gamma: _Positive | None = None  # rbf width; None: scikit-learn's "scale"
    xgb_n_estimators: _Count = 200
    xgb_max_depth: Annotated[int, Field(ge=1, le=20)] = 6
    xgb_learning_rate: Annotated[float, Field(gt=0, le=1)] = 0.3
    xgb_subsample: Annotated[float, Field(gt=0, le=1)] = 1.0
    # --- fine-tuning
    freeze_depth: Annotated[int, Field(ge=0)] = 0
    # If set, freeze_depth = round(fraction * stage count) (a searched `fraction`).
    freeze_fraction: Annotated[float, Field(ge=0, le=1)] | None = None
    lr: _Positive = 0.01  # head learning rate
    lr_scale: _Positive = 0.1  # backbone rate = lr * lr_scale
    layer_decay: Annotated[float, Field(gt=0, le=1)] | None = None
    unfreeze_at_epoch: _Count | None = None
    # --- optimisation
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-4
    batch_size: _Count = 32
    eval_batch_size: _Count = 256
    epochs: _Count = 3
    warmup_epochs: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    augment: bool = False
    max_steps_per_epoch: _Count | None = None  # cap for smoke runs
    # --- data and execution
    data: _Data = Field(default_factory=lambda: {"source": "digits"})
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    # NHWC memory layout, on every device: on CPU, oneDNN's channels-last kernels run a
    # training step of Lite0 in 0.6 of the time and were never slower for another backbone
    # (BENCHMARKS.md, "channels_last on CPU").
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    # Node-local directory of the frozen-stage cache (trainables/cache.py); None: no cache.
    # Searches set it to <storage>/<name>/.cache.
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrialParams:
        if self.backbone != "efficientnet":
            given = [k for k in EFFICIENTNET_KEYS if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{given} only apply to backbone 'efficientnet' (free compound "
                                 f"scaling), not to {self.backbone!r}")
        else:
            resolve_efficientnet_coefficients(**self.efficientnet_kwargs())
        n = stage_count(self.backbone)
        if self.freeze_depth > n:
            raise ValueError(f"freeze_depth={self.freeze_depth} is out of range for backbone "
                             f"{self.backbone!r}: valid values are 0..{n} (0 trains everything, "
                             f"{n} freezes the whole backbone)")
        weights = resolve_weights(self.weights, self.backbone)
        if weights in PRETRAINED_WEIGHTS and weights not in backbone_spec(self.backbone).weights:
            having = [b for b in backbone_names() if weights in backbone_spec(b).weights]
            raise ValueError(f"weights: {weights!r} weights do not exist for {self.backbone!r}; "
                             f"backbones with {weights!r} weights: {having}")
        self._check_head(n)
        if weights == "none" and self.head == "linear" and self.frozen_depth() > 0:
            raise ValueError(f"freeze_depth: {self.frozen_depth()} stages of {self.backbone!r} "
                             f"would stay frozen at their random initial values (weights: "
                             f"'none'); the valid value is 0, or give pretrained weights")
        if weights == "none" and self.head in CLASSICAL_HEADS:
            raise ValueError(f"head: {self.head!r} is fitted on the features of a frozen "
                             f"pretrained backbone, but {self.backbone!r} has weights 'none' "
                             f"(random); use head 'linear' or pretrained weights")
        return self

    def _check_head(self, n: int) -> None:
        classical = self.head in CLASSICAL_HEADS
        if self.features_from is not None:
            if not classical:
                raise ValueError(f"features_from applies to the classical heads "
                                 f"{list(CLASSICAL_HEADS)}, not to head {self.head!r}")
            if self.features_from > n:
                raise ValueError(f"features_from={self.features_from} is out of range for "
                                 f"backbone {self.backbone!r}: valid values are 1..{n}")
        if classical and self.head_init != "random":
            raise ValueError(f"head_init: {self.head_init!r} initialises the linear head; "
                             f"head {self.head!r} is fitted on its own")
        depth = self.features_from or n
        if classical and (self.freeze_depth not in (0, depth) or self.freeze_fraction):
            raise ValueError(f"freeze_depth: head {self.head!r} uses the backbone frozen up to "
                             f"stage {depth} (features_from, default: every stage); leave "
                             f"freeze_depth out or set it to {depth}")

    def frozen_depth(self) -> int:
        """Leading stages kept frozen: a classical head's feature depth, a fraction's
        rounding, or ``freeze_depth``."""
        n = stage_count(self.backbone)
        if self.head in CLASSICAL_HEADS:
            return self.features_from or n
        if self.freeze_fraction is not None:
            return min(n, round(self.freeze_fraction * n))
        return self.freeze_depth

    def resolved(self) -> TrialParams:
        """A copy with ``weights`` picked for the backbone and ``freeze_depth`` derived."""
        return self.model_copy(update={"weights": resolve_weights(self.weights, self.backbone),
                                       "freeze_depth": self.frozen_depth(),
                                       "freeze_fraction": None})

    def efficientnet_kwargs(self) -> dict[str, Any]:
        """What the free ``efficientnet`` builder takes: coefficients, and a free resolution."""
        if self.backbone != "efficientnet":
            return {}
        kwargs = {k: getattr(self, k) for k in EFFICIENTNET_KEYS if getattr(self, k) is not None}
        if self.resolution is not None and self.phi is None:
            kwargs["resolution"] = self.resolution  # with phi it is derived
        return kwargs

    def input_resolution(self) -> int:
        """The side images are resized to: derived under ``phi``, else given, else default."""
        if self.phi is None and self.resolution is not None:
            return self.resolution
        return default_resolution(self.backbone, **self.efficientnet_kwargs())


def param_applies(name: str, config: Mapping[str, Any]) -> bool:
    """Whether trial parameter ``name`` means anything for a trial of ``config``.

    ``config`` may be partial (what is sampled so far, the fixed settings): a missing key
    takes its default. A search samples a parameter only where it applies (a conditional
    space), so its column is empty, not noise, for the other trials: the EfficientNet
    coefficients need ``efficientnet``; freezing, and a classical head, need pretrained
    weights (frozen random weights stay random); a classical head's parameters need that
    head; the SGD settings need the linear head.
    """
    def chosen(key: str) -> Any:
        return config.get(key, TrialParams.model_fields[key].default)

    backbone, head = chosen("backbone"), chosen("head")
    if name in EFFICIENTNET_KEYS:
        return backbone == "efficientnet"
    if name == "resolution":
        return is_efficientnet(backbone)
    if name in ("head", "freeze_depth", "freeze_fraction"):
        pretrained = resolve_weights(chosen("weights"), backbone) != "none"
        return pretrained and (name == "head" or head == "linear")
    if name == "features_from":
        return head in CLASSICAL_HEADS
    if name == PROBE_C:  # the logistic regression of a logreg head, or of LP-FT's probe
        return head == "logreg" or (head == "linear" and chosen("head_init") == "probe")
    for owner, names in HEAD_PARAMS.items():
        if name in names:
            return head == owner and (name != "svm_gamma" or chosen("svm_kernel") == "rbf")
    if name in TRAINING_PARAMS:
        return head == "linear"
    return True


def trial_defaults() -> dict[str, Any]:
    """Every trial parameter's default value."""
    return TrialParams().model_dump()


def resolve_weights(weights: str | Mapping[str, str], backbone: str) -> str:
    """The weights entry that applies to ``backbone`` (a mapping's ``default`` otherwise)."""
    if isinstance(weights, Mapping):
        return weights.get(backbone, weights.get("default", "none"))
    return weights


# Parameters a config may fix in `train:` or search in `space:`; `data` and `seed` have
# their own top-level sections.
TRIAL_PARAMS = tuple(k for k in TrialParams.model_fields if k not in ("data", "seed"))


@cache
def _adapter(name: str) -> TypeAdapter:
    info = TrialParams.model_fields[name]
    return TypeAdapter(Annotated[info.annotation, info], config=ConfigDict(strict=True))


def field_problems(name: str, value: Any) -> list[str]:
    """Why ``value`` is not valid for trial parameter ``name`` on its own (empty if it is).

    Cross-field rules (a freeze depth beyond the backbone's stages, coefficients of another
    backbone) are checked by :class:`TrialParams` on a whole trial.
    """
    if name not in TrialParams.model_fields:
        return [f"unknown trial parameter; valid ones are {sorted(TRIAL_PARAMS)}"]
    try:
        _adapter(name).validate_python(value)
    except ValidationError as err:
        return [_message(err, value)]
    return []


def _message(err: ValidationError, value: Any) -> str:
    first = err.errors()[0]
    text = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":
        text = f"must be one of {first['ctx']['expected']}"
    return f"{text} (got {value!r})"


@cache
def _types(name: str) -> frozenset[str]:
    """The JSON types field ``name`` accepts besides null (``integer``, ``number``...)."""
    schema = _adapter(name).json_schema()
    options = schema.get("anyOf", [schema])
    return frozenset({o.get("type", "string" if "enum" in o else "") for o in options} - {"null"})


def is_integer_field(name: str) -> bool:
    """Whether trial parameter ``name`` takes integers only (not floats)."""
    return _types(name) == {"integer"}


def is_numeric_field(name: str) -> bool:
    """Whether trial parameter ``name`` takes numbers (so a range distribution can fit it)."""
    types = _types(name)
    return bool(types) and types <= {"integer", "number"}
