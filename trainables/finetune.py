"""The trial: fine-tune one configuration, evaluate every epoch, report, checkpoint.

:func:`run_trial` is the whole training loop as a plain function with a report
callback, so it runs without Ray (benchmarks compare the two).
:func:`tune_trainable` is the Ray Tune function trainable around it: it
restores from ``ray.tune.get_checkpoint()`` and reports each epoch through
``ray.tune.report`` with a checkpoint.

The trial receives one flat, plain dict, validated by :class:`~trainables.params.TrialParams`
(an unknown key is an error that names it). Process concerns (device, memory, failure
text) live in :mod:`trainables.runtime`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from trainables import metrics as M
from trainables.cache import FrozenFeatures, bypass_reason, frozen_features, say_once
from trainables.classical import fit_probe, run_classical_trial
from trainables.data import DataSplits, ImageSet, load_data, preprocess
from trainables.models import StagedNet, build_backbone
from trainables.models.complexity import count_macs, count_params
from trainables.optim import (
    apply_lr_schedule,
    build_optimizer,
    cosine_warmup_factor,
    freeze_stages,
    param_groups,
    set_train_mode,
    unfreeze_param_groups,
)
from trainables.params import CLASSICAL_HEADS, TrialParams
from trainables.runtime import (
    TrialError,
    TrialSetupError,
    autocast,
    failure_text,
    freeze_long_lived_objects,
    peak_gpu_mb,
    peak_rss_mb,
    pick_device,
    place_model,
    ray_trial_device,
    release_memory,
    reset_peak_memory,
)
from trainables.scoring import evaluate

__all__ = [
    "CHECKPOINT_FILE",
    "ReportFn",
    "build_model",
    "load_checkpoint_state",
    "resolve_trial_config",
    "run_trial",
    "tune_trainable",
]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"

# (metrics, checkpoint state) -> None. The state is what a resume needs.
ReportFn = Callable[[dict[str, Any], dict[str, Any]], None]


def resolve_trial_config(config: Mapping[str, Any]) -> TrialParams:
    """The validated trial parameters, weights picked for the backbone, freeze depth derived.

    Raises:
        TrialSetupError: An unknown key or an invalid value; the message names the field.
    """
    try:
        return TrialParams.model_validate(dict(config)).resolved()
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors())
        raise TrialSetupError(f"invalid trial parameters: {problems}") from None


def build_model(params: TrialParams, *, num_classes: int) -> StagedNet:
    """The backbone of ``params`` with its head sized for ``num_classes``."""
    return build_backbone(params.backbone, num_classes=num_classes, weights=params.weights,
                          **params.efficientnet_kwargs())


@lru_cache(maxsize=2)
def _cached_data(spec_json: str, seed: int) -> DataSplits:
    # One decode per worker process: reused actors and repeated trials share it.
    return load_data(json.loads(spec_json), seed=seed)


def _setup(params: TrialParams) -> tuple[DataSplits, StagedNet]:
    """The data and the model; a failure here would repeat in every trial of this kind."""
    data_key = json.dumps(params.data, sort_keys=True)
    try:
        data = _cached_data(data_key, params.seed)
    except (ValueError, OSError, RuntimeError) as err:
        raise TrialSetupError(f"the data cannot be loaded: {type(err).__name__}: {err}") from err
    try:
        model = build_model(params, num_classes=data.num_classes)
    except torch.OutOfMemoryError:
        raise  # one configuration too big for its device: not every trial's fate
    except (ValueError, OSError, RuntimeError) as err:
        raise TrialSetupError(f"backbone {params.backbone!r} with weights {params.weights!r} "
                              f"cannot be built: {type(err).__name__}: {err}") from err
    return data, model


def _groups(model: StagedNet, p: TrialParams) -> list[dict[str, Any]]:
    return param_groups(model, lr=p.lr, lr_scale=p.lr_scale, weight_decay=p.weight_decay,
                        freeze_depth=p.freeze_depth, layer_decay=p.layer_decay)


def _unfreeze_groups(model: StagedNet, p: TrialParams) -> list[dict[str, Any]]:
    return unfreeze_param_groups(model, lr=p.lr, lr_scale=p.lr_scale,
                                 weight_decay=p.weight_decay, freeze_depth=p.freeze_depth,
                                 layer_decay=p.layer_decay)


def _unfrozen_at(p: TrialParams, epoch: int) -> bool:
    at = p.unfreeze_at_epoch
    return at is not None and p.freeze_depth > 0 and epoch >= at


class _Tail(nn.Module):
    """``stages[start:]`` and the head: what runs on the frozen stages' cached outputs."""

    def __init__(self, model: StagedNet, start: int) -> None:
        super().__init__()
        self.model, self.start = model, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_stages(x, self.start))


def _frozen_inputs(
    p: TrialParams,
    model: StagedNet,
    *,
    train_set: ImageSet,
    val_set: ImageSet,
    resolution: int,
    device: torch.device,
) -> FrozenFeatures | None:
    """The frozen stages' outputs, computed once per node, when the cache applies."""
    if not p.cache_dir or p.freeze_depth == 0:
        return None
    reason = bypass_reason(augment=p.augment, unfreeze_at_epoch=p.unfreeze_at_epoch)
    if reason:
        say_once(f"frozen-stage cache bypassed: {reason}")
        return None
    return frozen_features(
        model, depth=p.freeze_depth, train=train_set, val=val_set, resolution=resolution,
        data_key=json.dumps(p.data, sort_keys=True), cache_dir=p.cache_dir, device=device,
        amp=p.amp, channels_last=p.channels_last, batch_size=p.eval_batch_size)


def run_trial(
    config: Mapping[str, Any],
    *,
    report: ReportFn,
    state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tunes one configuration; returns the last reported metrics.

    Args:
        config: Trial parameters (fields of :class:`~trainables.params.TrialParams`).
        report: Called after every epoch with the metrics and the checkpoint state.
        state: A state passed to ``report`` earlier: training continues at the
            epoch after the one it was taken at, with identical model,
            optimizer and RNG state.

    Raises:
        TrialSetupError: Invalid parameters, or data or weights that cannot load.
    """
    p = resolve_trial_config(config)
    torch.manual_seed(p.seed)
    device = pick_device(p.device)
    reset_peak_memory(device)

    # --- data and model
    data, model = _setup(p)
    resolution = p.input_resolution()
    params = count_params(model)
    gmacs = count_macs(model, resolution=resolution) / 1e9
    freeze_stages(model, p.freeze_depth)
    place_model(model, device, channels_last=p.channels_last)
    if p.head in CLASSICAL_HEADS:  # fitted in one go on pooled frozen features
        return run_classical_trial(p, model, data, device=device, report=report, state=state)
    if p.head_init == "probe" and state is None:
        seconds = fit_probe(p, model, data, device=device)
        log.info("linear head initialised by a logistic-regression probe in %.1f s", seconds)
    train_set, val_set = data.train, data.val
    if device.type == "cuda" and hasattr(train_set, "to"):
        # Small in-memory datasets live on the GPU: no host-to-device copy per batch.
        train_set, val_set = train_set.to(device), val_set.to(device)

    # --- optimiser and schedule
    optimizer = build_optimizer(p.optimizer, _groups(model, p), momentum=p.momentum)
    steps_per_epoch = math.ceil(len(train_set) / p.batch_size)
    if p.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, p.max_steps_per_epoch)
    total_steps = steps_per_epoch * p.epochs
    warmup_steps = round(p.warmup_epochs * steps_per_epoch)

    # --- resume
    start_epoch, step = 1, 0
    if state is not None:
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        model.load_state_dict(state["model"])
        if _unfrozen_at(p, start_epoch - 1):
            for group in _unfreeze_groups(model, p):
                optimizer.add_param_group(group)
        fresh_rates = [g["base_lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        # PBT may have mutated lr/lr_scale: the current config's rates win.
        for group, base_lr in zip(optimizer.param_groups, fresh_rates, strict=True):
            group["base_lr"] = base_lr
        torch.set_rng_state(state["torch_rng"])

    # --- inputs: images, or the frozen stages' outputs computed once (trainables/cache.py)
    start = 0
    frozen = _frozen_inputs(p, model, train_set=train_set, val_set=val_set,
                            resolution=resolution, device=device)
    if frozen is not None:
        train_set, val_set, start = frozen.train, frozen.val, frozen.start
    forward = _Tail(model, start) if start else model
    if p.compile:
        forward = torch.compile(forward)

    last: dict[str, Any] = {}
    for epoch in range(start_epoch, p.epochs + 1):
        if p.unfreeze_at_epoch == epoch and _unfrozen_at(p, epoch):
            for group in _unfreeze_groups(model, p):
                optimizer.add_param_group(group)
        depth = 0 if _unfrozen_at(p, epoch) else p.freeze_depth

        # --- train one epoch
        t0 = time.perf_counter()
        set_train_mode(model, depth)
        gen = torch.Generator(device=device).manual_seed(p.seed * 100_003 + epoch)
        loss_sum, seen, diverged = 0.0, 0, False
        batches = train_set.batches(batch_size=p.batch_size, shuffle=True,
                                    seed=p.seed * 100_003 + epoch, device=device,
                                    drop_last=len(train_set) > p.batch_size)
        for i, (x, y) in enumerate(batches):
            if i >= steps_per_epoch:
                break
            apply_lr_schedule(optimizer, cosine_warmup_factor(
                step, total_steps=total_steps, warmup_steps=warmup_steps))
            if start == 0:
                x = preprocess(x, resolution=resolution, mean=model.mean, std=model.std,
                               augment=p.augment, generator=gen)
            if p.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, p.amp):
                loss = F.cross_entropy(forward(x).float(), y, label_smoothing=p.label_smoothing)
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        train_seconds = time.perf_counter() - t0

        # --- evaluate and report
        result: dict[str, Any] = {M.EPOCH: epoch, M.PARAMS: params, M.GMACS: gmacs,
                                  M.LR: optimizer.param_groups[0]["lr"], M.DIVERGED: diverged}
        if diverged:
            result.update({M.TRAIN_LOSS: float("nan"), M.VAL_LOSS: float("nan"),
                           M.TOP1: last.get(M.TOP1, 0.0), M.TOP5: last.get(M.TOP5, 0.0)})
        else:
            result[M.TRAIN_LOSS] = loss_sum / max(seen, 1)
            result.update(evaluate(model, val_set, resolution=resolution,
                                   batch_size=p.eval_batch_size, device=device, amp=p.amp,
                                   start=start))
        result[M.SAMPLES_PER_S] = seen / train_seconds if train_seconds > 0 else 0.0
        result[M.SECONDS] = time.perf_counter() - t0
        result[M.PEAK_RSS_MB] = peak_rss_mb()
        result[M.PEAK_GPU_MB] = peak_gpu_mb(device)
        result[M.RESUMED_FROM] = start_epoch - 1
        checkpoint_state = {
            "epoch": epoch,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        report(result, checkpoint_state)
        last = result
        if diverged:
            log.warning("trial diverged at epoch %d (non-finite loss); stopping it", epoch)
            break
    return last


def load_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """Reads a state written by :func:`tune_trainable` (tensors only, ``weights_only``)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def tune_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: :func:`run_trial` with checkpoints in Tune's storage."""
    import ray
    from ray import tune

    # One line per checkpoint from Ray's storage layer is noise in a search log.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    freeze_long_lived_objects()
    assigned = ray.get_runtime_context().get_assigned_resources()
    cpus = assigned.get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    requested = config.get("device", TrialParams.model_fields["device"].default)
    device = ray_trial_device(str(requested), assigned_gpus=float(assigned.get("GPU", 0)))
    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint_state(directory)

    node_id = ray.get_runtime_context().get_node_id()

    def report(result: dict[str, Any], checkpoint_state: dict[str, Any]) -> None:
        result = {**result, "node_id": node_id}
        if result.get(M.COMPLETE):
            # Tune then ends the trial without asking the scheduler about this result:
            # ASHA/HyperBand record it as complete instead of stopping or awaiting it.
            result[tune.result.DONE] = True
        with tempfile.TemporaryDirectory() as directory:
            torch.save(checkpoint_state, Path(directory) / CHECKPOINT_FILE)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))

    # Tune gives every trial of preset points (a grid) the union of their keys, None where a
    # point lacks one (a classical head's `lr`): for a trial parameter None means unset.
    config = {k: v for k, v in config.items() if v is not None}
    stopped, failure = False, None
    try:
        run_trial({**config, "device": device}, report=report, state=state)
    except SystemExit as stop:
        # Tune stops a trial (a scheduler decision) by raising SystemExit(0) in report. Its
        # traceback holds run_trial's frame, model and optimizer included: leave this block,
        # which drops it, before releasing memory.
        if stop.code not in (0, None):
            raise
        stopped = True
    except TrialSetupError as err:
        failure = TrialSetupError(str(err))  # the message is the whole story; drop the frames
    except Exception as err:  # noqa: BLE001 - re-raised below, as text, once memory is freed
        failure = TrialError(failure_text(err))
    state = None
    release_memory(compiled=bool(config.get("compile")))
    if failure is not None:
        raise failure
    if stopped:
        sys.exit(0)  # what Tune expects of a trial it stopped
