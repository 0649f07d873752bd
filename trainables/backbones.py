"""Backbone registry: a name becomes a network with ordered stages and a replaceable head.

Every backbone is a :class:`StagedNet`: a list of ``stages`` (stem first, then each
block group, then a final conv stage where the network has one) followed by a
``head`` whose last ``nn.Linear`` produces the class scores. Freezing and
per-stage learning rates (:mod:`trainables.optim`) are derived from that list.

The registry follows torchvision's ``models/_api.py``: a plain dict filled by the
:func:`register_backbone` decorator, thin keyword-only builders, and one private
builder that does the work. This module is the public entry point: it builds and
describes backbones and re-exports the rest, which lives in

* :mod:`trainables.stagednet`: :class:`StagedNet` itself;
* :mod:`trainables.registry`: the dict, :func:`register_backbone` and the lookups;
* :mod:`trainables.builders`: the registered builders (torchvision families and Lite0);
* :mod:`trainables.weights`: ``weights=`` (``"none"``, ``"imagenet"``, ``"packaged"`` or
  a state-dict path), loading and key mapping.

Pretrained weights are loaded into the 1000-class model; the last ``nn.Linear`` is
then replaced by a fresh one for ``num_classes`` unless ``num_classes`` is 1000.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch

# Importing the builders registers them: every lookup below sees the full registry.
from trainables.builders import (
    alexnet,
    efficientnet,
    efficientnet_b0,
    efficientnet_b1,
    efficientnet_b2,
    efficientnet_b3,
    efficientnet_b4,
    efficientnet_b5,
    efficientnet_b6,
    efficientnet_b7,
    efficientnet_lite0,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    vgg11_bn,
    vgg16_bn,
)
from trainables.registry import (
    available_weights,
    backbone_names,
    backbone_spec,
    is_efficientnet,
    register_backbone,
    stage_count,
)
from trainables.scaling import count_macs, count_params, resolve_efficientnet_coefficients
from trainables.stagednet import IMAGENET_MEAN, IMAGENET_STD, StagedNet
from trainables.weights import PRETRAINED_CLASSES, WEIGHT_CHOICES

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WEIGHT_CHOICES",
    "StagedNet",
    "alexnet",
    "available_weights",
    "backbone_names",
    "build_backbone",
    "default_resolution",
    "describe_backbones",
    "efficientnet",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_lite0",
    "is_efficientnet",
    "register_backbone",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "stage_count",
    "vgg11_bn",
    "vgg16_bn",
]


def default_resolution(name: str, **kwargs: Any) -> int:
    """Default input side of backbone ``name``.

    Args:
        name: Registry name.
        **kwargs: For ``efficientnet``, its coefficients (``width_mult``, ``depth_mult``,
            ``resolution`` or ``phi``, ``alpha``, ``beta``, ``gamma``); none otherwise.

    Returns:
        The side in pixels.
    """
    spec = backbone_spec(name)
    _check_kwargs(name, kwargs)
    if name == "efficientnet":
        return resolve_efficientnet_coefficients(**kwargs).resolution
    return spec.resolution


def build_backbone(
    name: str, *, num_classes: int, weights: str | os.PathLike[str] = "none", **kwargs: Any
) -> StagedNet:
    """Builds backbone ``name`` with a head for ``num_classes``.

    Args:
        name: One of :func:`backbone_names`.
        num_classes: Outputs of the classifier.
        weights: ``"none"``, ``"imagenet"``, ``"packaged"`` or the path of a state dict.
        **kwargs: Backbone-specific options (only ``efficientnet`` takes any).

    Returns:
        The network, in training mode, on the CPU (or the current default device).

    Raises:
        ValueError: An unknown name, argument or weights choice, or unusable weights.
        RuntimeError: ImageNet weights are neither cached nor downloadable.
    """
    spec = backbone_spec(name)
    _check_kwargs(name, kwargs)
    return spec.builder(num_classes=num_classes, weights=weights, **kwargs)


def describe_backbones() -> list[dict[str, Any]]:
    """One summary per backbone: name, stages, params, gmacs, resolution, weights.

    Params and multiply-adds are for 1000 classes at the default resolution. Models
    are built on the ``meta`` device without weights, so nothing is computed.
    """
    rows = []
    for name in backbone_names():
        spec = backbone_spec(name)
        with torch.device("meta"):
            net = build_backbone(name, num_classes=PRETRAINED_CLASSES)
        rows.append(
            {
                "name": name,
                "stages": spec.stages,
                "params": count_params(net),
                "gmacs": round(count_macs(net, resolution=spec.resolution) / 1e9, 3),
                "resolution": spec.resolution,
                "weights": list(spec.weights),
            }
        )
    return rows


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    # The builder's own keyword-only parameters are the options it takes: one source of truth.
    builder = backbone_spec(name).builder
    accepted = sorted(
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("num_classes", "weights")
    )
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for backbone {name!r}; "
            f"it takes {accepted if accepted else 'none besides num_classes and weights'}"
        )
