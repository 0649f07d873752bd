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
    stage_count,
)
from trainables.models.scaling import resolve_efficientnet_coefficients

__all__ = [
    "EFFICIENTNET_KEYS",
    "OPTIMIZERS",
    "TRIAL_PARAMS",
    "TrialParams",
    "field_problems",
    "is_integer_field",
    "is_numeric_field",
    "resolve_weights",
    "trial_defaults",
]

# Coefficients of the free `efficientnet` backbone; sampled only for it.
EFFICIENTNET_KEYS = ("width_mult", "depth_mult", "phi", "alpha", "beta", "gamma")
OPTIMIZERS = ("sgd", "adamw")
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
    channels_last: bool = True  # on CUDA
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
        return self

    def resolved(self) -> TrialParams:
        """A copy with ``weights`` picked for the backbone and ``freeze_depth`` derived."""
        depth = self.freeze_depth
        if self.freeze_fraction is not None:
            n = stage_count(self.backbone)
            depth = min(n, round(self.freeze_fraction * n))
        return self.model_copy(update={"weights": resolve_weights(self.weights, self.backbone),
                                       "freeze_depth": depth, "freeze_fraction": None})

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
