"""A search on a multi-node Ray cluster: GPU packing, a node lost mid-training, shared storage.

The cluster is ``ray.cluster_utils.Cluster`` on this machine, every node on
127.0.0.1: a head without GPUs and a worker node that declares one GPU. There
is no CUDA here, so trials scheduled on the "GPU" node fall back to CPU with a
warning, which is itself part of what is tested.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from search.config import parse_config
from search.storage import shared_storage, storage_filesystem
from search.store import EPOCHS_FILE, ResultsStore
from tests.conftest import FTSEARCH, ROOT, ftsearch_env, write_config
from trainables import metrics as M
from trainables.finetune import run_trial
from trainables.runtime import ray_trial_device

EPOCHS = 5
# Two 0.5-GPU trials fit on the node's one GPU; its 4 CPUs would allow four.
GPU_NODE = {"num_cpus": 4, "num_gpus": 1}
SEARCH = {
    "name": "gpu",
    "seed": 0,
    # ~3 s epochs: long enough to lose a node while two trials are mid-training.
    "data": {"source": "digits", "samples_per_class": 30, "val_fraction": 0.2},
    "train": {"backbone": "resnet18", "resolution": 32, "epochs": EPOCHS, "batch_size": 16,
              "max_steps_per_epoch": 15, "eval_batch_size": 512},
    "space": {"lr": {"type": "loguniform", "low": 0.001, "high": 0.1}},
    "search": {"algorithm": "random", "num_samples": 4},
    "scheduler": {"type": "none"},
    "resources": {"cpu": 1, "gpu": 0.5},
    "failure": {"max_failures": 3},
}


# --- storage rules, no Ray
def _cfg(tmp_path: Path, **patch: object):
    raw = {**SEARCH, "storage": str(tmp_path / "runs"), **patch}
    return parse_config(raw)


def test_storage_filesystem_reads_the_mount_table(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "overlay / overlay rw 0 0\n"
        "fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0\n"
        "/dev/sdb1 /mnt/shared/local\\040disk ext4 rw 0 0\n"
    )
    assert storage_filesystem("/mnt/shared/runs", mounts=str(mounts)) == "nfs4"
    assert storage_filesystem("/mnt/shared", mounts=str(mounts)) == "nfs4"
    # the longest mount point wins, with /proc/mounts' octal escapes decoded
    assert storage_filesystem("/mnt/shared/local disk/runs", mounts=str(mounts)) == "ext4"
    assert storage_filesystem("/mnt/sharedx", mounts=str(mounts)) == "overlay"
    assert storage_filesystem("/x", mounts=str(tmp_path / "missing")) is None


def test_shared_storage_uri_network_mount_or_declared(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nnas:/export {tmp_path}/nfs nfs rw 0 0\n")
    (tmp_path / "nfs").mkdir()
    local = _cfg(tmp_path)
    def shared(cfg):
        return shared_storage(cfg.storage, declared=cfg.storage_shared, mounts=str(mounts))

    assert shared(local) is None
    assert "nfs" in shared(_cfg(tmp_path, storage=str(tmp_path / "nfs" / "runs")))
    assert "storage_shared" in shared(_cfg(tmp_path, storage_shared=True))
    assert shared(_cfg(tmp_path, storage="s3://bucket/runs"))


def test_fractional_gpu_above_one_is_refused_with_the_field(tmp_path, capsys):
    from search.cli import main

    config = write_config(tmp_path / "c.yaml", {**SEARCH, "storage": str(tmp_path),
                                                "resources": {"cpu": 1, "gpu": 1.5}})
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftsearch: resources.gpu:")
    assert "fraction of one GPU" in err[0] and "whole number" in err[0]


# --- the trial's side
def test_a_gpu_share_without_cuda_warns_and_trains_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"assigned this trial 0.5 GPU.*no usable CUDA"):
        assert ray_trial_device("auto", assigned_gpus=0.5) == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GPU asked for: CPU, silently
        assert ray_trial_device("auto", assigned_gpus=0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ray_trial_device("auto", assigned_gpus=0.5) == "cuda"
    # a trial without a GPU share never takes a visible GPU
    assert ray_trial_device("auto", assigned_gpus=0) == "cpu"
    assert ray_trial_device("cpu", assigned_gpus=1) == "cpu"


def test_resumed_from_lands_in_epochs_parquet(tmp_path):
    trial = {"backbone": "resnet18", "resolution": 32, "epochs": 2, "batch_size": 16,
             "max_steps_per_epoch": 2, "data": {"source": "digits", "samples_per_class": 8}}
    store = ResultsStore(str(tmp_path), param_types={}, max_epochs=2)
    states = []

    def record(result, state):
        store.record_result("t1", {}, result)
        states.append(state)

    run_trial(trial, report=record)  # a fresh run: epochs 1 and 2, resumed_from 0
    run_trial(trial, report=lambda r, s: store.record_result("t1", {}, r), state=states[0])
    store.write()
    table = pq.read_table(tmp_path / EPOCHS_FILE)
    assert table.schema.field(M.RESUMED_FROM).type == pa.int64()
    rows = table.to_pandas().set_index("epoch")[M.RESUMED_FROM].to_dict()
    # epoch 2, rerun from the epoch-1 checkpoint, replaced the fresh run's row
    assert rows == {1: 0, 2: 1}


# --- a real multi-node cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_args(temp: str) -> dict:
    # Every node on loopback, with its own free ports: other Ray instances may run here.
    return {"node_ip_address": "127.0.0.1", "temp_dir": temp,
            "dashboard_agent_listen_port": _free_port(), "metrics_export_port": _free_port(),
            "runtime_env_agent_port": _free_port()}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Short: Ray's Unix sockets live under it. RAY_TMPDIR keeps the cluster's address
    # file private, so no other test's ray.init() finds this cluster.
    temp = tempfile.mkdtemp(prefix="ftc", dir="/tmp")
    Path(temp, "ray").mkdir()  # where the address file goes
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_TMPDIR", temp)
    patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    patch.setenv("RAY_AUTH_MODE", "disabled")  # token auth is covered by test_jobs
    c = Cluster(initialize_head=True, head_node_args={
        **_node_args(temp), "num_cpus": 1, "include_dashboard": False,
        "gcs_server_port": _free_port()})
    try:
        gpu_node = c.add_node(**_node_args(temp), **GPU_NODE)
        yield c, temp, gpu_node
    finally:
        c.shutdown()
        patch.undo()
        shutil.rmtree(temp, ignore_errors=True)


def _read(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    try:
        return (pd.read_parquet(directory / "trials.parquet"),
                pd.read_parquet(directory / "epochs.parquet"))
    except (FileNotFoundError, OSError, ValueError):
        return None


@pytest.mark.slow
def test_node_local_storage_is_refused_on_a_multi_node_cluster(cluster, tmp_path):
    c, _, _ = cluster
    config = write_config(tmp_path / "local.yaml", {**SEARCH, "storage": str(tmp_path / "runs")})
    started = time.monotonic()
    proc = subprocess.run([*FTSEARCH, "run", str(config), "--address", c.address], cwd=ROOT,
                          env=ftsearch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    problem = [ln for ln in proc.stderr.splitlines() if ln.startswith("ftsearch: storage:")]
    assert len(problem) == 1 and "node-local" in problem[0] and "2 nodes" in problem[0]
    assert "storage_shared: true" in problem[0] and "s3://" in problem[0]
    assert not (tmp_path / "runs" / "gpu").exists()  # refused before anything was written
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_gpu_trials_pack_two_per_gpu_and_survive_losing_their_node(cluster, tmp_path):
    c, temp, gpu_node = cluster
    # All nodes share this machine's disk: a local path is shared storage, declared so.
    config = write_config(tmp_path / "gpu.yaml", {**SEARCH, "storage": str(tmp_path / "runs"),
                                                  "storage_shared": True})
    directory = tmp_path / "runs" / "gpu"
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([*FTSEARCH, "run", str(config), "--address", c.address],
                                  cwd=ROOT, env=ftsearch_env(), stdout=out,
                                  stderr=subprocess.STDOUT)
    gpu_nodes = {gpu_node.node_id}
    most_at_once = 0  # trials RUNNING on one GPU node at the same moment

    def poll() -> dict[str, int] | None:
        nonlocal most_at_once
        tables = _read(directory)
        if tables is None:
            return None
        trials, epochs = tables
        running = trials[(trials.status == "RUNNING") & trials.node.isin(gpu_nodes)]
        most_at_once = max([most_at_once, *running.node.value_counts().tolist()])
        done = epochs.groupby("trial_id").epoch.max()
        here = running[running.node == gpu_node.node_id]
        return {t: int(done[t]) for t in here.trial_id if t in done and done[t] >= 1}

    try:
        # Lose the GPU node while trials are mid-training on it, each with a checkpoint and
        # epochs to go: two if both run there, else one (on 2 busy cores Ray may start the
        # second trial's worker late), so the test waits for the pair only while it can.
        interrupted: dict[str, int] = {}
        deadline = time.monotonic() + 150
        while not interrupted and time.monotonic() < deadline:
            assert driver.poll() is None, log.read_text()[-3000:]
            ready = {t: n for t, n in (poll() or {}).items() if n <= EPOCHS - 2}
            if len(ready) == 2 or any(n == EPOCHS - 2 for n in ready.values()):
                interrupted = ready
            time.sleep(0.3)
        assert interrupted, "no trial was mid-training on the GPU node:\n" + \
            log.read_text()[-3000:]
        c.remove_node(gpu_node)
        replacement = c.add_node(**_node_args(temp), **GPU_NODE)
        gpu_nodes.add(replacement.node_id)
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline:
            poll()
            time.sleep(0.3)
        driver.wait(timeout=5)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    output = log.read_text()
    assert driver.returncode == 0, output[-4000:]

    trials, epochs = _read(directory)
    # every trial exactly once, finished, every epoch exactly once
    assert len(trials) == SEARCH["search"]["num_samples"] and trials.trial_id.is_unique
    assert set(trials.status) == {"TERMINATED"}, trials[["trial_id", "status", "error"]]
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert (epochs.groupby("trial_id").epoch.apply(sorted).map(list)
            == [list(range(1, EPOCHS + 1))] * len(trials)).all()
    # trials ran on GPU nodes only, two at a time on one GPU (never more: 0.5 GPU each)
    assert most_at_once == 2, output[-3000:]
    assert set(trials.node) <= {gpu_node.node_id, replacement.node_id}
    # The trials seen mid-training were restored, and so may be one more that reported its
    # first checkpoint between the last look and the node's removal: restored is what
    # resumed_from says, and it holds every trial seen.
    restored_from = epochs.groupby("trial_id").resumed_from.max()
    restored = set(restored_from[restored_from > 0].index)
    assert set(interrupted) <= restored, (interrupted, restored_from.to_dict())
    assert len(restored) <= 2  # only the two trials on the lost node had anything to restore
    by_id = trials.set_index("trial_id")
    assert (by_id.loc[sorted(restored), "node"] == replacement.node_id).all()
    # the restored trials continued from their last checkpoint, not from epoch 0
    for trial_id in restored:
        rows = epochs[epochs.trial_id == trial_id].set_index("epoch").resumed_from
        checkpoint = int(rows.max())
        assert checkpoint >= interrupted.get(trial_id, 1), (trial_id, rows.to_dict())
        assert (rows[rows.index <= checkpoint] == 0).all(), rows.to_dict()
        assert (rows[rows.index > checkpoint] == checkpoint).all(), rows.to_dict()
        # Tune's own log keeps every report, replaced ones too: the first run got as far as
        # the checkpoint it was restored from, not further (the latest one was used).
        log_file, = directory.glob(f"tune_trainable_{trial_id}_*/result.json")
        reports = [json.loads(line) for line in log_file.read_text().splitlines() if line]
        first_run = [r[M.EPOCH] for r in reports if r.get(M.RESUMED_FROM) == 0]
        assert max(first_run) == checkpoint, (trial_id, first_run, checkpoint)
    # no CUDA on the "GPU" node: the trials said so and trained on CPU
    assert "no usable CUDA device" in output
    assert (epochs.peak_gpu_mb == 0).all()
