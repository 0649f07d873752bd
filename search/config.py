"""YAML experiment config -> validated, typed :class:`ExperimentConfig`.

Every problem is reported at once, one line each, naming the field path
(``space.freeze_depth.high``), the bad value and what is allowed, before Ray
starts. ``--set key.path=value`` overrides go through the same validation.
Trial parameters are checked against :class:`trainables.params.TrialParams`
(:mod:`search.rules` holds the cross-field rules). No torch, no Ray: a typo fails
in well under two seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from search.storage import experiment_dir
from search.yamlfile import YamlFileError, read_yaml
from trainables.data.spec import parse_spec
from trainables.models.registry import WEIGHT_CHOICES
from trainables.params import TRIAL_PARAMS, TrialParams, resolve_weights

__all__ = [
    "ALGORITHMS",
    "SCHEDULERS",
    "ConfigError",
    "Distribution",
    "ExperimentConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_config",
]

ALGORITHMS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "hyperband", "pbt", "median", "none")
DISTRIBUTION_TYPES = ("choice", "int", "uniform", "loguniform", "fraction")
# An experiment name is one plain directory name: no separators, not "." or "..", not hidden.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"


def _absolute_weights(weights: Any) -> Any:
    """A weights entry with each state-dict path made absolute (keywords left as they are)."""
    if isinstance(weights, Mapping):
        return {k: _absolute_weights(v) for k, v in weights.items()}
    if isinstance(weights, str) and weights and weights not in WEIGHT_CHOICES:
        return str(Path(weights).expanduser().resolve())
    return weights


class ConfigError(ValueError):
    """A config with one or more problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  {p}" for p in self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Distribution(_Strict):
    """One searched parameter.

    ``choice`` takes ``values``; ``int`` takes ``low``, ``high`` and optional
    ``step``; ``uniform``/``loguniform`` take ``low`` and ``high`` (and
    ``grid_points`` for grid search); ``fraction`` (for ``freeze_depth`` only)
    samples a fraction of the backbone's stage count in [low, high].
    """

    type: Literal["choice", "int", "uniform", "loguniform", "fraction"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    grid_points: Annotated[int, Field(ge=1)] = 3

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        if self.type == "choice":
            if not self.values:
                raise ValueError("`choice` needs a non-empty `values` list")
            if self.low is not None or self.high is not None:
                raise ValueError("`choice` takes `values`, not `low`/`high`")
            return self
        if self.values is not None:
            raise ValueError(f"`{self.type}` takes `low` and `high`, not `values`")
        if self.low is None or self.high is None:
            raise ValueError(f"`{self.type}` needs both `low` and `high`")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("`low` and `high` must be finite numbers")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"low={self.low} must be > 0 for a log-uniform range")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("`int` needs integer `low` and `high`")
        if self.type == "fraction" and not 0 <= self.low <= self.high <= 1:
            raise ValueError("`fraction` needs 0 <= low <= high <= 1")
        if self.low > self.high or (self.low == self.high and self.type == "loguniform"):
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step={self.step} must be > 0")
        return self


SpaceEntry = Distribution | Any  # anything that is not a mapping is a fixed value


class Objective(_Strict):
    # The keys of search.contract.OBJECTIVE_COLUMNS: each ranks trials by one column.
    metric: Literal["top1", "top5", "val_loss", "gmacs", "params"]
    mode: Literal["max", "min"]


class CompoundConstraint(_Strict):
    tolerance: Annotated[float, Field(gt=0, lt=2)] = 0.1


class SearchConfig(_Strict):
    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: Annotated[int, Field(ge=1)] = 10
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    time_budget_s: Annotated[float, Field(gt=0)] | None = None
    points_to_evaluate: list[dict[str, Any]] = []
    objectives: Annotated[list[Objective], Field(min_length=1)] = [
        Objective(metric="top1", mode="max")
    ]
    compound_constraint: CompoundConstraint | None = None
    # Warm start from transferability (search.prior): rank the (backbone, depth) cells by
    # LogME before training, run the best `prior_top` first, and with `prune_below` leave
    # out cells scoring below that fraction of the way from the worst score to the best.
    prior: Literal["none", "transferability"] = "none"
    prior_top: Annotated[int, Field(ge=1)] = 3
    prune_below: Annotated[float, Field(gt=0, le=1)] | None = None


class SchedulerConfig(_Strict):
    type: Literal["asha", "hyperband", "pbt", "median", "none"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2
    brackets: Annotated[int, Field(ge=1)] = 1
    max_t: Annotated[int, Field(ge=1)] | None = None  # default: train.epochs
    perturbation_interval: Annotated[int, Field(ge=1)] = 1
    quantile_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.25
    resample_probability: Annotated[float, Field(ge=0, le=1)] = 0.25
    min_samples_required: Annotated[int, Field(ge=1)] = 3


class ResourcesConfig(_Strict):
    cpu: Annotated[float, Field(gt=0)] = 1
    gpu: Annotated[float, Field(ge=0)] = 0

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, gpu: float) -> float:
        # Ray packs fractions of one GPU; above one it only hands out whole GPUs.
        if gpu > 1 and gpu != int(gpu):
            raise ValueError("must be a fraction of one GPU (e.g. 0.5 packs two trials on a "
                             "GPU) or a whole number of GPUs")
        return gpu


class FailureSettings(_Strict):
    max_failures: Annotated[int, Field(ge=0)] = 2


class ExperimentConfig(_Strict):
    """A whole experiment. Build it with :func:`parse_config` or :func:`load_config`."""

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=NAME_PATTERN)]
    storage: Annotated[str, Field(min_length=1)] = "./runs"
    # True declares a local `storage` path to be the same directory on every node (a
    # shared mount ftsearch does not recognise); see `shared_storage`.
    storage_shared: bool = False
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**32)] = 0
    data: dict[str, Any] = {"source": "digits"}
    train: dict[str, Any] = {}
    space: dict[str, SpaceEntry] = {}
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    failure: FailureSettings = FailureSettings()

    @property
    def epochs(self) -> int:
        return int(self.train.get("epochs", TrialParams.model_fields["epochs"].default))

    @property
    def directory(self) -> str:
        """The experiment directory, ``<storage>/<name>`` (absolute for local storage)."""
        return experiment_dir(self.storage, self.name)

    @field_validator("data")
    @classmethod
    def _data(cls, data: dict[str, Any]) -> dict[str, Any]:
        parse_spec(data)  # keys, types and ranges; files are pre-flight's (search.preflight)
        return data

    @model_validator(mode="after")
    def _absolute_paths(self) -> ExperimentConfig:
        # Trials run in other working directories (Tune's trial folders, other nodes): pin
        # relative data and weights paths to the directory the config was loaded from.
        for key in ("path", "val_path", "root"):
            value = self.data.get(key)
            if isinstance(value, str) and "://" not in value:
                self.data[key] = str(Path(value).expanduser().resolve())
        if "weights" in self.train:
            self.train["weights"] = _absolute_weights(self.train["weights"])
        entry = self.space.get("weights")
        if isinstance(entry, Distribution) and entry.values:
            self.space["weights"] = entry.model_copy(
                update={"values": [_absolute_weights(v) for v in entry.values]})
        elif entry is not None:
            self.space["weights"] = _absolute_weights(entry)
        return self

    def searched(self) -> dict[str, Distribution]:
        """The space's distributions (fixed values excluded)."""
        return {k: v for k, v in self.space.items() if isinstance(v, Distribution)}

    def presets_trials(self) -> bool:
        """Whether every trial's parameters are listed when the search starts (a grid, or
        PBT's initial population) rather than proposed one by one by Optuna."""
        return self.search.algorithm == "grid" or self.scheduler.type == "pbt"

    def fixed(self) -> dict[str, Any]:
        """Parameters common to every trial: train settings, fixed space values, data, seed."""
        fixed = {k: v for k, v in self.space.items() if not isinstance(v, Distribution)}
        return {**self.train, **fixed, "data": dict(self.data), "seed": self.seed}

    def backbone_choices(self) -> list[str]:
        default = TrialParams.model_fields["backbone"].default
        entry = self.space.get("backbone", self.train.get("backbone", default))
        if isinstance(entry, Distribution):
            return list(entry.values or [])
        return [entry]

    def weights_choices(self) -> list[tuple[str, str, str]]:
        """Every (field, backbone, weights) a trial can get, in order, without repeats.

        ``field`` says where the value comes from (``train.weights``, ``space.weights``,
        ``space.weights.values``; ``.<backbone>`` or ``.default`` for a mapping entry), so
        the rules and pre-flight name the same place for the same weights.
        """
        default = TrialParams.model_fields["weights"].default
        entry = self.space.get("weights", self.train.get("weights", default))
        if isinstance(entry, Distribution):
            entries = [("space.weights.values", value) for value in entry.values or []]
        else:
            entries = [("space.weights" if "weights" in self.space else "train.weights", entry)]
        choices: dict[tuple[str, str, str], None] = {}
        for where, value in entries:
            for backbone in self.backbone_choices():
                field = where
                if isinstance(value, Mapping):
                    field += f".{backbone if backbone in value else 'default'}"
                choices[(field, backbone, resolve_weights(value, backbone))] = None
        return list(choices)


def _loc(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc if p not in DISTRIBUTION_TYPES or p == loc[0])


def _pydantic_problems(err: ValidationError, prefix: Sequence[Any] = ()) -> list[str]:
    problems = []
    for e in err.errors():
        path = _loc([*prefix, *e["loc"]])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"must be one of {e['ctx']['expected']}"
        elif e["type"] == "string_pattern_mismatch" and path == "name":
            msg = ("must be a plain directory name: letters, digits, '_', '-', '.', not "
                   "starting with '.' or '-'")
        got = e.get("input")
        got_text = "" if e["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        if msg.startswith("data."):  # the data spec's message names its own field
            problems.append(msg)
            continue
        problems.append(f"{path}: {msg}{got_text}")
    return problems


def _parse_space(raw: Any) -> tuple[dict[str, Any], list[str]]:
    if not isinstance(raw, Mapping):
        return {}, [f"space: must be a mapping of trial parameter -> distribution (got {raw!r})"]
    space, problems = {}, []
    for key, value in raw.items():
        if key not in TRIAL_PARAMS:
            problems.append(f"space.{key}: unknown trial parameter; valid ones are "
                            f"{sorted(TRIAL_PARAMS)}")
            continue
        # A mapping is a distribution, except a fixed `weights` mapping backbone -> weights.
        if isinstance(value, Mapping) and (key != "weights" or "type" in value):
            try:
                space[key] = Distribution.model_validate(value)
            except ValidationError as err:
                problems += _pydantic_problems(err, ("space", key))
        else:
            space[key] = value  # fixed; a weights mapping is backbone -> weights
    return space, problems


def parse_config(raw: Any) -> ExperimentConfig:
    """Validates a config mapping; raises :class:`ConfigError` listing every problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError([f"config: the top level must be a mapping (got {type(raw).__name__})"])
    from search.rules import config_problems

    raw = dict(raw)
    space, problems = _parse_space(raw.pop("space", {}))
    try:
        cfg = ExperimentConfig.model_validate({**raw, "space": space})
    except ValidationError as err:
        problems += _pydantic_problems(err)
    if problems:
        # A structural problem first: a rule over a half-read config would report a
        # second, false error (a bad `space.lr` is not "unsearched" in points_to_evaluate).
        raise ConfigError(problems)
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Applies ``key.path=value`` overrides (values parsed as YAML) to a raw config mapping."""
    out = yaml.safe_load(yaml.safe_dump(dict(raw), sort_keys=False))  # deep copy, key order kept
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {item!r}: expected key.path=value"])
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError([f"--set {key}: {p!r} is not a section"])
            node = node.setdefault(p, {})
        node[leaf] = _parse_scalar(value)
    return out


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Reads, overrides and validates a YAML config file."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except YamlFileError as err:
        raise ConfigError([str(err)]) from None
    if not isinstance(raw, Mapping):
        raise ConfigError([f"config: {str(path)!r} must hold a mapping at the top level "
                           f"(got {type(raw).__name__})"])
    return parse_config(apply_overrides(raw, overrides))


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text that :func:`load_config` reads back into an equal config."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    data["space"] = {
        k: (v.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
            | {"type": v.type} if isinstance(v, Distribution) else v)
        for k, v in cfg.space.items()
    }
    return yaml.safe_dump(data, sort_keys=False)
