"""A reused Ray actor releases each trial's model and optimizer before the next trial."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.common import loopback_only
from search.config import parse_config
from search.tuner import build_tuner
from trainables import metrics as M

pytestmark = pytest.mark.slow

TRIALS = 6
# ResNet-50 (25M parameters: ~100 MB of weights, as much again of gradients and of SGD
# momentum) at 32 px for a step or two: a trial that kept the previous one alive adds ~300 MB.
CONFIG = {
    "name": "reuse",
    "seed": 0,
    "data": {"source": "digits", "samples_per_class": 4, "val_fraction": 0.05},
    "train": {"backbone": "resnet50", "weights": "none", "resolution": 32, "epochs": 2,
              "batch_size": 8, "max_steps_per_epoch": 1, "eval_batch_size": 128},
    "space": {"lr": {"type": "loguniform", "low": 0.001, "high": 0.1}},
    # val_loss rather than top-1 (at chance after a step or two) so ASHA has no ties to keep
    "search": {"algorithm": "random", "num_samples": TRIALS, "max_concurrent": 1,
               "objectives": [{"metric": "val_loss", "mode": "min"}]},
    # ASHA stops some trials after epoch 1: the stop path (SystemExit in report) releases too.
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpu": 1},
}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    loopback_only()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             log_to_driver=False, configure_logging=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield
    ray.shutdown()


def test_reused_actor_memory_does_not_grow_with_trials(local_ray, tmp_path):
    cfg = parse_config({**CONFIG, "storage": str(tmp_path)})
    results = build_tuner(cfg).fit()
    assert not results.errors
    # experiment tags start with the trial's number; one trial at a time, that is run order
    ordered = sorted((r.metrics for r in results),
                     key=lambda m: int(m["experiment_tag"].split("_")[0]))
    assert len(ordered) == TRIALS
    assert len({m["pid"] for m in ordered}) == 1  # one actor ran every trial
    assert any(m[M.EPOCH] == 1 for m in ordered)  # some were stopped early
    peaks = [m[M.PEAK_RSS_MB] for m in ordered]
    # Trial 1 pays one-off costs (imports, the decoded data); from trial 2 on the peak of each
    # trial is the same process state plus one trial: flat, not +300 MB per trial. The median
    # of the later trials, because single peaks scatter by up to ~60 MB either way with the
    # allocator's state (channels_last copies of the weights on CPU): a leak grows with every
    # trial (+300, +600, ... MB), which the median shows and one scattered peak does not.
    assert statistics.median(peaks[2:]) - peaks[1] < 60, peaks
