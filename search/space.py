"""The config's search space as an Optuna define-by-run function.

Define-by-run lets a trial's parameters depend on what was sampled before:
the EfficientNet coefficients exist only when the backbone is ``efficientnet``
(``resolution`` only for the EfficientNet family), a classical head's parameters only
for that head, ``freeze_depth`` is capped at the sampled backbone's stage count and is 0
for random weights, and under a compound-scaling constraint ``gamma`` is drawn only from
the values that keep alpha * beta**2 * gamma**2 within the tolerance of 2.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna

from search.config import Distribution, ExperimentConfig
from trainables.models.registry import stage_count
from trainables.params import CLASSICAL_HEADS, TrialParams, param_applies

__all__ = [
    "DefineByRun",
    "FREEZE_FRACTION",
    "column_types",
    "grid_points",
    "make_define_by_run",
    "make_sampler",
    "sample_configs",
]

# Name of the sampled value when freeze_depth is searched as a fraction of depth.
FREEZE_FRACTION = "freeze_fraction"


def _grid_values(dist: Distribution) -> list[Any]:
    if dist.type == "loguniform":
        values = np.geomspace(dist.low, dist.high, dist.grid_points)
    elif dist.type == "uniform" and dist.step:
        values = np.arange(dist.low, dist.high + dist.step / 2, dist.step)
    else:
        values = np.linspace(dist.low, dist.high, dist.grid_points)
    return [float(f"{v:.6g}") for v in values]


def _suggest(trial: optuna.Trial, name: str, dist: Distribution, *, grid: bool,
             low: float | None = None, high: float | None = None) -> Any:
    low = dist.low if low is None else low
    high = dist.high if high is None else high
    if dist.type == "choice":
        return trial.suggest_categorical(name, dist.values)
    if dist.type == "int":
        return trial.suggest_int(name, int(low), int(high), step=int(dist.step or 1))
    if grid:
        return trial.suggest_categorical(name, _grid_values(dist.model_copy(
            update={"low": low, "high": high})))
    if dist.type == "loguniform":
        return trial.suggest_float(name, low, high, log=True)
    return trial.suggest_float(name, low, high, step=dist.step)


# Sampled first, in this order: whether the rest applies hangs off them (svm_gamma needs
# svm_kernel; the probe's logreg_c needs head_init).
_LEADING = ("backbone", "weights", "head", "head_init", "svm_kernel")
# Sampled last: capped at the sampled backbone's stage count (and after `features_from`).
_TRAILING = ("features_from", "freeze_depth")


def _order(key: str) -> tuple[int, int]:
    if key in _LEADING:
        return 0, _LEADING.index(key)
    if key in _TRAILING:
        return 2, _TRAILING.index(key)
    return 1, 0


class DefineByRun:
    """``f(trial) -> constants``: samples one trial's parameters (picklable, for Tune).

    A parameter is sampled only where it applies (:func:`trainables.params.param_applies`):
    the EfficientNet coefficients for ``efficientnet``, an SVM's ``svm_c`` for ``head: svm``,
    the SGD settings for the linear head. The returned dict holds derived values, which Ray
    Tune merges into the trial config with the sampled ones: ``freeze_depth`` from a
    fraction, ``freeze_depth`` 0 and ``head`` linear for a backbone with random weights
    (frozen random weights would stay random), and a classical head's feature depth.
    """

    def __init__(self, cfg: ExperimentConfig,
                 depth_limits: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.searched = cfg.searched()
        # Backbone -> (lowest, highest) freeze_depth / features_from, from a pruning prior.
        self.depth_limits = dict(depth_limits or {})
        self.fixed = cfg.fixed()
        self.grid = cfg.search.algorithm == "grid"
        self.constraint = cfg.search.compound_constraint
        self.order = sorted(self.searched, key=_order)
        # freeze_depth varies between trials (and has a column) when either is searched.
        self.depth_varies = bool({"freeze_depth", "head"} & set(self.searched))

    def _capped_int(self, trial: optuna.Trial, key: str, dist: Distribution, n: int,
                    backbone: str) -> int:
        low, high = dist.low, min(int(dist.high), n)
        if backbone in self.depth_limits:
            first, last = self.depth_limits[backbone]
            # Depth 0 has no frozen features to score: it goes with depth 1.
            low, high = (low if first <= 1 else max(low, first)), min(high, last)
        return _suggest(trial, key, dist, grid=self.grid, low=min(low, high), high=high)

    def _freeze_depth(self, trial: optuna.Trial, dist: Distribution, n: int, backbone: str,
                      values: dict[str, Any], constants: dict[str, Any]) -> None:
        if dist.type == "fraction":
            frac = _suggest(trial, FREEZE_FRACTION, dist, grid=self.grid)
            constants["freeze_depth"] = min(n, round(frac * n))
        elif dist.type == "int":
            values["freeze_depth"] = self._capped_int(trial, "freeze_depth", dist, n, backbone)
        else:
            values["freeze_depth"] = _suggest(trial, "freeze_depth", dist, grid=self.grid)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        values: dict[str, Any] = {}

        def current(key: str) -> Any:
            if key in values:
                return values[key]
            return constants.get(key, self.fixed.get(key, TrialParams.model_fields[key].default))

        def applies(key: str) -> bool:
            return param_applies(key, {**self.fixed, **constants, **values})

        for key in self.order:
            dist = self.searched[key]
            if not applies(key):
                continue
            n = stage_count(current("backbone"))
            if key == "gamma" and self.constraint:
                continue
            if key == "freeze_depth":
                self._freeze_depth(trial, dist, n, current("backbone"), values, constants)
            elif key == "features_from" and dist.type == "int":
                values[key] = self._capped_int(trial, key, dist, n, current("backbone"))
            else:
                values[key] = _suggest(trial, key, dist, grid=self.grid)
        if "head" in self.searched and not applies("head"):
            constants["head"] = "linear"  # random weights: only the network's own head
        backbone = current("backbone")
        if self.depth_varies and not applies("freeze_depth"):
            classical = current("head") in CLASSICAL_HEADS
            depth = current("features_from") or stage_count(backbone) if classical else 0
            constants["freeze_depth"] = depth
        if self.constraint and backbone == "efficientnet":
            alpha = current("alpha") if "alpha" in values or "alpha" in self.fixed else 1.2
            beta = current("beta") if "beta" in values or "beta" in self.fixed else 1.1
            base = alpha * beta**2
            tol = self.constraint.tolerance
            gamma = Distribution(type="uniform", low=math.sqrt(max(1e-9, 2 - tol) / base),
                                 high=math.sqrt((2 + tol) / base))
            _suggest(trial, "gamma", gamma, grid=self.grid)
        return constants


def make_define_by_run(cfg: ExperimentConfig,
                       depth_limits: Mapping[str, tuple[int, int]] | None = None
                       ) -> DefineByRun:
    """The define-by-run function of ``cfg``'s space (depths limited per backbone)."""
    return DefineByRun(cfg, depth_limits)


def make_sampler(cfg: ExperimentConfig) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``search.algorithm``, seeded with the experiment seed."""
    algorithm, seed = cfg.search.algorithm, cfg.seed
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == "grid":
        # BruteForceSampler walks every branch of a conditional, dynamic space.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.BruteForceSampler(seed=seed)
    parallel = (cfg.search.max_concurrent or 2) > 1
    startup = max(2, min(10, cfg.search.num_samples // 3))
    with warnings.catch_warnings():
        # multivariate/group are flagged experimental; they are what conditional spaces need.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=parallel,
            n_startup_trials=startup,
        )


def grid_points(cfg: ExperimentConfig, *, limit: int = 100_000) -> list[dict[str, Any]]:
    """Every point of a ``grid`` search, conditional branches included, in a seeded order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(cfg))
    define = make_define_by_run(cfg)
    points: list[dict[str, Any]] = []

    def collect(trial: optuna.Trial) -> float:
        constants = define(trial)
        points.append({**trial.params, **constants})
        return 0.0

    # BruteForceSampler stops the study once every branch has been visited.
    study.optimize(collect, n_trials=limit)
    return points


def sample_configs(cfg: ExperimentConfig, n: int) -> list[dict[str, Any]]:
    """Samples ``n`` parameter sets offline (no Ray), exactly as a search would start.

    Used for PBT's initial population and to check reproducibility.
    """
    if cfg.search.algorithm == "grid":
        return grid_points(cfg)[:n]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(cfg))
    for point in cfg.search.points_to_evaluate:
        study.enqueue_trial(point)
    define = make_define_by_run(cfg)
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = define(trial)
        out.append({**trial.params, **constants})
        study.tell(trial, 0.0)
    return out


def _type_of(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int64"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "float64"
    return "string"


def column_types(cfg: ExperimentConfig) -> dict[str, str]:
    """Arrow type names (``int64``, ``float64``, ``string``, ``bool``) of each searched column."""
    types: dict[str, str] = {}
    for key, dist in cfg.searched().items():
        if dist.type == "choice":
            types[key] = _type_of(list(dist.values or []))
        elif dist.type == "int":
            types[key] = "int64"
        elif dist.type == "fraction":
            types[FREEZE_FRACTION] = "float64"
            types[key] = "int64"
        else:
            types[key] = "float64"
    if cfg.search.compound_constraint:
        types["gamma"] = "float64"
    if "head" in types:
        # Derived per trial (0 for random weights, the feature depth for classical heads).
        types.setdefault("freeze_depth", "int64")
    return types
