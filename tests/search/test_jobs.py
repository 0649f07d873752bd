"""`ftsearch submit` / `ftsearch jobs` against a real single-node Ray cluster with token auth.

The cluster is `ray start --head --block` on 127.0.0.1 with its own ports and
temp dir, in its own process group, ended by signals to that group.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from search.jobs import EXCLUDES, _excluded, _read_token, build_runtime_env, project_root
from tests.conftest import FTSEARCH, ROOT, ftsearch_env, is_loopback, write_config

VENV_BIN = Path(sys.executable).parent
TINY = {
    "name": "jobtiny",
    "seed": 0,
    "data": {"source": "digits", "samples_per_class": 10, "val_fraction": 0.2},
    "train": {"backbone": "resnet18", "resolution": 32, "epochs": 2, "batch_size": 32,
              "max_steps_per_epoch": 2, "eval_batch_size": 512},
    "space": {"lr": {"type": "loguniform", "low": 0.001, "high": 0.1}},
    "search": {"num_samples": 2, "max_concurrent": 2},
    "scheduler": {"type": "none"},
    "resources": {"cpu": 1},
}
# Paths a project directory may hold that must never reach the cluster.
DECOYS = ["runs/old/trials.parquet", ".venv/bin/python", ".git/HEAD", "data/train/a.png",
          "datasets/x.bin", ".env", "configs/.env.local", "certs/server.pem", "deploy.key",
          "id_rsa", ".aws/credentials", "search/__pycache__/cli.cpython-311.pyc"]


def _ftsearch(*args: str, env: dict[str, str] | None = None, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    return subprocess.run([*FTSEARCH, *args], cwd=ROOT, env=env or ftsearch_env(),
                          capture_output=True, text=True, timeout=timeout)


def _project(tmp_path: Path, config: dict) -> Path:
    """A copy of the project with a config and every kind of path that must stay home."""
    root = tmp_path / "project"
    for package in ("search", "trainables"):
        shutil.copytree(ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    (root / "configs").mkdir()
    write_config(root / "configs" / "tiny.yaml", config)
    for decoy in DECOYS:
        (root / decoy).parent.mkdir(parents=True, exist_ok=True)
        (root / decoy).write_text("must not be uploaded\n")
    return root


def _leaked(package: Path) -> list[str]:
    """Paths in an unpacked package that one of the exclusion rules should have kept out."""
    folders = {"runs", ".venv", ".git", "data", "datasets", ".aws", "__pycache__"}
    leaked = []
    for path in package.rglob("*"):
        parts = path.relative_to(package).parts
        if folders & set(parts) or any(
                p.startswith((".env", "id_rsa")) or p.endswith((".pem", ".key")) for p in parts):
            leaked.append("/".join(parts))
    return leaked


# --- no cluster needed
def test_default_upload_is_the_project_without_the_excluded_paths(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = build_runtime_env(project_root())
    assert env["working_dir"] == str(ROOT)
    for must in ("runs", ".venv", ".git", "data", ".env", "*.pem", "*.key"):
        assert must in env["excludes"]
    # Ray's own packager, given these excludes, leaves every decoy out.
    root = _project(tmp_path, {**TINY, "storage": str(tmp_path / "results")})
    package = tmp_path / "pkg.zip"
    create_package(str(root), package, include_gitignore=True, excludes=list(EXCLUDES))
    shutil.unpack_archive(package, tmp_path / "unpacked")
    unpacked = tmp_path / "unpacked"
    assert (unpacked / "search" / "cli.py").exists()
    assert (unpacked / "configs" / "tiny.yaml").exists()
    assert _leaked(unpacked) == []


def test_excluded_matches_folders_and_credential_names():
    from pathlib import PurePosixPath

    for rel in ("runs/x/trials.parquet", "data/a.png", ".env", "keys/server.pem", "a.key",
                "sub/.venv/bin/python"):
        assert _excluded(PurePosixPath(rel), EXCLUDES), rel
    for rel in ("configs/demo.yaml", "search/cli.py", "trainables/data.py"):
        assert not _excluded(PurePosixPath(rel), EXCLUDES), rel


def test_token_comes_from_env_then_path_then_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "tok"
    named.write_text("from-path")
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert _read_token()[0] == "from-home"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert _read_token() == ("from-path", "RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert _read_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert _read_token()[0] is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(capsys, *args: str) -> tuple[int, str, str]:
    from search.cli import main

    code = main(["submit", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("patch", "field", "hint"), [
    ({"search": {"num_samples": 0}}, "search.num_samples", "greater than or equal to 1"),
    ({"scheduler": {"type": "fifo"}}, "scheduler.type", "asha"),
    ({"storage": "./runs"}, "storage", "absolute"),
    ({"resources": {"cpu": 1, "gpu": 2.5}}, "resources.gpu", "whole number"),
])
def test_bad_submission_exits_2_before_contacting_the_cluster(tmp_path, capsys, patch, field,
                                                              hint):
    root = _project(tmp_path, {**TINY, "storage": "/mnt/shared/ftsearch", **patch})
    # Nothing listens there: a submission that got as far as the cluster would say so.
    code, out, err = _submit(capsys, str(root / "configs" / "tiny.yaml"), "--working-dir",
                             str(root), "--address", f"http://127.0.0.1:{_closed_port()}")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ftsearch: {field}") and hint in lines[0]
    assert out == ""


def test_submission_paths_are_checked_here(tmp_path, capsys, monkeypatch):
    root = _project(tmp_path, {**TINY, "storage": "/mnt/shared/ftsearch"})
    address = f"http://127.0.0.1:{_closed_port()}"
    outside = write_config(tmp_path / "elsewhere.yaml", {**TINY, "storage": "/mnt/x"})
    code, _, err = _submit(capsys, str(outside), "--working-dir", str(root), "--address", address)
    assert code == 2 and "outside" in err and "--working-dir" in err
    hidden = write_config(root / "data" / "hidden.yaml", {**TINY, "storage": "/mnt/x"})
    code, _, err = _submit(capsys, str(hidden), "--working-dir", str(root), "--address", address)
    assert code == 2 and "never uploaded" in err
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = _submit(capsys, str(root / "configs" / "tiny.yaml"), "--working-dir",
                           str(root))
    assert code == 2 and err.startswith("ftsearch: --address")
    # storage and data paths name the cluster's disks: they need not exist here
    far = write_config(root / "configs" / "far.yaml", {
        **TINY, "storage": "/nonexistent/shared/runs",
        "data": {"source": "imagefolder", "path": "/nonexistent/shared/images"}})
    code, _, err = _submit(capsys, str(far), "--working-dir", str(root), "--address", address)
    assert code == 1 and "cannot reach the Ray dashboard" in err
    # a data folder in the project would never reach the cluster
    code, _, err = _submit(capsys, str(far), "--working-dir", str(root), "--address", address,
                           "--set", "data.path=./images")
    assert code == 2 and err.startswith("ftsearch: data.path: './images'")


# --- a real cluster
def _free_port() -> int:
    return _closed_port()


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated single-node Ray on loopback: (dashboard URL, token, temp dir)."""
    temp = Path(tempfile.mkdtemp(prefix="ftj", dir="/tmp"))  # short: Unix socket paths
    token = secrets.token_hex(24)
    dashboard = _free_port()
    env = {**ftsearch_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # This cluster stands in for a user's; here it must stay on loopback. Without
           # this, `ray start` on Linux rewrites --node-ip-address=127.0.0.1 to the machine's
           # own address (ray._private.services.resolve_ip_for_localhost) and its GCS,
           # raylet and agents listen and talk there (seen: 192.0.2.2). A single-node head is
           # all this test needs; a worker node could not join with it.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # the job's entrypoint (`python`, `ftsearch`) resolves to this environment
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    ports = {flag: _free_port() for flag in (
        "--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
        "--node-manager-port", "--object-manager-port")}
    args = [str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--num-cpus=2",
            "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats",
            "--min-worker-port=0", "--max-worker-port=0",
            *(f"{flag}={port}" for flag, port in ports.items())]
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group, ended below
    url = f"http://127.0.0.1:{dashboard}"
    watch = _ListenWatch(head.pid)
    try:
        _wait_ready(url, token, head, temp)
        watch.start()
        yield url, token, temp
        watch.stop()
        # Everything the cluster and its jobs started listened on loopback only (and the
        # watch saw Ray's servers, or it proved nothing).
        assert len({name for name, _, _ in watch.seen}) >= 3, watch.seen
        public = sorted(entry for entry in watch.seen if not is_loopback(entry[1]))
        assert not public, public
    finally:
        watch.stop()
        _end_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


class _ListenWatch(threading.Thread):
    """Records, every half second, the listening sockets of a process group's processes:
    (name, ip, port)."""

    def __init__(self, group: int) -> None:
        super().__init__(daemon=True)
        self.group, self.seen = group, set()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.5):
            for conn in psutil.net_connections(kind="inet"):
                if conn.status != psutil.CONN_LISTEN or conn.pid is None:
                    continue
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    if os.getpgid(conn.pid) == self.group:
                        self.seen.add((psutil.Process(conn.pid).name(), conn.laddr.ip,
                                       conn.laddr.port))

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(timeout=10)


def _wait_ready(url: str, token: str, head: subprocess.Popen, temp: Path) -> None:
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError("ray start failed:\n" + (temp / "head.log").read_text()[-3000:])
        try:
            r = requests.get(f"{url}/api/jobs/", timeout=5,
                             headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("the Ray dashboard did not come up:\n"
                       + (temp / "head.log").read_text()[-3000:])


def _end_group(head: subprocess.Popen) -> None:
    # `ray start --block` stops its children on SIGTERM; whatever is left after the
    # pause goes with SIGKILL to the same process group (never `ray stop`: other Rays run).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


def _client_env(token: str) -> dict[str, str]:
    env = ftsearch_env()
    env["RAY_AUTH_TOKEN"] = token
    for var in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    return env


def _package_dir(url: str, token: str, temp: Path, job_id: str) -> Path:
    """The job's working_dir as the cluster unpacked it."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    uri = client.get_job_info(job_id).runtime_env["working_dir"]  # gcs://_ray_pkg_<hash>.zip
    name = uri.rsplit("/", 1)[-1].removesuffix(".zip")
    return temp / "session_latest" / "runtime_resources" / "working_dir_files" / name


def _assert_complete(directory: Path, trials_expected: int, epochs: int) -> None:
    trials = pd.read_parquet(directory / "trials.parquet")
    rows = pd.read_parquet(directory / "epochs.parquet")
    assert len(trials) == trials_expected and trials.trial_id.is_unique
    assert set(trials.status) == {"TERMINATED"}
    assert len(rows) == trials_expected * epochs
    assert not rows.duplicated(["trial_id", "epoch"]).any()
    assert trials.best_top1.notna().all()


@pytest.mark.slow
def test_submit_runs_the_search_on_the_cluster_and_uploads_no_excluded_path(ray_head, tmp_path):
    url, token, temp = ray_head
    results = tmp_path / "results"
    root = _project(tmp_path, {**TINY, "storage": str(results)})
    env = _client_env(token)
    proc = _ftsearch("submit", str(root / "configs" / "tiny.yaml"), "--working-dir", str(root),
                     "--address", url, "--set", "search.num_samples=2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip()
    assert job_id.startswith("ftsearch-jobtiny-") and "\n" not in job_id
    assert token not in proc.stdout + proc.stderr

    status = _ftsearch("jobs", "status", job_id, "--wait", "--address", url, env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[0] == f"{job_id}\tSUCCEEDED"
    _assert_complete(results / "jobtiny", trials_expected=2, epochs=2)

    logs = _ftsearch("jobs", "logs", job_id, "--address", url, env=env)
    assert logs.returncode == 0 and "best trial:" in logs.stdout
    assert "python -m search.cli run configs/tiny.yaml --set search.num_samples=2" in logs.stdout
    assert token not in logs.stdout + logs.stderr
    followed = _ftsearch("jobs", "logs", job_id, "--follow", "--address", url, env=env)
    assert followed.returncode == 0 and "best trial:" in followed.stdout  # ends with the job

    package = _package_dir(url, token, temp, job_id)
    assert (package / "search" / "cli.py").is_file()
    assert (package / "configs" / "tiny.yaml").is_file()
    assert _leaked(package) == []
    listed = _ftsearch("jobs", "list", "--address", url, env=env)
    assert f"{job_id}\tSUCCEEDED\tjobtiny" in listed.stdout


@pytest.mark.slow
def test_stock_ray_job_submit_runs_ftsearch_run(ray_head, tmp_path):
    url, token, temp = ray_head
    results = tmp_path / "results"
    root = _project(tmp_path, {**TINY, "storage": str(results)})
    # As the README shows it: Ray's own CLI, the documented excludes, `ftsearch run` inside.
    excludes = ["runs", ".venv", ".git", "data", "datasets", "__pycache__", ".env*", "*.pem",
                "*.key", "id_rsa*", ".aws"]
    env = {**_client_env(token), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(root),
         "--runtime-env-json", json.dumps({"excludes": excludes}),
         "--submission-id", "stock-cli", "--",
         "ftsearch", "run", "configs/tiny.yaml", "--name", "stock"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = _ftsearch("jobs", "status", "stock-cli", "--wait", "--address", url,
                       env=_client_env(token))
    assert status.stdout.splitlines()[0] == "stock-cli\tSUCCEEDED", status.stdout
    _assert_complete(results / "stock", trials_expected=2, epochs=2)
    assert _leaked(_package_dir(url, token, temp, "stock-cli")) == []


@pytest.mark.slow
def test_stop_a_running_search(ray_head, tmp_path):
    url, token, _ = ray_head
    root = _project(tmp_path, {**TINY, "storage": str(tmp_path / "results"),
                               "search": {"num_samples": 50, "max_concurrent": 1}})
    env = _client_env(token)
    proc = _ftsearch("submit", str(root / "configs" / "tiny.yaml"), "--working-dir", str(root),
                     "--address", url, env=env)
    job_id = proc.stdout.strip()
    stop = _ftsearch("jobs", "stop", job_id, "--address", url, env=env)
    assert stop.returncode == 0 and stop.stdout.strip() == f"{job_id}: stop requested"
    status = _ftsearch("jobs", "status", job_id, "--wait", "--address", url, env=env)
    assert status.returncode == 1 and status.stdout.startswith(f"{job_id}\tSTOPPED")


@pytest.mark.slow
def test_wrong_or_missing_token_is_refused_and_never_printed(ray_head, tmp_path):
    url, token, _ = ray_head
    wrong = "wrong-" + secrets.token_hex(8)
    env = {**_client_env(token), "RAY_AUTH_TOKEN": wrong}
    proc = _ftsearch("jobs", "status", "whatever", "--address", url, env=env)
    assert proc.returncode == 1
    assert "token authentication and the token from RAY_AUTH_TOKEN was refused" in proc.stderr
    assert wrong not in proc.stdout + proc.stderr and token not in proc.stdout + proc.stderr
    # no token anywhere (an empty home): refused, saying where to put one
    home = tmp_path / "home"
    home.mkdir()
    env = {**_client_env(token), "HOME": str(home)}
    del env["RAY_AUTH_TOKEN"]
    proc = _ftsearch("jobs", "status", "whatever", "--address", url, env=env)
    assert proc.returncode == 1 and "no token was found" in proc.stderr
    assert "~/.ray/auth_token" in proc.stderr and token not in proc.stdout + proc.stderr
    # the right token, an unknown job: bad input
    proc = _ftsearch("jobs", "logs", "no-such-job", "--address", url, env=_client_env(token))
    assert proc.returncode == 2 and "no-such-job: no such job" in proc.stderr
