"""A model's size: parameters, and multiply-adds per image counted by torch's FlopCounterMode."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainables.models.stagednet import eval_mode

__all__ = ["count_macs", "count_params"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen), each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, *, resolution: int) -> int:
    """Multiply-adds for one ``3 x resolution x resolution`` image.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and
    matrix products, as the EfficientNet paper counts them), halved because it
    counts a multiply-add as two FLOPs. The model runs once in eval mode without
    gradients, on the device and dtype of its parameters (a model on the ``meta``
    device is counted without computing anything). Each module's train/eval flag
    is restored afterwards.

    Args:
        model: The network; it must accept a ``(1, 3, H, W)`` batch.
        resolution: Input side in pixels.

    Returns:
        Multiply-adds, as an integer.
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} must be a positive integer")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    x = torch.zeros(1, 3, resolution, resolution, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2
