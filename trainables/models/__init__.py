"""Backbones as :class:`StagedNet` (ordered stages, then a replaceable head).

* :mod:`~trainables.models.registry`: names, stage counts, resolutions and weights as plain
  data (no torch), :func:`build_backbone` and :func:`describe_backbones`;
* :mod:`~trainables.models.stagednet`: :class:`StagedNet` itself;
* :mod:`~trainables.models.builders`: one thin builder per backbone (torchvision families);
* :mod:`~trainables.models.lite`: EfficientNet-Lite0 and its packaged ImageNet weights;
* :mod:`~trainables.models.weights`: ``weights=`` sources and key mapping;
* :mod:`~trainables.models.scaling`: EfficientNet compound scaling (no torch);
* :mod:`~trainables.models.complexity`: parameters and multiply-adds.

The registry and scaling load eagerly; names from modules that import torch load on first
use, so ``from trainables.models import stage_count`` stays fast.
"""

from trainables._lazy import lazy_exports
from trainables.models.registry import (
    PRETRAINED_CLASSES,
    PRETRAINED_WEIGHTS,
    WEIGHT_CHOICES,
    BackboneSpec,
    available_weights,
    backbone_names,
    backbone_spec,
    build_backbone,
    default_resolution,
    describe_backbones,
    imagenet_weights_file,
    is_efficientnet,
    stage_count,
    torch_hub_dir,
)
from trainables.models.scaling import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    ScaledCoefficients,
    compound_coefficients,
    flops_constraint_ok,
    flops_ratio,
    resolve_efficientnet_coefficients,
)

__getattr__, __dir__ = lazy_exports(__name__, {
    "IMAGENET_MEAN": "stagednet",
    "IMAGENET_STD": "stagednet",
    "StagedNet": "stagednet",
    "count_macs": "complexity",
    "count_params": "complexity",
})

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRETRAINED_CLASSES",
    "PRETRAINED_WEIGHTS",
    "WEIGHT_CHOICES",
    "BackboneSpec",
    "ScaledCoefficients",
    "StagedNet",
    "available_weights",
    "backbone_names",
    "backbone_spec",
    "build_backbone",
    "compound_coefficients",
    "count_macs",
    "count_params",
    "default_resolution",
    "describe_backbones",
    "flops_constraint_ok",
    "flops_ratio",
    "imagenet_weights_file",
    "is_efficientnet",
    "resolve_efficientnet_coefficients",
    "stage_count",
    "torch_hub_dir",
]
