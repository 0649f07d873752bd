"""Measuring a dataset with a pretrained backbone before any training.

:func:`score_stages` computes the pooled output of every stage boundary of one backbone on
the training split (one forward pass, through the frozen-stage cache, so the classical-head
trials that follow read the same files) and scores each with
:data:`trainables.transferability.SCORES`. :func:`imagenet_confidence` measures how much the
images look like the pretraining data to the network itself. Both take a plain trial dict,
as a trial does, and need no Ray: ``ftsearch rank`` calls them in its own process, a search
with ``search.prior: transferability`` as Ray tasks with a trial's resources.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trainables.cache import pooled_stage_features
from trainables.data import load_data, preprocess
from trainables.finetune import build_model, resolve_trial_config
from trainables.models import PRETRAINED_CLASSES, build_backbone, default_resolution
from trainables.models.stagednet import eval_mode
from trainables.runtime import pick_device, place_model
from trainables.transferability import SCORES

__all__ = ["imagenet_confidence", "score_stages"]


def score_stages(config: Mapping[str, Any], *, depths: Sequence[int] | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """Transferability of each stage boundary of ``config``'s backbone, on its training split.

    Args:
        config: Trial parameters (backbone, weights, resolution, data, seed, cache_dir...).
        depths: Stage boundaries k (features after stage k); default every one, 1..stages.
        threads: torch threads to use (a Ray task passes its CPUs); default torch's.

    Returns:
        A plain dict: the backbone's ``backbone``, ``weights``, ``resolution``, ``stages``,
        ``train_images``, ``classes``, ``feature_seconds`` (the forward pass, 0 when every
        depth was cached), ``seconds`` (wall, everything) and ``cpu_seconds`` (this
        process's CPU time), and ``cells``: one dict per depth with ``depth``,
        ``feature_dim``, each score and ``score_seconds``.
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if threads:
        torch.set_num_threads(threads)
    p = resolve_trial_config(config)
    device = pick_device(p.device)
    data = load_data(p.data, seed=p.seed)
    model = place_model(build_model(p, num_classes=data.num_classes), device,
                        channels_last=p.channels_last)
    stages = len(model.stages)
    wanted = sorted(set(depths or range(1, stages + 1)))
    if not wanted or wanted[0] < 1 or wanted[-1] > stages:
        raise ValueError(f"depths {wanted} out of range for {p.backbone!r}: 1..{stages}")
    with tempfile.TemporaryDirectory() as scratch:  # no cache_dir: computed, not kept
        sets, feature_seconds = pooled_stage_features(
            model, depths=wanted, train=data.train, val=data.val,
            resolution=p.input_resolution(), data_key=json.dumps(p.data, sort_keys=True),
            cache_dir=p.cache_dir or scratch, device=device, amp=p.amp,
            channels_last=p.channels_last, batch_size=p.eval_batch_size)
        cells = []
        for depth in wanted:
            train = sets[depth][0]
            t0 = time.perf_counter()
            scores = {name: score(train.features, train.labels)
                      for name, score in SCORES.items()}
            cells.append({"depth": depth, "feature_dim": int(train.features.shape[1]),
                          **scores, "score_seconds": time.perf_counter() - t0})
    return {"backbone": p.backbone, "weights": str(p.weights),
            "resolution": p.input_resolution(), "stages": stages,
            "train_images": len(data.train), "classes": data.num_classes,
            "feature_seconds": feature_seconds, "seconds": time.perf_counter() - wall0,
            "cpu_seconds": time.process_time() - cpu0, "cells": cells}


def imagenet_confidence(config: Mapping[str, Any], *, max_images: int = 256) -> dict[str, Any]:
    """How confidently the backbone's own ImageNet classifier labels the training images.

    The mean of the largest softmax probability (MSP) of the pretrained 1000-class head,
    over up to ``max_images`` training images (a seeded sample) at the backbone's
    pretraining resolution: the baseline out-of-distribution score of Hendrycks & Gimpel
    (*A Baseline for Detecting Misclassified and Out-of-Distribution Examples*, ICLR 2017).
    Images like the pretraining data get confident predictions; other images spread them.

    Raises:
        ValueError: The weights have no ImageNet classifier (a fine-tuned state dict).
    """
    t0 = time.perf_counter()
    p = resolve_trial_config(config)
    device = pick_device(p.device)
    data = load_data(p.data, seed=p.seed)
    model = build_backbone(p.backbone, num_classes=PRETRAINED_CLASSES, weights=p.weights,
                           **p.efficientnet_kwargs()).to(device)
    resolution = default_resolution(p.backbone, **p.efficientnet_kwargs())
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(p.seed))
    chosen = set(order[:max_images].tolist())
    top: list[torch.Tensor] = []
    seen = 0
    with torch.no_grad(), eval_mode(model):
        for x, _ in data.train.batches(batch_size=64, shuffle=False, device=device):
            keep = [i for i in range(len(x)) if seen + i in chosen]
            seen += len(x)
            if keep:
                batch = preprocess(x[keep], resolution=resolution, mean=model.mean,
                                   std=model.std)
                top.append(model(batch).float().softmax(1).amax(1).cpu())
    values = torch.cat(top)
    return {"backbone": p.backbone, "weights": str(p.weights), "resolution": resolution,
            "images": len(values), "msp": float(values.mean()),
            "seconds": time.perf_counter() - t0}
