"""Shared fixtures: a tiny real search, run once per test session through the CLI."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FTSEARCH = [sys.executable, "-m", "search.cli"]

# Small enough for 2 CPU cores: 32 px digits, 100 training images, 3 steps an epoch,
# 180 validation images.
TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "digits", "samples_per_class": 10, "val_fraction": 0.1},
    "train": {"epochs": 3, "batch_size": 32, "resolution": 32, "max_steps_per_epoch": 3,
              "eval_batch_size": 512,
              "weights": {"efficientnet_lite0": "packaged", "default": "none"}},
    "space": {
        "backbone": {"type": "choice", "values": ["efficientnet_lite0", "resnet18"]},
        "freeze_depth": {"type": "int", "low": 0, "high": 9},
        "lr": {"type": "loguniform", "low": 0.0001, "high": 0.3},
        "lr_scale": {"type": "loguniform", "low": 0.01, "high": 1.0},
    },
    # One trial at a time keeps ASHA's decisions reproducible: pretrained Lite0
    # trials learn within 3 steps, ResNet-18 from scratch does not, so ASHA stops some.
    # (Not AlexNet: its 61M parameters made each checkpoint 456 MB, the suite's disk use 20 GB.)
    "search": {"num_samples": 6, "max_concurrent": 1,
               "objectives": [{"metric": "top1", "mode": "max"},
                              {"metric": "gmacs", "mode": "min"}]},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 3},
    "resources": {"cpu": 1},
}


def ftsearch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_ftsearch(*args: str, timeout: float = 600, cwd: Path | None = None
                 ) -> subprocess.CompletedProcess:
    return subprocess.run([*FTSEARCH, *args], cwd=cwd or ROOT, env=ftsearch_env(),
                          capture_output=True, text=True, timeout=timeout)


def refused(capsys, config: Path) -> str:
    """Runs ``ftsearch run config`` in-process; asserts exit 2 and exactly one
    ``ftsearch: ...`` line on stderr; returns that line without the prefix."""
    from search.cli import main

    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftsearch: "), err
    return lines[0].removeprefix("ftsearch: ")


def write_val_images(folder: Path, data: dict, seed: int) -> Path:
    """The validation images of ``data`` as PNG files named <index>_<label>.png."""
    from PIL import Image

    from trainables.data import load_data

    splits = load_data(data, seed=seed)
    for i, (image, label) in enumerate(zip(splits.val.images, splits.val.labels, strict=True)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}_{int(label)}.png")
    return folder


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory) -> Path:
    """A finished multi-objective ASHA search: its experiment directory."""
    root = tmp_path_factory.mktemp("tiny")
    config = write_config(root / "tiny.yaml", {**TINY, "storage": str(root / "runs")})
    proc = run_ftsearch("run", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs" / "tiny"


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of the variables tests or the Makefile set,
    and no Ray settings (the product must stay on loopback without them)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "PYTEST_")) and k not in ("OMP_NUM_THREADS",
                                                                   "PYTHONPATH")}


@dataclass(frozen=True)
class DemoRun:
    """`make demo` as a user ran it.

    Attributes:
        root: The folder it ran in; the experiment is ``root/runs/demo`` (the link).
        proc: The finished `make demo` (its stdout and stderr).
        listening: (pid, ip, port) of every socket a process of the run listened on.
        names: pid -> its command line, for those processes.
    """

    root: Path
    proc: subprocess.CompletedProcess
    listening: set[tuple[int, str, int]]
    names: dict[int, str]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """`make demo` as a user runs it (the real Makefile recipe, the venv this suite runs
    in), in a scratch copy of the checkout's config, every listening socket of its
    processes watched. The experiment is `<folder>/runs/demo`, the link `make demo` leaves."""
    import shutil

    root = tmp_path_factory.mktemp("demo")
    (root / "configs").mkdir()
    shutil.copy2(ROOT / "configs" / "demo.yaml", root / "configs" / "demo.yaml")
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")  # the venv's stamp is newer
    venv = Path(sys.executable).parent.parent
    stamp = root / ".installed"  # newer than pyproject.toml: make installs nothing again
    stamp.touch()
    # As Ray's job docs have users export it, for the jobs CLI: a local run must not join it.
    env = {**user_env(), "RAY_ADDRESS": "http://127.0.0.1:8265"}
    out, err = root / "make-demo.out", root / "make-demo.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"),
                                 "demo", f"VENV={venv}", f"BIN={venv / 'bin'}",
                                 f"STAMP={stamp}"], cwd=root, env=env, stdout=stdout,
                                stderr=stderr)
    try:
        listening, names = _watch_listening(proc, timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(),
                                       err.read_text())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return DemoRun(root, done, listening, names)


def _watch_listening(proc: subprocess.Popen, *, timeout: float
                     ) -> tuple[set[tuple[int, str, int]], dict[int, str]]:
    """Every listening socket of ``proc``'s processes until it exits: its descendants and
    the processes carrying the run's tag (Ray's agents, which leave the tree)."""
    import psutil

    from search.reaper import TAG_VAR, run_processes

    root = psutil.Process(proc.pid)
    seen: set[tuple[int, str, int]] = set()
    names: dict[int, str] = {}
    tag = None
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        with contextlib.suppress(psutil.Error):
            procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
            for child in procs.values():
                with contextlib.suppress(psutil.Error):
                    tag = tag or child.environ().get(TAG_VAR)
            procs.update(run_processes(tag) if tag else {})
            for conn in psutil.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
                    seen.add((conn.pid, conn.laddr.ip, conn.laddr.port))
                    if conn.pid not in names:
                        with contextlib.suppress(psutil.Error):
                            names[conn.pid] = " ".join(procs[conn.pid].cmdline())[:120]
        time.sleep(1)
    return seen, names


def is_loopback(ip: str) -> bool:
    """Whether a socket address (as psutil gives it) is on loopback."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, a dual-stack socket bound to loopback
    return addr.is_loopback


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MB file system of its own (tmpfs) the test can fill, or None where mounting
    one is not allowed (then the disk-full step is left out, and says so)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        warnings.warn(f"disk-full step skipped: cannot mount a tmpfs ({done.stderr.strip()})",
                      stacklevel=1)
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Writes ``disk/filler`` until the file system is full; its path (delete it to free)."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(bytes(2**20))
                handle.flush()
        except OSError:
            pass
    return filler
