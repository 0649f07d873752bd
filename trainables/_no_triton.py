"""Keep triton out of processes that have no GPU.

torchvision (through ``torch._dynamo``) and ``torch.utils.flop_counter`` import triton
whenever it is installed, as it is with every CUDA build of torch. Without a GPU it does
nothing for a trial, yet its nanobind extension prints ~50 ``leaked ...`` lines when each
process exits, burying a search's summary. Marking the module as absent before torch is
imported is the import system's own way to say "not installed"; torch then runs exactly
as it does where triton is missing (torch.compile on CPU uses its C++ backend).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

__all__ = ["keep_triton_out"]

# Device nodes of the GPUs triton can drive (NVIDIA, AMD ROCm).
_GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")


class _DropTritonNotFound(logging.Filter):
    # flop_counter warns once that it cannot count triton kernels; there are none to count.
    def filter(self, record: logging.LogRecord) -> bool:
        return "triton not found" not in record.getMessage()


def _no_gpu() -> bool:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return True  # Ray hides every GPU from a trial that reserved none
    return sys.platform.startswith("linux") and not any(Path(d).exists() for d in _GPU_DEVICES)


def keep_triton_out() -> None:
    """Marks triton as not installed in this process when it has no GPU (before torch loads)."""
    if "triton" in sys.modules or not _no_gpu():
        return
    sys.modules["triton"] = None  # type: ignore[assignment]
    logging.getLogger("torch.utils.flop_counter").addFilter(_DropTritonNotFound())
