"""What only a GPU can show (skipped without CUDA; `make bench-gpu` measures the same).

bf16 + channels_last against fp32 on a digits trial; the frozen-stage cache on CUDA against
the uncached trial; GPU memory of trials in one reused actor.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_channels_last_trial_is_within_a_point_of_fp32():
    from benchmarks.device.gpu_checks import AMP_TOLERANCE, amp_vs_fp32

    out = amp_vs_fp32(seeds=(0,))
    assert out["max_abs_diff"] <= AMP_TOLERANCE, out["seeds"]


def test_frozen_cache_on_cuda_matches_the_uncached_trial():
    from benchmarks.frozen_cache import GPU_METRIC_TOLERANCE, measure_gpu

    for r in measure_gpu(smoke=True):
        assert r["max_top1_diff"] <= GPU_METRIC_TOLERANCE, r


@pytest.mark.slow
def test_reused_actor_gpu_memory_does_not_grow():
    from benchmarks.common import stop_ray
    from benchmarks.device.gpu_checks import reused_actor_gpu_memory

    try:
        out = reused_actor_gpu_memory(trials=3)
    finally:
        stop_ray()
    assert out["status"] == "PASS", out
