"""``ftsearch advise``: place a dataset in the size x similarity quadrants, narrow the space.

The practice rule of fine-tuning (Yosinski et al. 2014, *How transferable are features in
deep neural networks?*; the CS231n transfer-learning notes) says how much of a pretrained
network to keep frozen from two properties of the data:

* size: images per class. Few images cannot train many weights without overfitting them;
* similarity to the pretraining data: the more alike, the higher the layers whose features
  still fit; unlike data wants earlier, more generic features and its own upper layers.

Both are measured from the data and the pretrained network itself: the size from the
training split, the similarity as the mean largest softmax probability the backbone's own
ImageNet classifier gives the training images (:func:`trainables.ranking.imagenet_confidence`).
The written config is a copy of the user's with the space narrowed to the quadrant's
freeze depths, backbone learning-rate scales and heads (within the user's own ranges), and
its first trials taken from the transferability ranking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search import contract as C
from search.config import ConfigError, ExperimentConfig, apply_overrides, parse_config
from search.prior import build_prior
from search.transfer import load_target, rank_config, ranking_jobs, write_ranking
from search.yamlfile import read_yaml
from trainables.models.registry import stage_count

__all__ = ["QUADRANTS", "SIMILAR_MSP", "SMALL_PER_CLASS", "Advice", "advice_text", "advise",
           "default_out", "quadrant", "write_advice"]

# Below this many training images per class a dataset is small (see the README's
# "Which quadrant" for where both thresholds come from).
SMALL_PER_CLASS = 50
# Above this mean ImageNet max-softmax probability the images are similar to ImageNet.
SIMILAR_MSP = 0.3


@dataclass(frozen=True)
class Quadrant:
    """One quadrant's rule, as fractions of the backbone's stages.

    Attributes:
        name: ``small & similar`` ...
        rule: The practice rule in words.
        freeze: (low, high) fraction of stages kept frozen by the linear head.
        lr_scale: (low, high) backbone / head learning-rate ratio.
        heads: Heads worth trying.
        features: (low, high) fraction of stages whose pooled output classical heads use.
    """

    name: str
    rule: str
    freeze: tuple[float, float]
    lr_scale: tuple[float, float]
    heads: tuple[str, ...]
    features: tuple[float, float] = (1.0, 1.0)


QUADRANTS = {
    (True, True): Quadrant("small & similar", "freeze almost all, train the top; a classical "
                           "head on the last features may be all it needs",
                           (0.75, 1.0), (0.01, 0.1), ("linear", "logreg", "svm"), (0.75, 1.0)),
    (True, False): Quadrant("small & different", "freeze the early stages, train the rest; "
                            "earlier, more generic features for a classical head",
                            (0.3, 0.7), (0.1, 1.0), ("linear", "logreg", "svm"), (0.3, 0.9)),
    (False, True): Quadrant("large & similar", "freeze some early stages, fine-tune the rest "
                            "at a lower backbone rate", (0.1, 0.5), (0.01, 0.3), ("linear",)),
    (False, False): Quadrant("large & different", "train (almost) everything",
                             (0.0, 0.25), (0.1, 1.0), ("linear",)),
}


def quadrant(*, per_class: float, msp: float) -> Quadrant:
    """The quadrant of a dataset with ``per_class`` training images per class and ``msp``."""
    return QUADRANTS[per_class < SMALL_PER_CLASS, msp >= SIMILAR_MSP]


@dataclass
class Advice:
    """What ``advise`` measured and wrote."""

    quadrant: Quadrant
    per_class: float
    train_images: int
    classes: int
    confidence: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    first: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def _depths(fraction: tuple[float, float], n: int) -> tuple[int, int]:
    return math.ceil(fraction[0] * n - 1e-9), max(math.ceil(fraction[0] * n - 1e-9),
                                                   math.floor(fraction[1] * n + 1e-9))


def _narrow(entry: Any, low: float, high: float, *, kind: str) -> dict[str, Any]:
    """``{type: kind, low, high}`` within a user's range of the same parameter, if any.

    The user's other settings of a range of the same type are kept: ``grid_points`` (a grid
    stays a grid of as many points) and ``step``, with the new low moved onto the user's
    steps (0..8 by 2 narrowed to 3..6 is 4..6 by 2).
    """
    kept: dict[str, Any] = {}
    if isinstance(entry, Mapping) and entry.get("type") in ("int", "uniform", "loguniform"):
        lo, hi = max(low, entry["low"]), min(high, entry["high"])
        if entry["type"] == kind and entry.get("step"):
            lo = entry["low"] + math.ceil((lo - entry["low"]) / entry["step"] - 1e-9) * \
                entry["step"]
        if lo <= hi and not (kind == "loguniform" and lo == hi):
            low, high = lo, hi
        if entry["type"] == kind:
            kept = {k: v for k, v in entry.items() if k not in ("type", "low", "high")}
    if kind == "int":
        return {"type": "int", "low": int(low), "high": int(high), **kept}
    return {"type": kind, "low": float(f"{low:.6g}"), "high": float(f"{high:.6g}"), **kept}


def _describe(entry: Any) -> str:
    if isinstance(entry, Mapping):
        if "values" in entry:
            return str(entry["values"])
        return f"{entry.get('low'):g}..{entry.get('high'):g}"
    return "not searched" if entry is None else repr(entry)


def _advised_space(raw_space: Mapping[str, Any], q: Quadrant, stages: Sequence[int]
                   ) -> tuple[dict[str, Any], list[str]]:
    space = dict(raw_space)
    wanted: dict[str, Any] = {}
    if len(set(stages)) == 1:
        wanted["freeze_depth"] = _narrow(space.get("freeze_depth"), *_depths(q.freeze, stages[0]),
                                         kind="int")
    else:  # backbones of different depths share one fraction
        wanted["freeze_depth"] = {"type": "fraction", "low": q.freeze[0], "high": q.freeze[1]}
    wanted["lr_scale"] = _narrow(space.get("lr_scale"), *q.lr_scale, kind="loguniform")
    wanted["head"] = {"type": "choice", "values": list(q.heads)}
    if len(q.heads) > 1:
        low, high = _depths(q.features, max(stages))
        wanted["features_from"] = _narrow(space.get("features_from"), max(1, low), high,
                                          kind="int")
    else:
        space.pop("features_from", None)
    changes = [f"{k}: {_describe(space.get(k))} -> {_describe(v)}" for k, v in wanted.items()]
    space.update(wanted)
    return space, changes


def advise(target: str | Path, overrides: Sequence[str] = ()) -> Advice:
    """Measures the data of ``target``'s config, ranks its cells, builds the advised config.

    Raises:
        search.config.ConfigError: An invalid config, or one the advice cannot apply to.
        search.transfer.RankingError: No pretrained backbone to measure with.
    """
    from trainables.ranking import imagenet_confidence

    cfg = load_target(target, overrides)
    table, _ = rank_config(cfg)
    write_ranking(cfg.directory, table)
    best = table.iloc[0]
    job = next(j for j in ranking_jobs(cfg)[0] if j["backbone"] == best.backbone)
    confidence = imagenet_confidence(job)
    per_class = float(best.train_images) / float(best.classes)
    q = quadrant(per_class=per_class, msp=confidence["msp"])
    raw = apply_overrides(read_yaml(Path(target) / C.CONFIG_FILE if Path(target).is_dir()
                                    else Path(target)), overrides)
    pretrained = sorted({b for b in table.backbone})
    space, changes = _advised_space(raw.get("space") or {}, q,
                                    [stage_count(b) for b in pretrained])
    search = raw.get("search") or {}
    # The user's points are checked against the narrowed space one by one, below: a point
    # outside it (3 stages frozen where the quadrant says 0..2) is left out, not an error.
    advised = {**raw, "name": f"{cfg.name}-advised", "space": space,
               "search": {**search, "points_to_evaluate": []}}
    prior = build_prior(_parse(advised), table)
    mine = search.get("points_to_evaluate") or []
    why = [_point_problems(advised, p) for p in mine]
    kept = [p for p, problems in zip(mine, why, strict=True) if not problems]
    advised["search"] = {**search, "points_to_evaluate": prior.points + [
        p for p in kept if p not in prior.points]}
    _parse(advised)
    return Advice(quadrant=q, per_class=per_class, train_images=int(best.train_images),
                  classes=int(best.classes), confidence=confidence, changes=changes,
                  config=advised, first=prior.points,
                  dropped=[(p, problems[0]) for p, problems in zip(mine, why, strict=True)
                           if problems])


def _parse(raw: Mapping[str, Any]) -> ExperimentConfig:
    try:
        return parse_config(raw)
    except ConfigError as err:  # the quadrant's space does not fit this config
        raise ConfigError([f"advised config: {p}" for p in err.problems]) from None


def _point_problems(raw: Mapping[str, Any], point: Mapping[str, Any]) -> list[str]:
    """Why ``point`` cannot be a first trial of config ``raw`` (empty when it can)."""
    try:
        parse_config({**raw, "search": {**(raw.get("search") or {}),
                                        "points_to_evaluate": [dict(point)]}})
    except ConfigError as err:
        return [p.removeprefix("search.points_to_evaluate[0].") for p in err.problems]
    return []


def advice_text(advice: Advice, *, out: Path) -> list[str]:
    """What ``ftsearch advise`` prints."""
    c = advice.confidence
    size = "small" if advice.per_class < SMALL_PER_CLASS else "large"
    similar = "similar" if c["msp"] >= SIMILAR_MSP else "different"
    return [
        f"size: {advice.train_images} training images, {advice.classes} classes, "
        f"{advice.per_class:.0f} per class -> {size} (small: below {SMALL_PER_CLASS} per class)",
        f"similarity: {c['backbone']}'s ImageNet classifier, mean top-1 softmax "
        f"{c['msp']:.2f} over {c['images']} training images at {c['resolution']} px -> "
        f"{similar} (similar: {SIMILAR_MSP:.2f} or more)",
        f"quadrant: {advice.quadrant.name}: {advice.quadrant.rule}",
        *[f"  space.{change}" for change in advice.changes],
        "  first trials (transferability ranking): "
        + ("; ".join(", ".join(f"{k} {v}" for k, v in p.items()) for p in advice.first)
           or "none"),
        *["  left out of points_to_evaluate: " + ", ".join(f"{k} {v}" for k, v in p.items())
          + f" ({why})" for p, why in advice.dropped],
        f"wrote {out} (run it: ftsearch run {out})",
    ]


def write_advice(advice: Advice, out: Path) -> None:
    """Writes the advised config as YAML, headed by what it was built from."""
    from search.storage import replace_file

    header = (f"# Written by `ftsearch advise`: {advice.quadrant.name} "
              f"({advice.per_class:.0f} images per class, ImageNet confidence "
              f"{advice.confidence['msp']:.2f}).\n")
    replace_file(out, (header + yaml.safe_dump(advice.config, sort_keys=False)).encode())


def default_out(target: str | Path) -> Path:
    """Beside the config file (``<stem>-advised.yaml``), or ``advised.yaml`` in an
    experiment directory."""
    path = Path(target)
    return path / "advised.yaml" if path.is_dir() else path.with_name(
        f"{path.stem}-advised.yaml")
