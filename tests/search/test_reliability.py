"""Failures inside a search stay inside their trial; readers never see a partial file."""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time

import optuna
import pandas as pd
import psutil
import pytest

from search.config import parse_config
from search.tuner import build_searcher
from tests.conftest import FTSEARCH, ROOT, TINY, ftsearch_env, write_config

pytestmark = pytest.mark.slow


def _listening_addresses(pid: int) -> set[str]:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add(conn.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_diverging_and_crashing_trials_do_not_sink_the_search(tmp_path):
    # AlexNet's last max-pool has nothing to pool at 32 px, ResNet-18's does: a crash of
    # those configurations only (weights and data problems are refused before Ray starts,
    # or stop the search).
    cfg = {**TINY, "name": "faults", "storage": str(tmp_path / "runs"),
           "train": {**{k: v for k, v in TINY["train"].items() if k != "weights"},
                     "resolution": 32},
           "space": {"backbone": {"type": "choice", "values": ["resnet18", "alexnet"]},
                     "lr": {"type": "choice", "values": [0.01, 1.0e12]}},
           "search": {"algorithm": "grid", "max_concurrent": 2},
           "scheduler": {"type": "none"}, "failure": {"max_failures": 0}}
    config = write_config(tmp_path / "faults.yaml", cfg)
    directory = tmp_path / "runs" / "faults"

    reads, failures, stop = [0], [], threading.Event()

    def poll() -> None:
        # A reader polling during the run must never see a partial file.
        while not stop.is_set():
            for name in ("trials.parquet", "epochs.parquet"):
                path = directory / name
                if path.exists():
                    try:
                        # One open per read: pandas/pyarrow given a *path* open it twice
                        # (footer, then pages), which can straddle an atomic replace.
                        with open(path, "rb") as handle:
                            pd.read_parquet(handle)
                        reads[0] += 1
                    except FileNotFoundError:
                        pass  # not written yet
                    except Exception as err:  # noqa: BLE001 - any other failure is the bug
                        failures.append(repr(err))
            time.sleep(0.02)

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    proc = subprocess.Popen([*FTSEARCH, "run", str(config)], cwd=ROOT, env=ftsearch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    addresses: set[str] = set()
    while proc.poll() is None:
        addresses |= _listening_addresses(proc.pid)
        time.sleep(1.0)
    out, err = proc.communicate()
    stop.set()
    reader.join()

    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert not failures, failures[:3]
    assert reads[0] > 10
    # Ray (GCS, raylet, dashboard agent, workers) listened on loopback only
    assert addresses, "no listening socket seen"
    assert all(_is_loopback(ip) for ip in addresses), addresses

    trials = pd.read_parquet(directory / "trials.parquet")
    by = {(r["config.lr"], r["config.backbone"]): r for _, r in trials.iterrows()}
    assert len(trials) == 4
    assert by[(0.01, "resnet18")]["status"] == "TERMINATED"
    assert by[(1.0e12, "resnet18")]["status"] == "DIVERGED"
    for lr in (0.01, 1.0e12):
        failed = by[(lr, "alexnet")]
        assert failed["status"] == "ERROR"
        assert "too small" in failed["error"]
    assert "1 diverged" in out and "2 errored" in out


def test_diverged_trial_is_reported_to_optuna_as_failed(tmp_path):
    cfg = parse_config({"name": "d", "storage": str(tmp_path),
                        "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1.0}}})
    searcher = build_searcher(cfg)
    searcher.set_search_properties("top1", "max", {})
    searcher.suggest("t1")
    searcher.suggest("t2")
    searcher.on_trial_complete("t1", result={"top1": 12.0, "diverged": True})
    searcher.on_trial_complete("t2", result={"top1": 80.0, "diverged": False})
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
