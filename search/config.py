"""YAML experiment config -> validated, typed :class:`ExperimentConfig`.

Every problem is reported at once, one line each, naming the field path
(``space.freeze_depth.high``), the bad value and what is allowed, before Ray
starts. ``--set key.path=value`` overrides go through the same validation.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainables.backbones import available_weights, backbone_names, stage_count
from trainables.data import check_data_spec
from trainables.finetune import EFFICIENTNET_KEYS, TRIAL_DEFAULTS
from trainables.optim import OPTIMIZERS

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
    "shared_storage",
    "storage_filesystem",
]

ALGORITHMS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "hyperband", "pbt", "median", "none")
DISTRIBUTION_TYPES = ("choice", "int", "uniform", "loguniform", "fraction")

# Trial parameters a config may fix in `train:` or search in `space:`.
# `data` and `seed` have their own top-level sections.
TRIAL_PARAMS = tuple(k for k in TRIAL_DEFAULTS if k not in ("data", "seed"))


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
    metric: Literal["top1", "top5", "val_loss", "gmacs", "params", "samples_per_s"]
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

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    storage: str = "./runs"
    # True declares a local `storage` path to be the same directory on every node (a
    # shared mount ftsearch does not recognise); see `shared_storage`.
    storage_shared: bool = False
    seed: int = 0
    data: dict[str, Any] = {"source": "digits"}
    train: dict[str, Any] = {}
    space: dict[str, SpaceEntry] = {}
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    failure: FailureSettings = FailureSettings()

    @property
    def epochs(self) -> int:
        return int(self.train.get("epochs", TRIAL_DEFAULTS["epochs"]))

    @model_validator(mode="after")
    def _absolute_data_paths(self) -> ExperimentConfig:
        # Trials run in other working directories (and on other nodes): pin paths now.
        for key in ("path", "val_path", "root"):
            value = self.data.get(key)
            if isinstance(value, str) and "://" not in value:
                self.data[key] = str(Path(value).expanduser().resolve())
        return self

    def searched(self) -> dict[str, Distribution]:
        """The space's distributions (fixed values excluded)."""
        return {k: v for k, v in self.space.items() if isinstance(v, Distribution)}

    def fixed(self) -> dict[str, Any]:
        """Parameters common to every trial: train settings, fixed space values, data, seed."""
        fixed = {k: v for k, v in self.space.items() if not isinstance(v, Distribution)}
        return {**self.train, **fixed, "data": dict(self.data), "seed": self.seed}

    def backbone_choices(self) -> list[str]:
        entry = self.space.get("backbone", self.train.get("backbone", TRIAL_DEFAULTS["backbone"]))
        if isinstance(entry, Distribution):
            return list(entry.values or [])
        return [entry]


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
        got = e.get("input")
        got_text = "" if e["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
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
        if isinstance(value, Mapping):
            try:
                space[key] = Distribution.model_validate(value)
            except ValidationError as err:
                problems += _pydantic_problems(err, ("space", key))
        else:
            space[key] = value
    return space, problems


def _check_value(path: str, key: str, value: Any) -> list[str]:
    """Checks one trial parameter value (fixed, or one choice of a distribution)."""
    if key in ("lr", "lr_scale"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0
        ):
            return [f"{path}: {key} must be a number > 0 (got {value!r})"]
    elif key == "backbone" and value not in backbone_names():
        return [f"{path}: unknown backbone {value!r}; valid backbones are {backbone_names()}"]
    elif key == "optimizer" and value not in OPTIMIZERS:
        return [f"{path}: unknown optimizer {value!r}; choose one of {list(OPTIMIZERS)}"]
    elif key in ("resolution", "epochs", "batch_size") and value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value <= 0
    ):
        return [f"{path}: {key} must be an integer > 0 (got {value!r})"]
    elif key in ("weight_decay", "label_smoothing", "momentum") and (
        not isinstance(value, int | float) or value < 0
    ):
        return [f"{path}: {key} must be a number >= 0 (got {value!r})"]
    return []


def _entry_values(entry: Any) -> list[Any]:
    if isinstance(entry, Distribution):
        if entry.type == "choice":
            return list(entry.values or [])
        return [entry.low, entry.high] if entry.type != "fraction" else []
    return [entry]


def _weights_problems(cfg: ExperimentConfig, backbones: list[str]) -> list[str]:
    where = "space.weights" if "weights" in cfg.space else "train.weights"
    weights = cfg.space.get("weights", cfg.train.get("weights", "none"))
    if isinstance(weights, Mapping):
        # backbone -> weights, `default` for the backbones not named
        unknown = [k for k in weights if k != "default" and k not in backbone_names()]
        if unknown:
            return [f"{where}: unknown backbone(s) {unknown}; keys are backbone names or "
                    f"'default'; valid backbones are {backbone_names()}"]
        pairs = [(b, weights.get(b, weights.get("default", "none"))) for b in backbones]
        where_of = {b: f"{where}.{b if b in weights else 'default'}" for b in backbones}
    else:
        pairs = [(b, w) for w in _entry_values(weights) for b in backbones]
        where_of = dict.fromkeys(backbones, where)
    problems = []
    for backbone, w in pairs:
        if w in ("imagenet", "packaged"):
            if w not in available_weights(backbone):
                having = [b for b in backbone_names() if w in available_weights(b)]
                problems.append(f"{where_of[backbone]}: {w!r} weights do not exist for "
                                f"{backbone!r}; backbones with {w!r} weights: {having}")
        elif w != "none" and not Path(str(w)).expanduser().is_file():
            problems.append(f"{where_of[backbone]}: {w!r} is neither none, imagenet, packaged "
                            f"nor an existing state-dict file")
    return sorted(set(problems))


def _points_problems(cfg: ExperimentConfig) -> list[str]:
    """Each warm-start point names searched parameters with values their distributions allow."""
    searched = cfg.searched()
    fraction = "freeze_depth" in searched and searched["freeze_depth"].type == "fraction"
    problems = []
    for i, point in enumerate(cfg.search.points_to_evaluate):
        for key, value in point.items():
            where = f"search.points_to_evaluate[{i}].{key}"
            if key == "freeze_fraction" and fraction:
                key = "freeze_depth"
            elif key == "freeze_depth" and fraction:
                problems.append(f"{where}: freeze_depth is searched as a fraction here; give "
                                f"freeze_fraction (0..1) instead")
                continue
            dist = searched.get(key)
            if dist is None:
                problems.append(f"{where}: not a searched parameter; searched ones are "
                                f"{sorted(searched)}")
            elif dist.type == "choice":
                if value not in (dist.values or []):
                    problems.append(f"{where}: {value!r} is not among {dist.values}")
            elif not isinstance(value, int | float) or not dist.low <= value <= dist.high:
                problems.append(f"{where}: {value!r} is outside [{dist.low:g}, {dist.high:g}]")
    return problems


def _semantic_problems(cfg: ExperimentConfig) -> list[str]:
    problems: list[str] = []
    for key, value in cfg.train.items():
        if key not in TRIAL_PARAMS:
            problems.append(f"train.{key}: unknown key; valid keys are {sorted(TRIAL_PARAMS)}")
        elif key in cfg.space:
            problems.append(f"train.{key}: also in space; fix it in one place only")
        else:
            problems += _check_value(f"train.{key}", key, value)
    for key, entry in cfg.space.items():
        field = f"space.{key}" + (".values" if isinstance(entry, Distribution) else "")
        for value in _entry_values(entry):
            if not isinstance(entry, Distribution) or entry.type == "choice":
                problems += _check_value(field, key, value)
        if isinstance(entry, Distribution) and entry.type == "fraction" and key != "freeze_depth":
            problems.append(f"space.{key}.type: `fraction` is only for freeze_depth")
    if not cfg.searched():
        problems.append("space: no parameter is searched; give at least one distribution "
                        "(e.g. `lr: {type: loguniform, low: 1e-4, high: 1e-1}`)")
    if problems:
        return problems

    # Cross-field checks, now that every single value is sane.
    backbones = cfg.backbone_choices()
    depth = cfg.space.get("freeze_depth", cfg.train.get("freeze_depth", 0))
    max_stages = max(stage_count(b) for b in backbones)
    min_stages = min(stage_count(b) for b in backbones)
    if isinstance(depth, Distribution):
        if depth.type == "int" and depth.low > min_stages:
            problems.append(f"space.freeze_depth.low: {int(depth.low)} is above the stage count "
                            f"of {backbones} (valid: 0..{min_stages})")
        if depth.type == "int" and depth.high > max_stages:
            problems.append(f"space.freeze_depth.high: {int(depth.high)} is above every backbone's "
                            f"stage count (valid: 0..{max_stages}); freeze_depth is capped per "
                            f"backbone at its own stage count")
        if depth.type == "choice" and any(v > min_stages for v in depth.values or []):
            problems.append(f"space.freeze_depth.values: must be within 0..{min_stages} for "
                            f"{backbones}")
    elif not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= min_stages:
        where = "space" if "freeze_depth" in cfg.space else "train"
        problems.append(f"{where}.freeze_depth: {depth!r} is outside 0..{min_stages}, the stage "
                        f"range of {backbones}")
    problems += _weights_problems(cfg, backbones)
    coeffs = [k for k in EFFICIENTNET_KEYS if k in cfg.space or k in cfg.train]
    if coeffs and "efficientnet" not in backbones:
        problems.append(f"space: {coeffs} only apply to backbone 'efficientnet', which is not "
                        f"among the backbones {backbones}")
    if {"phi"} & set(coeffs) and {"width_mult", "depth_mult"} & set(coeffs):
        problems.append("space: give either width_mult/depth_mult(/resolution) or "
                        "phi/alpha/beta/gamma, not both")
    if "phi" in coeffs and ("resolution" in cfg.space or "resolution" in cfg.train):
        problems.append("space.resolution: with phi the resolution is derived "
                        "(224 * gamma**phi); remove resolution from train/space")
    if cfg.search.compound_constraint is not None:
        if "phi" not in coeffs:
            problems.append("search.compound_constraint: needs phi (and alpha/beta) in space")
        if "gamma" in cfg.space:
            problems.append("space.gamma: derived from alpha and beta under "
                            "search.compound_constraint; remove it from space")

    problems += _points_problems(cfg)
    sched = cfg.scheduler
    max_t = sched.max_t or cfg.epochs
    if sched.type in ("asha", "hyperband", "median") and sched.grace_period > max_t:
        problems.append(f"scheduler.grace_period: {sched.grace_period} is larger than the "
                        f"{max_t} epochs a trial runs (scheduler.max_t / train.epochs)")
    if sched.type == "pbt" and cfg.search.algorithm != "random":
        problems.append("scheduler.type: pbt mutates trials itself and works with "
                        "search.algorithm: random only")
    if len(cfg.search.objectives) > 1 and cfg.search.algorithm == "grid":
        problems.append("search.objectives: a grid has no Pareto search; use optuna or random")
    if cfg.search.algorithm == "grid" and sched.type == "pbt":
        problems.append("search.algorithm: grid cannot be combined with scheduler pbt")
    try:
        check_data_spec(cfg.data)
    except ValueError as err:
        problems.append(str(err) if str(err).startswith("data") else f"data: {err}")
    return problems


def _storage_problems(storage: str) -> list[str]:
    if "://" in storage:
        return []  # remote URIs are checked when first written
    path = Path(storage).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return [f"storage: {storage!r} is not a writable directory"]
    return []


# Filesystem types (as /proc/mounts names them) whose files every node sees.
_SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
    "wekafs", "panfs", "afs", "orangefs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "fuse.goofys", "fuse.sshfs",
})


def storage_filesystem(path: str | Path, *, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type holding ``path`` (its nearest existing ancestor), per ``mounts``.

    Returns:
        The type, e.g. ``ext4`` or ``nfs4``; ``None`` where the mount table is unreadable
        (not Linux).
    """
    try:
        table = Path(mounts).read_text()
    except OSError:
        return None
    path = Path(path).expanduser().resolve()
    best, best_type = "", None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts writes a space in a mount point as \040 (octal escapes).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == Path(point) or Path(point) in path.parents
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def shared_storage(cfg: ExperimentConfig, *, mounts: str = "/proc/mounts") -> str | None:
    """Why every Ray node sees the same ``cfg.storage``, or ``None`` if it may be node-local.

    A URI (``s3://``, ``gs://``...) is shared, so is a path on a network or cluster
    filesystem (NFS, EFS, Lustre, a FUSE bucket mount...), and a path the config declares
    shared with ``storage_shared: true``.
    """
    if "://" in cfg.storage:
        return f"{cfg.storage} is a URI"
    if cfg.storage_shared:
        return "the config declares it shared (storage_shared: true)"
    fs = storage_filesystem(cfg.storage, mounts=mounts)
    if fs in _SHARED_FILESYSTEMS:
        return f"{cfg.storage} is on a {fs} filesystem"
    return None


def parse_config(raw: Any) -> ExperimentConfig:
    """Validates a config mapping; raises :class:`ConfigError` listing every problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError([f"config: the top level must be a mapping (got {type(raw).__name__})"])
    raw = dict(raw)
    space, problems = _parse_space(raw.pop("space", {}))
    try:
        cfg = ExperimentConfig.model_validate({**raw, "space": space})
    except ValidationError as err:
        raise ConfigError(problems + _pydantic_problems(err)) from None
    problems += _semantic_problems(cfg) + _storage_problems(cfg.storage)
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
    out = yaml.safe_load(yaml.safe_dump(dict(raw)))  # deep copy of plain data
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
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"config: file {str(path)!r} does not exist"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"config: {str(path)!r} is not valid YAML: {err}"]) from None
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
