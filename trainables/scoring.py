"""Scoring predictions: top-k hits, and a network's validation pass.

Shared by the SGD trial (:mod:`trainables.finetune`) and the classical-head trial
(:mod:`trainables.classical`), so both count top-1 and top-5 the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables import metrics as M
from trainables.cache import FeatureSet
from trainables.data import ImageSet, preprocess
from trainables.models import StagedNet
from trainables.runtime import autocast

__all__ = ["evaluate", "topk_correct"]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows of ``logits`` (any class scores) rank their label among the top ``k``."""
    topk = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((topk == labels[:, None]).any(dim=1).sum())


def evaluate(
    model: StagedNet,
    images: ImageSet | FeatureSet,
    *,
    resolution: int,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    start: int = 0,
) -> dict[str, float]:
    """Validation loss, top-1 and top-5 accuracy (percent) of ``model`` on ``images``.

    With ``start`` > 0, ``images`` holds the cached outputs of the first ``start`` stages.
    """
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    with torch.no_grad(), autocast(device, amp):
        for x, y in images.batches(batch_size=batch_size, shuffle=False, device=device):
            if start == 0:
                x = preprocess(x, resolution=resolution, mean=model.mean, std=model.std)
            logits = model.forward_head(model.forward_stages(x, start)).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            top1 += topk_correct(logits, y, 1)
            top5 += topk_correct(logits, y, 5)
            n += len(y)
    return {M.VAL_LOSS: loss_sum / n, M.TOP1: 100.0 * top1 / n, M.TOP5: 100.0 * top5 / n}
