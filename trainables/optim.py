"""Freezing, gradual unfreezing and per-stage learning rates.

A model declares its ordered backbone ``stages`` and its ``head`` once
(see :mod:`trainables.models`); everything here is derived from that one
list by small functions, in the spirit of timm's ``group_matcher``:

* the first ``freeze_depth`` stages are frozen: ``requires_grad=False`` and
  their norm layers kept in eval mode so running statistics never move;
* the head trains at ``lr``; a trainable stage ``i`` of ``n`` trains at
  ``lr * lr_scale * layer_decay ** (n - 1 - i)`` (the deepest stage gets the
  plain backbone rate, earlier ones progressively less);
* norm weights and biases get no weight decay;
* frozen parameters are never handed to the optimizer. Gradual unfreezing
  appends their groups later, in a fixed order, so an optimizer rebuilt on
  resume has exactly the layout of the one that was checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "OPTIMIZERS",
    "StagedModel",
    "apply_lr_schedule",
    "build_optimizer",
    "check_freeze_depth",
    "cosine_warmup_factor",
    "freeze_stages",
    "param_groups",
    "set_train_mode",
    "unfreeze_param_groups",
]

OPTIMIZERS = ("sgd", "adamw")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class StagedModel(Protocol):
    """What this module needs of a model: ordered stages and a head."""

    stages: nn.ModuleList
    head: nn.Module
    name: str


def check_freeze_depth(model: StagedModel, depth: int) -> None:
    """Raises ``ValueError`` naming the backbone's valid range if ``depth`` is outside it."""
    n = len(model.stages)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= n:
        raise ValueError(
            f"freeze_depth={depth!r} is out of range for backbone {model.name!r}: "
            f"valid values are 0..{n} (0 trains everything, {n} freezes the whole backbone)"
        )


def freeze_stages(model: StagedModel, depth: int) -> None:
    """Freezes the first ``depth`` stages and makes every later stage and the head trainable."""
    check_freeze_depth(model, depth)
    for i, stage in enumerate(model.stages):
        stage.requires_grad_(i >= depth)
    model.head.requires_grad_(True)


def set_train_mode(model: nn.Module, depth: int) -> None:
    """Puts ``model`` in train mode except its first ``depth`` stages.

    Frozen stages stay in eval mode so BatchNorm uses, and does not update,
    its pretrained running statistics; dropout inside them is off too.
    """
    model.train()
    for stage in model.stages[:depth]:
        stage.eval()


def _split_decay(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Splits parameters into (decayed, not decayed): biases and norm weights are not decayed."""
    no_decay_ids = set()
    for sub in module.modules():
        if isinstance(sub, _NORM_TYPES):
            no_decay_ids.update(id(p) for p in sub.parameters(recurse=False))
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or id(p) in no_decay_ids else decay).append(p)
    return decay, no_decay


def _groups_for(
    module: nn.Module, *, name: str, lr: float, weight_decay: float
) -> Iterator[dict[str, Any]]:
    decay, no_decay = _split_decay(module)
    if decay:
        yield {"name": name, "params": decay, "lr": lr, "base_lr": lr, "weight_decay": weight_decay}
    if no_decay:
        yield {"name": f"{name}.no_decay", "params": no_decay, "lr": lr, "base_lr": lr,
               "weight_decay": 0.0}


def _stage_lr(i: int, n: int, *, lr: float, lr_scale: float, layer_decay: float | None) -> float:
    decay = 1.0 if layer_decay is None else layer_decay ** (n - 1 - i)
    return lr * lr_scale * decay


def _check_rates(lr: float, lr_scale: float, layer_decay: float | None) -> None:
    for field, value in (("lr", lr), ("lr_scale", lr_scale)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{field}={value!r} must be a finite number > 0")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay={layer_decay!r} must be in (0, 1]")


def param_groups(
    model: StagedModel,
    *,
    lr: float,
    lr_scale: float = 1.0,
    weight_decay: float = 0.0,
    freeze_depth: int = 0,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer param groups for the trainable part of ``model``.

    Call :func:`freeze_stages` first. The head comes first, then trainable
    stages from deepest to shallowest. Each group carries ``name`` and
    ``base_lr`` (the rate before any schedule factor).
    """
    _check_rates(lr, lr_scale, layer_decay)
    check_freeze_depth(model, freeze_depth)
    groups = list(_groups_for(model.head, name="head", lr=lr, weight_decay=weight_decay))
    n = len(model.stages)
    for i in reversed(range(freeze_depth, n)):
        stage_lr = _stage_lr(i, n, lr=lr, lr_scale=lr_scale, layer_decay=layer_decay)
        groups += _groups_for(model.stages[i], name=f"stage{i}", lr=stage_lr,
                              weight_decay=weight_decay)
    return groups


def unfreeze_param_groups(
    model: StagedModel,
    *,
    lr: float,
    lr_scale: float = 1.0,
    weight_decay: float = 0.0,
    freeze_depth: int,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Unfreezes the first ``freeze_depth`` stages and returns their new param groups.

    The groups use the backbone rate (with layer decay), deepest first, so
    appending them to an optimizer built by :func:`param_groups` gives the
    same layout every time.
    """
    _check_rates(lr, lr_scale, layer_decay)
    check_freeze_depth(model, freeze_depth)
    n = len(model.stages)
    groups: list[dict[str, Any]] = []
    for i in reversed(range(freeze_depth)):
        model.stages[i].requires_grad_(True)
        stage_lr = _stage_lr(i, n, lr=lr, lr_scale=lr_scale, layer_decay=layer_decay)
        groups += _groups_for(model.stages[i], name=f"stage{i}", lr=stage_lr,
                              weight_decay=weight_decay)
    return groups


def build_optimizer(
    name: str, groups: Iterable[dict[str, Any]], *, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW, over ``groups``."""
    groups = list(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    raise ValueError(f"optimizer={name!r} is not supported: choose one of {list(OPTIMIZERS)}")


def cosine_warmup_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr_schedule(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Sets every group's rate to its ``base_lr`` times ``factor``.

    A plain function rather than a ``LRScheduler``: groups appended by gradual
    unfreezing follow the schedule too, and nothing but the step count needs
    checkpointing.
    """
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
