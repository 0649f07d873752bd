"""The backbone registry: a plain dict from name to builder, filled by a decorator.

As in torchvision's ``models/_api.py``, :func:`register_backbone` records each builder with
what is known without building it (stage count, default resolution, pretrained weights).
The builders register themselves when :mod:`trainables.builders` is imported, which
:mod:`trainables.backbones` does: look names up through that module, not this one, so the
registry is always full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from trainables.stagednet import StagedNet

__all__ = [
    "PRETRAINED_WEIGHTS",
    "BackboneSpec",
    "available_weights",
    "backbone_names",
    "backbone_spec",
    "is_efficientnet",
    "register_backbone",
    "stage_count",
]

# Pretrained weights a builder may declare; "none" and state-dict paths work for every one.
PRETRAINED_WEIGHTS = ("imagenet", "packaged")


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about a backbone without building it.

    Attributes:
        builder: Keyword-only function ``(num_classes=, weights=, ...) -> StagedNet``.
        stages: Number of stages of the built network.
        resolution: Default input side in pixels.
        weights: Pretrained weights it supports, a subset of ``("imagenet", "packaged")``.
    """

    builder: Callable[..., StagedNet]
    stages: int
    resolution: int
    weights: tuple[str, ...]


_BACKBONES: dict[str, BackboneSpec] = {}

_F = TypeVar("_F", bound=Callable[..., StagedNet])


def register_backbone(
    name: str, *, stages: int, resolution: int, weights: Sequence[str] = ()
) -> Callable[[_F], _F]:
    """Registers a builder under ``name``.

    Args:
        name: Registry name.
        stages: Number of stages the built network has (known without building it).
        resolution: Default input side in pixels.
        weights: Pretrained weights it supports, a subset of ``("imagenet", "packaged")``.

    Returns:
        A decorator that records the builder and returns it unchanged.
    """
    unknown = sorted(set(weights) - set(PRETRAINED_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown weights {unknown}; valid ones are {list(PRETRAINED_WEIGHTS)}")

    def wrapper(fn: _F) -> _F:
        if name in _BACKBONES:
            raise ValueError(f"a backbone is already registered under the name {name!r}")
        _BACKBONES[name] = BackboneSpec(fn, stages, resolution, tuple(weights))
        return fn

    return wrapper


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``.

    Raises:
        ValueError: ``name`` is not registered; lists the valid names.
    """
    try:
        return _BACKBONES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name from a bad config
        raise ValueError(f"unknown backbone {name!r}; valid names are {backbone_names()}") from None


def backbone_names() -> list[str]:
    """Registered backbone names, in registration order."""
    return list(_BACKBONES)


def stage_count(name: str) -> int:
    """Number of stages of backbone ``name`` (no model is built)."""
    return backbone_spec(name).stages


def available_weights(name: str) -> list[str]:
    """Pretrained weights for ``name``; ``"none"`` and a state-dict path always work too."""
    return list(backbone_spec(name).weights)


def is_efficientnet(name: str) -> bool:
    """Whether ``name`` is an EfficientNet (B0-B7, free coefficients, or Lite0)."""
    backbone_spec(name)
    return name.startswith("efficientnet")
