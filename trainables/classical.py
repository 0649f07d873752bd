"""Fitting on frozen, pooled features: the classical-head trial and the LP-FT probe.

A classical head (``logreg``, ``svm``, ``xgboost``; :mod:`trainables.heads`) is fitted once
on the global-average-pooled output of a frozen pretrained backbone (stage
``features_from``, by default the last). The pooled features come from the frozen-stage
cache (:mod:`trainables.cache`), so on a node only the first trial of a backbone, depth and
dataset runs the backbone; every later one pays only for its fit. The trial reports one
result (epoch 1) marked :data:`~trainables.metrics.COMPLETE`: it has nothing left to train,
so a scheduler neither stops it nor waits for it at a later rung.

The probe (``head_init: probe``, LP-FT, Kumar et al. 2022) fits the network's own linear
classifier by logistic regression on the same features before fine-tuning starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from trainables import metrics as M
from trainables.cache import FeatureSet, compute_features, frozen_features
from trainables.data import DataSplits, ImageSet, preprocess
from trainables.fitted_heads import FittedHead
from trainables.heads import fit_head, linear_probe
from trainables.models import StagedNet
from trainables.models.complexity import count_macs, count_params
from trainables.models.stagednet import eval_mode, kept_training_modes
from trainables.optim import set_train_mode
from trainables.params import TrialParams
from trainables.runtime import autocast, peak_gpu_mb, peak_rss_mb
from trainables.scoring import topk_correct

__all__ = [
    "HEAD_STATE_KEY",
    "FeatureHeadNet",
    "fit_probe",
    "pooled_features",
    "run_classical_trial",
]

# Checkpoint key of a classical head's state (FittedHead.state()); the export reads it.
HEAD_STATE_KEY = "head"
# Modules a head may hold before its classifier for the classifier's input to be the pooled
# stage output (in eval mode): torchvision's ResNet/EfficientNet heads and Lite0's.
_POOLING_ONLY = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.Sequential)


def pooled_features(
    p: TrialParams,
    model: StagedNet,
    data: DataSplits,
    *,
    depth: int,
    device: torch.device,
) -> tuple[FeatureSet, FeatureSet, float]:
    """Pooled outputs of ``stages[:depth]`` for the training and validation images.

    Read from (or computed into) the trial's cache directory when it has one.

    Returns:
        ``(train, val, seconds)``: the feature sets, and the time spent computing them
        (0.0 when they were on disk).
    """
    options = {"depth": depth, "resolution": p.input_resolution(), "device": device,
               "amp": p.amp, "channels_last": p.channels_last, "batch_size": p.eval_batch_size,
               "pool": True}
    if p.cache_dir:
        cached = frozen_features(model, train=data.train, val=data.val, cache_dir=p.cache_dir,
                                 data_key=json.dumps(p.data, sort_keys=True), **options)
        if cached is not None:
            return cached.train, cached.val, cached.build_seconds
    t0 = time.perf_counter()
    train = compute_features(model, data.train, **options)
    val = compute_features(model, data.val, **options)
    return train, val, time.perf_counter() - t0


def _fit(p: TrialParams, features: FeatureSet, *, num_classes: int,
         device: torch.device) -> FittedHead:
    # scikit-learn and xgboost take host arrays; a GPU trial's cached features are on the GPU.
    return fit_head(p.head, features.features.cpu(), features.labels.cpu(),
                    num_classes=num_classes,
                    logreg_c=p.logreg_c, svm_kernel=p.svm_kernel, svm_c=p.svm_c,
                    svm_gamma=p.svm_gamma, xgb_n_estimators=p.xgb_n_estimators,
                    xgb_max_depth=p.xgb_max_depth, xgb_learning_rate=p.xgb_learning_rate,
                    xgb_subsample=p.xgb_subsample, seed=p.seed,
                    use_cuda=device.type == "cuda")


def _accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """top-1 and top-5 (percent), counted as the SGD trial counts them."""
    labels = labels.to(scores.device)
    n = max(len(labels), 1)
    return {M.TOP1: 100.0 * topk_correct(scores, labels, 1) / n,
            M.TOP5: 100.0 * topk_correct(scores, labels, 5) / n}


def _nll(probabilities: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of ``labels``."""
    # Clipped as scikit-learn's log_loss clips: a zero probability is not infinitely bad.
    picked = probabilities.gather(1, labels.to(probabilities.device)[:, None]).clamp_min(1e-15)
    return float(-picked.log().mean())


def run_classical_trial(
    p: TrialParams,
    model: StagedNet,
    data: DataSplits,
    *,
    device: torch.device,
    report: Any,
    state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fits ``p.head`` on pooled frozen features; reports one complete result (epoch 1).

    Args:
        p: Resolved trial parameters (``freeze_depth`` is the feature depth).
        model: The backbone with its pretrained weights, on ``device``.
        data: The dataset.
        device: Where the backbone runs (and xgboost fits, on a GPU build).
        report: ``report(metrics, checkpoint_state)``, as :func:`trainables.finetune.run_trial`.
        state: A checkpoint state of this trial: it is already fitted, and its result is
            reported again (the results store keeps one row per epoch).
    """
    if state is not None:
        result = dict(state["result"])
        report(result, dict(state))
        return result
    depth = p.freeze_depth
    backbone = nn.Sequential(*model.stages[:depth])
    backbone_macs = count_macs(backbone, resolution=p.input_resolution())
    train, val, _ = pooled_features(p, model, data, depth=depth, device=device)
    # As an SGD trial's epoch `seconds`: the training and evaluation, not the setup (model,
    # MACs, the frozen features, which the cache makes a one-off per node).
    t0 = time.perf_counter()
    head = _fit(p, train, num_classes=data.num_classes, device=device)
    fit_seconds = time.perf_counter() - t0
    val_scores = head.scores(val.features)
    # Losses need probabilities: the SVM's decision values have none (nor its training set
    # scored, which would be all this is for).
    train_loss = _nll(head.scores(train.features), train.labels) if head.probabilistic else None
    val_loss = _nll(val_scores, val.labels) if head.probabilistic else None
    macs = backbone_macs + head.macs_per_image
    result = {
        M.EPOCH: 1, M.COMPLETE: True, M.DIVERGED: False, M.LR: None,
        M.PARAMS: count_params(backbone) + head.num_params, M.GMACS: macs / 1e9,
        M.TRAIN_LOSS: train_loss, M.VAL_LOSS: val_loss, **_accuracy(val_scores, val.labels),
        M.SAMPLES_PER_S: len(train) / fit_seconds if fit_seconds > 0 else 0.0,
        M.SECONDS: time.perf_counter() - t0,
        M.PEAK_RSS_MB: peak_rss_mb(), M.PEAK_GPU_MB: peak_gpu_mb(device), M.RESUMED_FROM: 0,
    }
    checkpoint_state = {"epoch": 1, "step": 0, "model": model.state_dict(),
                        HEAD_STATE_KEY: head.state(), "result": result}
    report(result, checkpoint_state)
    return result


# --------------------------------------------------------------------------- the probe


def _pooling_only(model: StagedNet) -> bool:
    classifier = model.classifier
    for module in model.head.modules():
        if module is classifier:
            continue
        if not isinstance(module, _POOLING_ONLY):
            return False
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size not in (1, (1, 1)):
            return False
    return True


def _classifier_inputs(p: TrialParams, model: StagedNet, images: ImageSet,
                       device: torch.device) -> tuple[Tensor, Tensor]:
    """What the classifier receives for each image in eval mode (a head with layers of its
    own before the classifier, as VGG's, has no pooled-feature shortcut)."""
    captured: list[Tensor] = []
    labels: list[Tensor] = []
    hook = model.classifier.register_forward_pre_hook(
        lambda _, args: captured.append(args[0].detach().float().cpu()))
    try:
        with eval_mode(model), torch.no_grad(), autocast(device, p.amp):
            for x, y in images.batches(batch_size=p.eval_batch_size, shuffle=False,
                                       device=device):
                model(preprocess(x, resolution=p.input_resolution(), mean=model.mean,
                                 std=model.std))
                labels.append(y.cpu())
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(labels)


def _adapt_batch_norm(p: TrialParams, model: StagedNet, images: ImageSet, *,
                      device: torch.device) -> None:
    """Sets the running statistics of the trainable stages' batch norms to this data's.

    Fine-tuning runs those layers on batch statistics, which for data unlike the
    pretraining data (digits vs ImageNet) differ far from the pretrained running
    statistics: a probe fitted on features normalised by the latter would see other
    features from the first step on and lose what it learnt (on 64 px digits with Lite0,
    top-1 fell from 89 % to 9 % within 3 steps). Re-estimated here over one pass of the
    training images, as AdaBN (Li et al. 2016) does, both modes see the same features.
    """
    norms = [m for stage in model.stages[p.freeze_depth:] for m in stage.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    try:
        with kept_training_modes(model), torch.no_grad(), autocast(device, p.amp):
            set_train_mode(model, p.freeze_depth)
            for x, _ in images.batches(batch_size=p.batch_size, shuffle=False, device=device):
                model.forward_stages(preprocess(x, resolution=p.input_resolution(),
                                                mean=model.mean, std=model.std))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


def fit_probe(p: TrialParams, model: StagedNet, data: DataSplits, *,
              device: torch.device) -> float:
    """Sets the classifier to the logistic-regression fit on the training features (LP-FT).

    Uses the trial's seed and ``logreg_c``; the features are the frozen pretrained
    backbone's (cached, pooled) outputs. Call it before training starts.

    Returns:
        The seconds it took.
    """
    t0 = time.perf_counter()
    _adapt_batch_norm(p, model, data.train, device=device)
    if _pooling_only(model):
        train, _, _ = pooled_features(p, model, data, depth=len(model.stages), device=device)
        features, labels = train.features, train.labels
    else:
        features, labels = _classifier_inputs(p, model, data.train, device)
    weight, bias = linear_probe(features, labels, num_classes=data.num_classes,
                                c=p.logreg_c, seed=p.seed)
    classifier = model.classifier
    with torch.no_grad():
        classifier.weight.copy_(weight.to(classifier.weight))
        classifier.bias.copy_(bias.to(classifier.bias))
    return time.perf_counter() - t0


class FeatureHeadNet(nn.Module):
    """Images to a classical head's class scores: pooled ``stages[:depth]``, then the head.

    What an exported classical-head model runs (:mod:`search.export`); the pooling is the
    trial's (:func:`trainables.cache.compute_features` with ``pool=True``).
    """

    def __init__(self, backbone: StagedNet, *, depth: int, head: FittedHead) -> None:
        super().__init__()
        self.backbone, self.depth, self.head = backbone, depth, head

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone.forward_stages(x, 0, self.depth).float()
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        return self.head.scores(out)
