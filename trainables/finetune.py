"""The trial: fine-tune one configuration, evaluate every epoch, report, checkpoint.

:func:`run_trial` is the whole training loop as a plain function with a report
callback, so it runs without Ray (benchmarks compare the two).
:func:`tune_trainable` is the Ray Tune function trainable around it: it
restores from ``ray.tune.get_checkpoint()`` and reports each epoch through
``ray.tune.report`` with a checkpoint.

The trial receives one flat, plain dict (see ``TRIAL_DEFAULTS``); an unknown
key is an error that names it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import math
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables import metrics as M
from trainables.backbones import StagedNet, build_backbone, stage_count
from trainables.cache import FeatureSet, FrozenFeatures, bypass_reason, frozen_features, say_once
from trainables.data import DataSplits, ImageSet, load_data, preprocess
from trainables.optim import (
    apply_lr_schedule,
    build_optimizer,
    cosine_warmup_factor,
    freeze_stages,
    param_groups,
    set_train_mode,
    unfreeze_param_groups,
)
from trainables.scaling import count_macs, count_params

__all__ = [
    "CHECKPOINT_FILE",
    "EFFICIENTNET_KEYS",
    "TRIAL_DEFAULTS",
    "ReportFn",
    "TrialError",
    "build_model",
    "evaluate",
    "load_checkpoint_state",
    "resolve_trial_config",
    "run_trial",
    "tune_trainable",
]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"

# Coefficients of the free `efficientnet` backbone; sampled only for it.
EFFICIENTNET_KEYS = ("width_mult", "depth_mult", "phi", "alpha", "beta", "gamma")

TRIAL_DEFAULTS: dict[str, Any] = {
    # model
    "backbone": "resnet18",
    # none | imagenet | packaged | a state-dict path, or a mapping backbone -> one of
    # those (key `default` for the rest), since a search may mix backbones.
    "weights": "none",
    "resolution": None,  # None: the backbone's default
    "width_mult": None,
    "depth_mult": None,
    "phi": None,
    "alpha": None,
    "beta": None,
    "gamma": None,
    # fine-tuning
    "freeze_depth": 0,
    "freeze_fraction": None,  # if set, freeze_depth = round(fraction * stage count)
    "lr": 0.01,  # head learning rate
    "lr_scale": 0.1,  # backbone rate = lr * lr_scale
    "layer_decay": None,
    "unfreeze_at_epoch": None,
    # optimisation
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "batch_size": 32,
    "eval_batch_size": 256,
    "epochs": 3,
    "warmup_epochs": 0.0,
    "label_smoothing": 0.0,
    "augment": False,
    "max_steps_per_epoch": None,  # cap for smoke runs
    # data and execution
    "data": {"source": "digits"},
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda
    "amp": True,  # bf16 autocast on CUDA
    "channels_last": True,  # on CUDA
    "compile": False,  # torch.compile the model
    # Node-local directory of the frozen-stage cache (trainables/cache.py); None: no cache.
    # Searches set it to <storage>/<name>/.cache.
    "cache_dir": None,
}

# (metrics, checkpoint state) -> None. The state is what a resume needs.
ReportFn = Callable[[dict[str, Any], dict[str, Any]], None]


def resolve_trial_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in; an unknown key or a misplaced coefficient is a ``ValueError``."""
    unknown = sorted(set(config) - set(TRIAL_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown trial parameter(s) {unknown}; valid ones are {sorted(TRIAL_DEFAULTS)}"
        )
    cfg = {**TRIAL_DEFAULTS, **config}
    if cfg["backbone"] != "efficientnet":
        given = [k for k in EFFICIENTNET_KEYS if cfg[k] is not None]
        if given:
            raise ValueError(
                f"{given} only apply to backbone 'efficientnet' (free compound scaling), "
                f"not to {cfg['backbone']!r}"
            )
    if isinstance(cfg["weights"], Mapping):
        cfg["weights"] = cfg["weights"].get(cfg["backbone"], cfg["weights"].get("default", "none"))
    if cfg["freeze_fraction"] is not None:
        n = stage_count(cfg["backbone"])
        cfg["freeze_depth"] = min(n, round(float(cfg["freeze_fraction"]) * n))
    for key in ("epochs", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]!r} must be an integer >= 1")
    return cfg


def build_model(cfg: Mapping[str, Any], *, num_classes: int) -> StagedNet:
    """The backbone of ``cfg`` with its head sized for ``num_classes``."""
    kwargs: dict[str, Any] = {}
    if cfg["backbone"] == "efficientnet":
        kwargs = {k: cfg[k] for k in EFFICIENTNET_KEYS if cfg[k] is not None}
        if cfg["resolution"] is not None and cfg["phi"] is None:
            kwargs["resolution"] = cfg["resolution"]  # with phi it is derived
    return build_backbone(cfg["backbone"], num_classes=num_classes, weights=cfg["weights"],
                          **kwargs)


def _pick_device(requested: str) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={requested!r}: choose one of ['auto', 'cpu', 'cuda']")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        warnings.warn("device=cuda was requested but no usable CUDA device is visible on this "
                      "node: the trial runs on CPU", RuntimeWarning, stacklevel=2)
    return torch.device("cpu")


def _ray_trial_device(requested: str, *, assigned_gpus: float) -> str:
    """The device of a Ray trial: CUDA only where Ray assigned it a GPU share."""
    if requested != "auto":
        return requested  # an explicit device wins; _pick_device warns if CUDA is missing
    if assigned_gpus <= 0:
        # No GPU reserved: taking a visible GPU anyway would collide with trials that did.
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    warnings.warn(f"Ray assigned this trial {assigned_gpus:g} GPU, but its node has no usable "
                  f"CUDA device (torch.cuda.is_available() is False): the trial runs on CPU",
                  RuntimeWarning, stacklevel=2)
    return "cpu"


@lru_cache(maxsize=2)
def _cached_data(spec_json: str, seed: int) -> DataSplits:
    # One decode per worker process: reused actors and repeated trials share it.
    return load_data(json.loads(spec_json), seed=seed)


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
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
    with torch.no_grad(), _autocast(device, amp):
        for x, y in images.batches(batch_size=batch_size, shuffle=False, device=device):
            if start == 0:
                x = preprocess(x, resolution=resolution, mean=model.mean, std=model.std)
            logits = model.forward_head(model.forward_stages(x, start)).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            top1 += _topk_correct(logits, y, 1)
            top5 += _topk_correct(logits, y, 5)
            n += len(y)
    return {M.VAL_LOSS: loss_sum / n, M.TOP1: 100.0 * top1 / n, M.TOP5: 100.0 * top5 / n}


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _reset_peak_memory(device: torch.device) -> None:
    """Starts the trial's peak-memory window, so a reused actor's earlier trials do not count."""
    with contextlib.suppress(OSError):
        # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS.
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_rss_mb() -> float:
    """Peak RSS since :func:`_reset_peak_memory` (Linux); elsewhere the process's peak."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _peak_gpu_mb(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / (1024 * 1024)


def _groups(model: StagedNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    return param_groups(model, lr=cfg["lr"], lr_scale=cfg["lr_scale"],
                        weight_decay=cfg["weight_decay"], freeze_depth=cfg["freeze_depth"],
                        layer_decay=cfg["layer_decay"])


def _unfreeze_groups(model: StagedNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    return unfreeze_param_groups(model, lr=cfg["lr"], lr_scale=cfg["lr_scale"],
                                 weight_decay=cfg["weight_decay"],
                                 freeze_depth=cfg["freeze_depth"], layer_decay=cfg["layer_decay"])


def _unfrozen_at(cfg: Mapping[str, Any], epoch: int) -> bool:
    at = cfg["unfreeze_at_epoch"]
    return at is not None and cfg["freeze_depth"] > 0 and epoch >= at


class _Tail(nn.Module):
    """``stages[start:]`` and the head: what runs on the frozen stages' cached outputs."""

    def __init__(self, model: StagedNet, start: int) -> None:
        super().__init__()
        self.model, self.start = model, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_stages(x, self.start))


def _frozen_inputs(
    cfg: Mapping[str, Any],
    model: StagedNet,
    *,
    train_set: ImageSet,
    val_set: ImageSet,
    data_key: str,
    resolution: int,
    device: torch.device,
) -> FrozenFeatures | None:
    """The frozen stages' outputs, computed once per node, when the cache applies."""
    if not cfg["cache_dir"] or cfg["freeze_depth"] == 0:
        return None
    reason = bypass_reason(augment=cfg["augment"], unfreeze_at_epoch=cfg["unfreeze_at_epoch"])
    if reason:
        say_once(f"frozen-stage cache bypassed: {reason}")
        return None
    return frozen_features(
        model, depth=cfg["freeze_depth"], train=train_set, val=val_set, resolution=resolution,
        data_key=data_key, cache_dir=cfg["cache_dir"], device=device, amp=cfg["amp"],
        channels_last=cfg["channels_last"], batch_size=cfg["eval_batch_size"])


@lru_cache(maxsize=1)
def _freeze_long_lived_objects() -> None:
    # torch, Ray and their modules are ~500k long-lived objects; a full gc.collect() over them
    # costs about half a second per trial. Frozen once per worker process, they are left out
    # of every later collection, which then sees only what trials allocate.
    gc.collect()
    gc.freeze()


def _release_memory(*, compiled: bool) -> None:
    """Frees what a finished trial left behind, so a reused actor starts the next one clean."""
    if compiled:
        torch._dynamo.reset()  # compiled graphs hold the old model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    # glibc keeps freed heap pages mapped; handing them back makes the next trial's peak RSS
    # its own and lets other processes on the node use the memory.
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_trial(
    config: Mapping[str, Any],
    *,
    report: ReportFn,
    state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tunes one configuration; returns the last reported metrics.

    Args:
        config: Trial parameters (keys of ``TRIAL_DEFAULTS``).
        report: Called after every epoch with the metrics and the checkpoint state.
        state: A state passed to ``report`` earlier: training continues at the
            epoch after the one it was taken at, with identical model,
            optimizer and RNG state.
    """
    cfg = resolve_trial_config(config)
    torch.manual_seed(cfg["seed"])
    device = _pick_device(cfg["device"])
    _reset_peak_memory(device)

    # --- data and model
    data_key = json.dumps(cfg["data"], sort_keys=True)
    data = _cached_data(data_key, cfg["seed"])
    model = build_model(cfg, num_classes=data.num_classes)
    resolution = model.resolution if cfg["phi"] is not None else (
        cfg["resolution"] or model.resolution)
    params = count_params(model)
    gmacs = count_macs(model, resolution=resolution) / 1e9
    freeze_stages(model, cfg["freeze_depth"])
    model.to(device)
    if device.type == "cuda" and cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    train_set, val_set = data.train, data.val
    if device.type == "cuda" and hasattr(train_set, "to"):
        # Small in-memory datasets live on the GPU: no host-to-device copy per batch.
        train_set, val_set = train_set.to(device), val_set.to(device)

    # --- optimiser and schedule
    optimizer = build_optimizer(cfg["optimizer"], _groups(model, cfg), momentum=cfg["momentum"])
    steps_per_epoch = math.ceil(len(train_set) / cfg["batch_size"])
    if cfg["max_steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, cfg["max_steps_per_epoch"])
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup_steps = round(cfg["warmup_epochs"] * steps_per_epoch)

    # --- resume
    start_epoch, step = 1, 0
    if state is not None:
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        model.load_state_dict(state["model"])
        if _unfrozen_at(cfg, start_epoch - 1):
            for group in _unfreeze_groups(model, cfg):
                optimizer.add_param_group(group)
        fresh_rates = [g["base_lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        # PBT may have mutated lr/lr_scale: the current config's rates win.
        for group, base_lr in zip(optimizer.param_groups, fresh_rates, strict=True):
            group["base_lr"] = base_lr
        torch.set_rng_state(state["torch_rng"])

    # --- inputs: images, or the frozen stages' outputs computed once (trainables/cache.py)
    start = 0
    frozen = _frozen_inputs(cfg, model, train_set=train_set, val_set=val_set, data_key=data_key,
                            resolution=resolution, device=device)
    if frozen is not None:
        train_set, val_set, start = frozen.train, frozen.val, frozen.start
    forward = _Tail(model, start) if start else model
    if cfg["compile"]:
        forward = torch.compile(forward)

    last: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg["epochs"] + 1):
        if cfg["unfreeze_at_epoch"] == epoch and _unfrozen_at(cfg, epoch):
            for group in _unfreeze_groups(model, cfg):
                optimizer.add_param_group(group)
        depth = 0 if _unfrozen_at(cfg, epoch) else cfg["freeze_depth"]

        # --- train one epoch
        t0 = time.perf_counter()
        set_train_mode(model, depth)
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] * 100_003 + epoch)
        loss_sum, seen, diverged = 0.0, 0, False
        batches = train_set.batches(batch_size=cfg["batch_size"], shuffle=True,
                                    seed=cfg["seed"] * 100_003 + epoch, device=device,
                                    drop_last=len(train_set) > cfg["batch_size"])
        for i, (x, y) in enumerate(batches):
            if i >= steps_per_epoch:
                break
            apply_lr_schedule(optimizer, cosine_warmup_factor(
                step, total_steps=total_steps, warmup_steps=warmup_steps))
            if start == 0:
                x = preprocess(x, resolution=resolution, mean=model.mean, std=model.std,
                               augment=cfg["augment"], generator=gen)
            if device.type == "cuda" and cfg["channels_last"] and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, cfg["amp"]):
                loss = F.cross_entropy(forward(x).float(), y,
                                       label_smoothing=cfg["label_smoothing"])
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
                                   batch_size=cfg["eval_batch_size"], device=device,
                                   amp=cfg["amp"], start=start))
        result[M.SAMPLES_PER_S] = seen / train_seconds if train_seconds > 0 else 0.0
        result[M.SECONDS] = time.perf_counter() - t0
        result[M.PEAK_RSS_MB] = _peak_rss_mb()
        result[M.PEAK_GPU_MB] = _peak_gpu_mb(device)
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
    _freeze_long_lived_objects()
    assigned = ray.get_runtime_context().get_assigned_resources()
    cpus = assigned.get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    device = _ray_trial_device(str(config.get("device", TRIAL_DEFAULTS["device"])),
                               assigned_gpus=float(assigned.get("GPU", 0)))
    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint_state(directory)

    node_id = ray.get_runtime_context().get_node_id()

    def report(result: dict[str, Any], checkpoint_state: dict[str, Any]) -> None:
        result = {**result, "node_id": node_id}
        with tempfile.TemporaryDirectory() as directory:
            torch.save(checkpoint_state, Path(directory) / CHECKPOINT_FILE)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))

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
    except Exception as err:  # noqa: BLE001 - re-raised below, as text, once memory is freed
        failure = _failure_text(err)
    state = None
    _release_memory(compiled=bool(config.get("compile")))
    if failure is not None:
        raise TrialError(failure)
    if stopped:
        sys.exit(0)  # what Tune expects of a trial it stopped


class TrialError(RuntimeError):
    """A trial's failure, carried as text so the failed trial's tensors can be freed first."""


def _failure_text(err: BaseException) -> str:
    text = "".join(traceback.format_exception(err)).rstrip()
    if isinstance(err, torch.OutOfMemoryError):
        text += ("\nOutOfMemoryError: CUDA out of memory; lower train.batch_size or "
                 "resolution, or give each trial a larger GPU share (resources.gpu)")
    # The last line is the one the results' `error` column puts first.
    return text
