"""What a trial needs of its process: a device, peak memory, memory release, failure text.

Kept apart from the training loop (:mod:`trainables.finetune`) so that the loop reads top
to bottom; everything here is about the process and the hardware, not about learning.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
import traceback
import warnings
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "TrialError",
    "TrialSetupError",
    "autocast",
    "failure_text",
    "freeze_long_lived_objects",
    "peak_gpu_mb",
    "peak_rss_mb",
    "pick_device",
    "place_model",
    "ray_trial_device",
    "release_memory",
    "reset_peak_memory",
]


class TrialError(RuntimeError):
    """A trial's failure, carried as text so the failed trial's tensors can be freed first."""


class TrialSetupError(TrialError):
    """A failure before the first step that every trial of the same kind would repeat.

    Weights that cannot load, data that cannot load, parameters only a worker can check:
    retrying the trial, or running the next one, ends the same way. The driver stops the
    search on the first one instead of retrying every trial (:mod:`search.callback`).
    """


def pick_device(requested: str) -> torch.device:
    """``auto`` is CUDA when visible; ``cuda`` without a device warns and runs on the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        warnings.warn("device=cuda was requested but no usable CUDA device is visible on this "
                      "node: the trial runs on CPU", RuntimeWarning, stacklevel=2)
    return torch.device("cpu")


def ray_trial_device(requested: str, *, assigned_gpus: float) -> str:
    """The device of a Ray trial: CUDA only where Ray assigned it a GPU share."""
    if requested != "auto":
        return requested  # an explicit device wins; pick_device warns if CUDA is missing
    if assigned_gpus <= 0:
        # No GPU reserved: taking a visible GPU anyway would collide with trials that did.
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    warnings.warn(f"Ray assigned this trial {assigned_gpus:g} GPU, but its node has no usable "
                  f"CUDA device (torch.cuda.is_available() is False): the trial runs on CPU",
                  RuntimeWarning, stacklevel=2)
    return "cpu"


def place_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool
                ) -> torch.nn.Module:
    """``model`` on ``device``, its weights NHWC when ``channels_last`` (any device: on CPU,
    oneDNN's channels-last kernels train Lite0 1.65x as fast; BENCHMARKS.md). Every path
    that runs a trial's stages places the model here, so the frozen-stage cache holds the
    same numbers whichever of them computed it."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; nothing elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    """Starts the trial's peak-memory window, so a reused actor's earlier trials do not count."""
    with contextlib.suppress(OSError):
        # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS.
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_mb() -> float:
    """Peak RSS since :func:`reset_peak_memory` (Linux); elsewhere the process's peak."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_gpu_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since :func:`reset_peak_memory`; 0 on the CPU."""
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / (1024 * 1024)


@lru_cache(maxsize=1)
def freeze_long_lived_objects() -> None:
    """Leaves the modules loaded so far out of every later garbage collection (once a process).

    torch, Ray and their modules are ~500k long-lived objects; a full ``gc.collect()`` over
    them costs about half a second per trial. Frozen, they are skipped, and later
    collections see only what trials allocate.
    """
    gc.collect()
    gc.freeze()


def release_memory(*, compiled: bool) -> None:
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


def failure_text(err: BaseException) -> str:
    """The traceback as text, its last line naming the exception (the `error` column's first)."""
    text = "".join(traceback.format_exception(err)).rstrip()
    if isinstance(err, torch.OutOfMemoryError):
        text += ("\nOutOfMemoryError: CUDA out of memory; lower train.batch_size or "
                 "resolution, or give each trial a larger GPU share (resources.gpu)")
    return text
