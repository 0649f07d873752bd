"""The rules a parsed config must follow beyond its types.

Every trial parameter in ``train:`` and ``space:`` is checked against its field of
:class:`trainables.params.TrialParams` (a distribution's range must lie inside the field's
valid range, its choices must be valid values), then the rules that tie fields together:
freeze depth against the sampled backbones' stages, pretrained weights against the
backbones that have them, heads against weights (no frozen random weights, no classical
head on random features) and each head's own parameters, EfficientNet coefficients,
warm-start points, scheduler settings, the transferability prior.
Files (weights, data folders, storage) are checked later, by :mod:`search.preflight`.
"""

from __future__ import annotations

from typing import Any

from search.config import Distribution, ExperimentConfig
from trainables.models.registry import (
    PRETRAINED_WEIGHTS,
    available_weights,
    backbone_names,
    stage_count,
)
from trainables.params import (
    CLASSICAL_HEADS,
    EFFICIENTNET_KEYS,
    HEAD_PARAMS,
    PROBE_C,
    TRIAL_PARAMS,
    TrialParams,
    field_problems,
    is_integer_field,
    is_numeric_field,
    param_applies,
    resolve_weights,
)

__all__ = ["config_problems"]


def _value_problems(path: str, key: str, value: Any) -> list[str]:
    return [f"{path}: {problem}" for problem in field_problems(key, value)]


def _distribution_problems(key: str, dist: Distribution) -> list[str]:
    where = f"space.{key}"
    if dist.type == "choice":
        return [p for v in dist.values or [] for p in _value_problems(f"{where}.values", key, v)]
    if dist.type == "fraction":
        if key != "freeze_depth":
            return [f"{where}.type: `fraction` is only for freeze_depth"]
        return []
    if not is_numeric_field(key):
        return [f"{where}.type: {key} is not a number; search it with "
                f"`{{type: choice, values: [...]}}`"]
    if is_integer_field(key) and dist.type != "int":
        return [f"{where}.type: {key} takes integers; use `int` (or `choice`), not "
                f"`{dist.type}`"]
    problems = []
    for bound in ("low", "high"):
        value = getattr(dist, bound)
        value = int(value) if dist.type == "int" else value
        problems += _value_problems(f"{where}.{bound}", key, value)
    return problems


def _single_field_problems(cfg: ExperimentConfig) -> list[str]:
    problems: list[str] = []
    for key, value in cfg.train.items():
        if key not in TRIAL_PARAMS:
            problems.append(f"train.{key}: unknown key; valid keys are {sorted(TRIAL_PARAMS)}")
        elif key in cfg.space:
            problems.append(f"train.{key}: also in space; fix it in one place only")
        else:
            problems += _value_problems(f"train.{key}", key, value)
    for key, entry in cfg.space.items():
        if isinstance(entry, Distribution):
            problems += _distribution_problems(key, entry)
        else:
            problems += _value_problems(f"space.{key}", key, entry)
    if not cfg.searched():
        problems.append("space: no parameter is searched; give at least one distribution "
                        "(e.g. `lr: {type: loguniform, low: 1e-4, high: 1e-1}`)")
    return problems


def _stage_range_problems(cfg: ExperimentConfig, key: str, backbones: list[str], *,
                          first: int) -> list[str]:
    """A stage count (``freeze_depth`` from 0, ``features_from`` from 1) within the stages
    of the backbones it applies to; a searched range is capped per backbone."""
    entry = cfg.space.get(key, cfg.train.get(key))
    max_stages = max(stage_count(b) for b in backbones)
    min_stages = min(stage_count(b) for b in backbones)
    if entry is None:
        return []
    if not isinstance(entry, Distribution):
        if entry > min_stages:
            return [f"{_where(cfg, key)}: {entry!r} is outside {first}..{min_stages}, the "
                    f"stage range of {backbones}"]
        return []
    problems = []
    if entry.type == "int" and entry.low > min_stages:
        problems.append(f"space.{key}.low: {int(entry.low)} is above the stage count "
                        f"of {backbones} (valid: {first}..{min_stages})")
    if entry.type == "int" and entry.high > max_stages:
        problems.append(f"space.{key}.high: {int(entry.high)} is above every backbone's "
                        f"stage count (valid: {first}..{max_stages}); {key} is capped per "
                        f"backbone at its own stage count")
    if entry.type == "choice" and any(v > min_stages for v in entry.values or []):
        problems.append(f"space.{key}.values: must be within {first}..{min_stages} for "
                        f"{backbones}")
    return problems


def _where(cfg: ExperimentConfig, key: str) -> str:
    return f"space.{key}" if key in cfg.space else f"train.{key}"


def _choices(cfg: ExperimentConfig, key: str) -> list[Any] | None:
    """The values ``key`` can take in a trial, or None for a numeric range."""
    entry = cfg.space.get(key, cfg.train.get(key, TrialParams.model_fields[key].default))
    if not isinstance(entry, Distribution):
        return [entry]
    return list(entry.values or []) if entry.type == "choice" else None


def _given(cfg: ExperimentConfig, key: str) -> bool:
    return key in cfg.space or key in cfg.train


def _head_problems(cfg: ExperimentConfig, backbones: list[str]) -> list[str]:
    """Heads against weights and freezing; each head's parameters only with that head."""
    heads = _choices(cfg, "head") or []
    classical = [h for h in heads if h in CLASSICAL_HEADS]
    random = sorted({b for _, b, w in cfg.weights_choices() if w == "none"})
    problems = []
    searched = cfg.searched()
    depth = cfg.space.get("freeze_depth", cfg.train.get("freeze_depth", 0))
    if random:
        if classical and "head" not in searched:
            problems.append(f"{_where(cfg, 'head')}: {classical[0]!r} is fitted on frozen "
                            f"pretrained features, but {random} have weights 'none' (random); "
                            f"use head 'linear' there or pretrained weights")
        if not isinstance(depth, Distribution) and depth:
            problems.append(f"{_where(cfg, 'freeze_depth')}: {depth!r} would keep stages of "
                            f"{random} frozen at their random initial values (weights: "
                            f"'none'); the valid value there is 0 (search freeze_depth to vary "
                            f"it for pretrained backbones only), or give pretrained weights")
        pretrained = {b for _, b, w in cfg.weights_choices() if w != "none"}
        # A one-value choice of the only possible value (best.yaml pins a derived one) is fine.
        only = {"head": [["linear"]], "freeze_depth": [[0]]}
        for key in ("head", "freeze_depth"):
            if key in searched and not pretrained and _choices(cfg, key) not in only[key]:
                problems.append(f"space.{key}: every backbone here ({random}) has weights "
                                f"'none', so every trial uses "
                                f"{'head linear' if key == 'head' else 'freeze_depth 0'}; "
                                f"give pretrained weights or fix it")
    probe = "linear" in heads and "probe" in (_choices(cfg, "head_init") or [])
    for head, keys in HEAD_PARAMS.items():
        for key in keys:
            if key == PROBE_C and probe:
                continue  # also sets the probe's regularisation
            if _given(cfg, key) and head not in heads:
                also = " (or a linear head with head_init 'probe')" if key == PROBE_C else ""
                problems.append(f"{_where(cfg, key)}: applies to head {head!r}{also} only; "
                                f"the heads here are {heads}")
    if _given(cfg, "svm_gamma") and "rbf" not in (_choices(cfg, "svm_kernel") or ["rbf"]):
        problems.append(f"{_where(cfg, 'svm_gamma')}: applies to svm_kernel 'rbf' only")
    if _given(cfg, "features_from") and not classical:
        problems.append(f"{_where(cfg, 'features_from')}: applies to the classical heads "
                        f"{list(CLASSICAL_HEADS)}; the heads here are {heads}")
    if classical and "head" not in searched and depth and not isinstance(depth, Distribution):
        problems.append(f"{_where(cfg, 'freeze_depth')}: head {classical[0]!r} uses the whole "
                        f"frozen backbone (features_from picks an earlier stage); remove "
                        f"freeze_depth")
    if classical and "probe" in (_choices(cfg, "head_init") or []) and "head" not in searched:
        problems.append(f"{_where(cfg, 'head_init')}: 'probe' initialises the linear head; "
                        f"head {classical[0]!r} is fitted on its own")
    problems += _stage_range_problems(cfg, "features_from", backbones, first=1)
    if classical and cfg.scheduler.type == "pbt":
        problems.append(f"scheduler.type: pbt mutates the training of running trials; the "
                        f"classical heads {classical} are fitted in one go. Use asha, "
                        f"hyperband, median or none")
    return problems


def _weights_problems(cfg: ExperimentConfig) -> list[str]:
    problems = set()
    for field, backbone, chosen in cfg.weights_choices():
        if chosen in PRETRAINED_WEIGHTS and chosen not in available_weights(backbone):
            having = [b for b in backbone_names() if chosen in available_weights(b)]
            problems.add(f"{field}: {chosen!r} weights do not exist for {backbone!r}; "
                         f"backbones with {chosen!r} weights: {having}")
    return sorted(problems)


def _efficientnet_problems(cfg: ExperimentConfig, backbones: list[str]) -> list[str]:
    problems = []
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
    return problems


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
            reason = _point_reason(cfg, point, key)
            if reason:
                problems.append(f"{where}: {reason}")
            elif dist is None:
                problems.append(f"{where}: not a searched parameter; searched ones are "
                                f"{sorted(searched)}")
            elif dist.type == "choice":
                if value not in (dist.values or []):
                    problems.append(f"{where}: {value!r} is not among {dist.values}")
            elif (isinstance(value, bool) or not isinstance(value, int | float)
                  or not dist.low <= value <= dist.high):
                problems.append(f"{where}: {value!r} is outside [{dist.low:g}, {dist.high:g}]")
    return problems


def _point_reason(cfg: ExperimentConfig, point: dict[str, Any], key: str) -> str | None:
    """Why ``key`` means nothing for the trial ``point`` describes (None if it applies)."""
    config = {**cfg.fixed(), **point}
    if param_applies(key, config):
        return None
    backbone = config.get("backbone", TrialParams.model_fields["backbone"].default)
    weights = resolve_weights(config.get("weights", "none"), backbone)
    head = config.get("head", "linear")
    return (f"does not apply to this point's trial (backbone {backbone!r} with weights "
            f"{weights!r}, head {head!r}); the search would not use it")


def _scheduler_problems(cfg: ExperimentConfig) -> list[str]:
    problems = []
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
    return problems


def _prior_problems(cfg: ExperimentConfig) -> list[str]:
    search = cfg.search
    if search.prior == "none":
        return (["search.prune_below: prunes cells of the transferability ranking; set "
                 "search.prior: transferability too"] if search.prune_below is not None else [])
    problems = []
    if cfg.scheduler.type == "pbt":
        problems.append("search.prior: transferability picks the first trials, and PBT's "
                        "population is sampled up front; use scheduler asha, hyperband, "
                        "median or none")
    entry = cfg.space.get("weights")
    if isinstance(entry, Distribution):
        problems.append("search.prior: transferability ranks each backbone with its own "
                        "weights; fix `weights` (a mapping backbone -> weights) instead of "
                        "searching it")
    elif all(w == "none" for _, _, w in cfg.weights_choices()):
        problems.append(f"search.prior: transferability scores pretrained features, and every "
                        f"backbone of {cfg.backbone_choices()} has weights 'none'; give one "
                        f"pretrained weights or set search.prior: none")
    return problems


def config_problems(cfg: ExperimentConfig) -> list[str]:
    """Every rule ``cfg`` breaks, one line each naming the field; empty when it is valid."""
    problems = _single_field_problems(cfg)
    if problems:
        return problems  # the cross-field rules below assume each value is sane
    backbones = cfg.backbone_choices()
    problems = _stage_range_problems(cfg, "freeze_depth", backbones,
                                     first=0) + _weights_problems(cfg)
    if not problems:  # a depth out of range is the one thing to say about it
        problems = _head_problems(cfg, backbones)
    return (problems + _efficientnet_problems(cfg, backbones) + _points_problems(cfg)
            + _scheduler_problems(cfg) + _prior_problems(cfg))
