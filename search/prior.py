"""A search warm-started by transferability (``search.prior: transferability``).

The ranking (:mod:`search.transfer`) scores (backbone, depth) cells: the pooled output of
stage ``depth`` of a pretrained backbone. This module maps cells onto the config's space
and back: which cells the space can sample (:func:`space_cells`), which trial parameters
stand for a cell (a linear-head trial frozen up to it, or a classical head fitted on it),
and from a ranking the :class:`Prior` a search starts with: the best ``prior_top`` cells as
its first trials and, with ``prune_below``, the depths and backbones it leaves out. Plain
data and pandas only: ``ftsearch replay`` applies the same prior offline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from search import contract as C
from search.config import Distribution, ExperimentConfig
from trainables.models.registry import stage_count
from trainables.params import CLASSICAL_HEADS, TrialParams, resolve_weights

__all__ = ["Prior", "build_prior", "cell_of", "order_points", "space_cells"]

Cell = tuple[str, int]  # (backbone, depth)


@dataclass(frozen=True)
class Prior:
    """What a ranking changes in a search.

    Attributes:
        points: Trial parameters of the best cells, best first: the first trials.
        cells: Those cells, in the same order.
        depth_limits: Backbone -> (lowest, highest) depth still sampled, after pruning.
        backbones: The backbone choices left after pruning; None when unchanged.
        pruned: Cells left out.
    """

    points: list[dict[str, Any]]
    cells: list[Cell] = field(default_factory=list)
    depth_limits: dict[str, tuple[int, int]] = field(default_factory=dict)
    backbones: list[str] | None = None
    pruned: list[Cell] = field(default_factory=list)

    def config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` with the pruned backbones left out of its ``backbone`` choice."""
        if self.backbones is None:
            return cfg
        space = {**cfg.space, "backbone": cfg.space["backbone"].model_copy(
            update={"values": list(self.backbones)})}
        return cfg.model_copy(update={"space": space})


def _current(cfg: ExperimentConfig, key: str) -> Any:
    fixed = cfg.fixed()
    return fixed.get(key, TrialParams.model_fields[key].default)


def _heads(cfg: ExperimentConfig) -> list[str]:
    entry = cfg.space.get("head")
    return list(entry.values or []) if isinstance(entry, Distribution) else [_current(cfg,
                                                                                      "head")]


def _int_range(dist: Distribution, n: int, first: int) -> list[int]:
    step = int(dist.step or 1)
    return [k for k in range(int(dist.low), min(int(dist.high), n) + 1, step) if k >= first]


def _depths(cfg: ExperimentConfig, key: str, n: int, default: int) -> list[int]:
    """The depths ``key`` (freeze_depth, features_from) can take for an n-stage backbone."""
    entry = cfg.space.get(key)
    if isinstance(entry, Distribution):
        if entry.type == "fraction":
            return [k for k in range(1, n + 1) if entry.low <= k / n <= entry.high]
        if entry.type == "choice":
            return [int(v) for v in entry.values or [] if 1 <= int(v) <= n]
        return _int_range(entry, n, first=1)
    value = _current(cfg, key)
    value = default if value is None else int(value)
    return [value] if 1 <= value <= n else []


def _pretrained(cfg: ExperimentConfig, backbone: str) -> bool:
    return resolve_weights(_current(cfg, "weights"), backbone) != "none"


def space_cells(cfg: ExperimentConfig) -> dict[str, dict[str, list[int]]]:
    """Backbone -> {"linear": depths, "classical": depths} the search can sample.

    A cell needs frozen pretrained features, so depth 0 (everything trains) and backbones
    with weights ``none`` have none.
    """
    heads = _heads(cfg)
    cells: dict[str, dict[str, list[int]]] = {}
    for backbone in cfg.backbone_choices():
        if not _pretrained(cfg, backbone):
            continue
        n = stage_count(backbone)
        cells[backbone] = {
            "linear": _depths(cfg, "freeze_depth", n, 0) if "linear" in heads else [],
            "classical": (_depths(cfg, "features_from", n, n)
                          if set(heads) & set(CLASSICAL_HEADS) else []),
        }
    return cells


def _point(cfg: ExperimentConfig, backbone: str, depth: int,
           cells: Mapping[str, Mapping[str, list[int]]]) -> dict[str, Any] | None:
    """The searched parameters that make a trial of cell (backbone, depth), or None."""
    searched = cfg.searched()
    point: dict[str, Any] = {"backbone": backbone} if "backbone" in searched else {}
    kinds = cells.get(backbone, {})
    # A classical head fitted on the cell's features is the trial its score measures (a
    # linear model on exactly those features), and costs one fit: it goes first.
    if depth in kinds.get("classical", []):
        if "head" in searched:
            classical = [h for h in _heads(cfg) if h in CLASSICAL_HEADS]
            point["head"] = "logreg" if "logreg" in classical else classical[0]
        if "features_from" in searched:
            point["features_from"] = depth
    elif depth in kinds.get("linear", []):
        if "head" in searched:
            point["head"] = "linear"
        dist = searched.get("freeze_depth")
        if dist is not None:
            n = stage_count(backbone)
            point.update({"freeze_fraction": depth / n} if dist.type == "fraction"
                         else {"freeze_depth": depth})
    else:
        return None
    return point or None


def cell_of(trial: Mapping[str, Any]) -> Cell | None:
    """The cell a trial trains on, from its whole flat config (fixed and sampled values)."""
    backbone = trial.get("backbone", TrialParams.model_fields["backbone"].default)
    n = stage_count(backbone)
    if trial.get("head", "linear") in CLASSICAL_HEADS:
        depth = trial.get("features_from") or n
    elif trial.get("freeze_fraction") is not None:
        depth = min(n, round(trial["freeze_fraction"] * n))
    else:
        depth = trial.get("freeze_depth") or 0
    return (backbone, int(depth)) if depth else None


def build_prior(cfg: ExperimentConfig, ranking: pd.DataFrame) -> Prior:
    """The first trials and the pruning a ranking gives ``cfg``'s search.

    The best ``search.prior_top`` cells the space can sample become the first trials (one
    point each, best first). With ``search.prune_below: q``, a cell is left out when its
    score lies below the fraction q of the way from the worst sampled cell to the best;
    each backbone's depths are then limited to the range its kept cells span (depth 0,
    which has no frozen features to score, goes with depth 1), and a backbone none of whose
    cells is kept leaves the backbone choice.
    """
    cells = space_cells(cfg)
    sampled = ranking[[bool(r.depth in cells.get(r.backbone, {}).get("linear", [])
                            or r.depth in cells.get(r.backbone, {}).get("classical", []))
                       for r in ranking.itertuples()]]
    sampled = sampled.sort_values("rank", kind="stable")
    points: list[dict[str, Any]] = []
    first: list[Cell] = []
    for row in sampled.itertuples():
        point = _point(cfg, row.backbone, int(row.depth), cells)
        if point is not None and point not in points:
            points.append(point)
            first.append((row.backbone, int(row.depth)))
        if len(points) == cfg.search.prior_top:
            break
    q = cfg.search.prune_below
    if q is None or sampled.empty:
        return Prior(points=points, cells=first)
    scores = sampled[C.TRANSFER_SCORE]
    low, high = float(scores.min()), float(scores.max())
    threshold = low + q * (high - low)
    kept = sampled[scores >= threshold - 1e-12 * max(1.0, abs(threshold))]
    limits = {b: (int(g.depth.min()), int(g.depth.max())) for b, g in kept.groupby("backbone")}
    pruned = [(r.backbone, int(r.depth)) for r in sampled.itertuples()
              if not limits.get(r.backbone) or not
              limits[r.backbone][0] <= r.depth <= limits[r.backbone][1]]
    backbones = None
    if "backbone" in cfg.searched():
        keep = [b for b in cfg.backbone_choices() if b not in cells or b in limits]
        backbones = keep if len(keep) < len(cfg.backbone_choices()) else None
    return Prior(points=points, cells=first, depth_limits=limits, backbones=backbones,
                 pruned=pruned)


def order_points(points: Sequence[dict[str, Any]], cfg: ExperimentConfig, prior: Prior
                 ) -> list[dict[str, Any]]:
    """A grid's points: the prior's best cells' first (best cell first), pruned cells' gone;
    otherwise in the grid's own order."""
    fixed = cfg.fixed()
    cells = [cell_of({**fixed, **p}) for p in points]
    pruned = set(prior.pruned)
    order = {cell: i for i, cell in enumerate(prior.cells)}
    kept = [(c, p) for c, p in zip(cells, points, strict=True) if c not in pruned]
    first = sorted(((c, p) for c, p in kept if c in order), key=lambda cp: order[cp[0]])
    return [p for _, p in first] + [p for c, p in kept if c not in order]
