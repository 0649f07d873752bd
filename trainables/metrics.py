"""Metric names shared by the trial, the scheduler and the results writer.

One place, so a renamed metric cannot silently leave the scheduler watching
a key that no longer exists (syne-tune's ``report.py`` does the same).
"""

from __future__ import annotations

__all__ = [
    "COMPLETE",
    "DIVERGED",
    "EPOCH",
    "EPOCH_METRICS",
    "GMACS",
    "HSCORE",
    "LOGME",
    "LR",
    "PARAMS",
    "PEAK_GPU_MB",
    "PEAK_RSS_MB",
    "RESUMED_FROM",
    "SAMPLES_PER_S",
    "SECONDS",
    "SETUP_FAILURE",
    "TOP1",
    "TOP5",
    "TRANSFER_SCORES",
    "TRAIN_LOSS",
    "VAL_LOSS",
]

EPOCH = "epoch"  # 1-based; the scheduler's time unit
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
TOP1 = "top1"  # validation top-1 accuracy, percent
TOP5 = "top5"  # validation top-5 accuracy, percent (top-k with k = min(5, classes))
LR = "lr"  # head learning rate at the end of the epoch
SAMPLES_PER_S = "samples_per_s"  # training images per second in the epoch
SECONDS = "seconds"  # wall time of the epoch (train + validation)
PARAMS = "params"
GMACS = "gmacs"  # multiply-adds per image at the trial's resolution, in billions
DIVERGED = "diverged"  # True in the last report of a trial whose loss went NaN/inf
# True in a report after which the trial has nothing left to train although it ran fewer
# epochs than the search's (a classical head is fitted in one go, reported as epoch 1): it
# ended TERMINATED, and schedulers treat it as complete rather than stopping or awaiting it.
COMPLETE = "complete"
PEAK_RSS_MB = "peak_rss_mb"
PEAK_GPU_MB = "peak_gpu_mb"
# Epoch of the checkpoint the trial run restored (0: started fresh): evidence that a
# retried or resumed trial continued from its checkpoint instead of from scratch.
RESUMED_FROM = "resumed_from"

# Name of the exception a trial raises when it fails in setup (weights or data that cannot
# load): the driver stops the search on it (search.callback.FailFast), and the summary
# reads it in trials.parquet's `error` column. trainables.runtime.TrialSetupError has it.
SETUP_FAILURE = "TrialSetupError"

# Keys that epochs.parquet records for every reported epoch.
EPOCH_METRICS = (
    EPOCH, TRAIN_LOSS, VAL_LOSS, TOP1, TOP5, LR, SAMPLES_PER_S, SECONDS, PEAK_RSS_MB, PEAK_GPU_MB,
    RESUMED_FROM,
)

# Transferability scores of frozen stage features (trainables/transferability.py), higher is
# better; the first ranks the (backbone, depth) cells of transferability.parquet.
LOGME = "logme"
HSCORE = "hscore"
TRANSFER_SCORES = (LOGME, HSCORE)
