"""The registered backbone builders: each family's network re-wrapped as stages and a head.

Torchvision models are built with torchvision's own public builders and re-wrapped (no layer
is copied), so parameter counts, and state dicts up to their key names, are exactly
torchvision's. Lite0 comes from :mod:`trainables.models.lite`. Every builder is keyword-only and
thin, as in torchvision: the shared work happens in :func:`_torchvision_backbone` and
:func:`trainables.models.weights.finish_backbone`.

Each builder's name is its registry name (:mod:`trainables.models.registry`), which
holds its stage count, resolution and weights.
"""

from __future__ import annotations

import os
from functools import partial

import torchvision
from torch import nn
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

from trainables.models import lite
from trainables.models.registry import PRETRAINED_CLASSES, backbone_spec
from trainables.models.scaling import resolve_efficientnet_coefficients
from trainables.models.stagednet import IMAGENET_MEAN, IMAGENET_STD, StagedNet, check_num_classes
from trainables.models.weights import check_weights, finish_backbone, raw_key_map

__all__ = [
    "alexnet",
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
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vgg11_bn",
    "vgg16_bn",
]


# ---------------------------------------------------------------------------- torchvision


def _resnet_parts(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return stages, nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)


def _pooled_features_parts(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    # VGG and AlexNet: a stage ends at each max-pool, where the resolution halves.
    stages: list[nn.Module] = []
    current: list[nn.Module] = []
    for layer in model.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.Sequential(*current))
            current = []
    if current:
        stages.append(nn.Sequential(*current))
    return stages, nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)


def _efficientnet_parts(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    # features[0] is the stem, features[1..7] the block groups, features[8] the 1x1 conv.
    return list(model.features), nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)


def _torchvision_backbone(
    name: str,
    *,
    num_classes: int,
    weights: str | os.PathLike[str],
    model: nn.Module | None = None,
    resolution: int | None = None,
) -> StagedNet:
    """The one builder behind every torchvision backbone."""
    check_num_classes(num_classes)
    check_weights(name, weights)
    if model is None:
        model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("resnet"):
        stages, head = _resnet_parts(model)
    elif name.startswith("efficientnet"):
        stages, head = _efficientnet_parts(model)
    else:
        stages, head = _pooled_features_parts(model)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if "imagenet" in backbone_spec(name).weights:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        mean, std = tuple(preset.mean), tuple(preset.std)
    net = StagedNet(
        name=name,
        stages=stages,
        head=head,
        resolution=resolution or backbone_spec(name).resolution,
        mean=mean,
        std=std,
    )
    return finish_backbone(
        net,
        weights=weights,
        num_classes=num_classes,
        raw_keys=raw_key_map(model, net),
        weights_for=name,
    )


def resnet18(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """ResNet-18 (He et al., 2016)."""
    return _torchvision_backbone("resnet18", num_classes=num_classes, weights=weights)


def resnet34(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """ResNet-34 (He et al., 2016)."""
    return _torchvision_backbone("resnet34", num_classes=num_classes, weights=weights)


def resnet50(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """ResNet-50 (He et al., 2016)."""
    return _torchvision_backbone("resnet50", num_classes=num_classes, weights=weights)


def resnet101(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """ResNet-101 (He et al., 2016)."""
    return _torchvision_backbone("resnet101", num_classes=num_classes, weights=weights)


def vgg11_bn(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """VGG-11 with batch norm (Simonyan & Zisserman, 2015)."""
    return _torchvision_backbone("vgg11_bn", num_classes=num_classes, weights=weights)


def vgg16_bn(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """VGG-16 with batch norm (Simonyan & Zisserman, 2015)."""
    return _torchvision_backbone("vgg16_bn", num_classes=num_classes, weights=weights)


def alexnet(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """AlexNet (Krizhevsky et al., 2012), torchvision's single-tower variant."""
    return _torchvision_backbone("alexnet", num_classes=num_classes, weights=weights)


def efficientnet_b0(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B0 (Tan & Le, 2019), the compound-scaling baseline."""
    return _torchvision_backbone("efficientnet_b0", num_classes=num_classes, weights=weights)


def efficientnet_b1(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B1: width 1.0, depth 1.1."""
    return _torchvision_backbone("efficientnet_b1", num_classes=num_classes, weights=weights)


def efficientnet_b2(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B2: width 1.1, depth 1.2."""
    return _torchvision_backbone("efficientnet_b2", num_classes=num_classes, weights=weights)


def efficientnet_b3(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B3: width 1.2, depth 1.4."""
    return _torchvision_backbone("efficientnet_b3", num_classes=num_classes, weights=weights)


def efficientnet_b4(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B4: width 1.4, depth 1.8."""
    return _torchvision_backbone("efficientnet_b4", num_classes=num_classes, weights=weights)


def efficientnet_b5(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B5: width 1.6, depth 2.2."""
    return _torchvision_backbone("efficientnet_b5", num_classes=num_classes, weights=weights)


def efficientnet_b6(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B6: width 1.8, depth 2.6."""
    return _torchvision_backbone("efficientnet_b6", num_classes=num_classes, weights=weights)


def efficientnet_b7(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B7: width 2.0, depth 3.1."""
    return _torchvision_backbone("efficientnet_b7", num_classes=num_classes, weights=weights)


# ---------------------------------------------------------------------------- free efficientnet

# B0's blocks in the column order of torchvision's MBConvConfig (its private
# ``_efficientnet_conf`` lists them so): (expand ratio, kernel, stride, in channels,
# out channels, layers). Lite0 keeps B0's layout, so this is lite's table reordered.
_B0_BLOCKS = tuple(
    (expand, kernel, stride, cin, cout, repeats)
    for repeats, kernel, stride, expand, cin, cout in lite.LITE0_BLOCKS
)


def efficientnet(
    *,
    num_classes: int,
    weights: str | os.PathLike[str] = "none",
    width_mult: float | None = None,
    depth_mult: float | None = None,
    resolution: int | None = None,
    phi: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
) -> StagedNet:
    """An EfficientNet with free coefficients: B0's blocks scaled in width and depth.

    Give either ``width_mult``, ``depth_mult`` and ``resolution`` directly (each
    defaults to B0's 1.0, 1.0, 224), or ``phi`` with optional ``alpha``, ``beta``,
    ``gamma`` (the paper's 1.2, 1.1, 1.15) for
    :func:`~trainables.models.scaling.compound_coefficients`. Mixing the two is an error.
    """
    coeffs = resolve_efficientnet_coefficients(
        width_mult=width_mult,
        depth_mult=depth_mult,
        resolution=resolution,
        phi=phi,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
    )
    # Checked here as well as in _torchvision_backbone: fail before the model is built.
    check_num_classes(num_classes)
    check_weights("efficientnet", weights)
    block = partial(MBConvConfig, width_mult=coeffs.width_mult, depth_mult=coeffs.depth_mult)
    model = EfficientNet([block(*row) for row in _B0_BLOCKS], dropout=0.2)
    return _torchvision_backbone(
        "efficientnet",
        num_classes=num_classes,
        weights=weights,
        model=model,
        resolution=coeffs.resolution,
    )


# ---------------------------------------------------------------------------- lite0


def efficientnet_lite0(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-Lite0: B0 without squeeze-excitation, with ReLU6 (see :mod:`.lite`).

    Its ImageNet weights are ``weights="packaged"``; they expect TF Lite's input
    normalisation, which ``mean``/``std`` carry.
    """
    check_num_classes(num_classes)
    check_weights("efficientnet_lite0", weights)
    stages, head = lite.build_lite0_layers(num_classes=PRETRAINED_CLASSES)
    net = StagedNet(
        name="efficientnet_lite0",
        stages=stages,
        head=head,
        resolution=224,
        mean=lite.LITE_MEAN,
        std=lite.LITE_STD,
    )
    return finish_backbone(
        net,
        weights=weights,
        num_classes=num_classes,
        raw_keys=lite.lite0_key_map(),
        weights_for="efficientnet_lite0",
    )
