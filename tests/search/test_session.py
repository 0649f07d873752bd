"""A local `ftsearch run` as users run it: loopback only, quiet, and nothing left behind.

Each run is a real `ftsearch run` subprocess, started without any Ray variable set, so
whatever keeps Ray on loopback and cleans it up must come from ftsearch itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil
import pytest

from search.reaper import TAG_VAR, run_processes, spawn_reaper
from tests.conftest import FTSEARCH, ROOT, TINY, fill, is_loopback, write_config

pytestmark = pytest.mark.slow

GONE_WITHIN_S = 10.0
RUNNING = re.compile(r"trials: [1-9]\d* running")


def _env() -> dict[str, str]:
    """The environment of a user's shell: no Ray variable ftsearch should set itself."""
    env = dict(os.environ)
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", TAG_VAR):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _config(tmp_path: Path, name: str, *, num_samples: int, epochs: int) -> Path:
    cfg = {**TINY, "name": name, "storage": str(tmp_path / "runs"),
           "search": {**TINY["search"], "num_samples": num_samples},
           "train": {**TINY["train"], "epochs": epochs}}
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _start(config: Path, out: Path, err: Path, env: dict[str, str] | None = None
           ) -> subprocess.Popen:
    with out.open("w") as stdout, err.open("w") as stderr:
        return subprocess.Popen([*FTSEARCH, "run", str(config)], cwd=ROOT, env=env or _env(),
                                stdout=stdout, stderr=stderr)


def _wait_for(predicate: Callable[[], object], timeout: float, every: float = 0.2) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


def _run_tag(driver: psutil.Process) -> str | None:
    """The run's tag, read from a child of the driver (Ray's processes inherit it)."""
    try:
        children = driver.children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            tag = child.environ().get(TAG_VAR)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if tag:
            return tag
    return None


def _run_processes(driver: psutil.Process, tag: str) -> dict[int, psutil.Process]:
    """The driver, its descendants, the processes carrying the run's tag and their own."""
    procs = run_processes(tag)
    with contextlib.suppress(psutil.NoSuchProcess):
        procs.update({p.pid: p for p in [driver, *driver.children(recursive=True)]})
    return procs


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            # is_running() also checks the create time: a reused pid is not this process.
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def _describe(procs: Iterable[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.Error:
            out.append(str(proc.pid))
    return out


def _kill(procs: Iterable[psutil.Process]) -> None:
    """Test clean-up: SIGKILL, by pid, whatever of this test's run is still alive."""
    for proc in _alive(procs):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil refuses if the pid now belongs to another process


def _listening(pids: set[int]) -> set[tuple[int, str, int]]:
    found = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.add((conn.pid, conn.laddr.ip, conn.laddr.port))
    return found


def _wait_until_trials_run(proc: subprocess.Popen, out: Path, err: Path) -> None:
    def running() -> bool:
        assert proc.poll() is None, out.read_text() + err.read_text()
        return bool(RUNNING.search(out.read_text()))

    assert _wait_for(running, 180, every=0.5), out.read_text() + err.read_text()


def test_local_run_listens_on_loopback_only_and_prints_no_ray_chatter(demo_run):
    # `make demo` from a user's shell (tests/conftest.py: no Ray variable but the RAY_ADDRESS
    # Ray's job docs have users export, which a local run must ignore), every listening
    # socket of its processes watched while it ran.
    seen, names = demo_run.listening, demo_run.names
    # the poll saw Ray's servers (GCS, raylet, agents), or it proved nothing
    assert len({pid for pid, _, _ in seen}) >= 3, (seen, names)
    print(f"\nlistening: {sorted((names.get(pid, str(pid))[-60:], ip) for pid, ip, _ in seen)}")
    public = sorted((names.get(pid), ip, port) for pid, ip, port in seen if not is_loopback(ip))
    assert not public, public
    output = demo_run.proc.stdout + demo_run.proc.stderr
    last = demo_run.proc.stdout.splitlines()[-40:]
    assert any(line.startswith("best trial") for line in last), output
    for word in ("leaked", "nanobind", "Traceback"):
        assert word not in output, output
    assert "Token authentication" not in output and "Started a local Ray" not in output
    assert "A new study created" not in output


def _start_long_run(tmp_path: Path, name: str
                    ) -> tuple[subprocess.Popen, psutil.Process, str, Path, Path]:
    """A run whose trials last long enough to be interrupted mid-search."""
    config = _config(tmp_path, name, num_samples=4, epochs=60)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    proc = _start(config, out, err)
    driver = psutil.Process(proc.pid)
    _wait_until_trials_run(proc, out, err)
    tag = _run_tag(driver)
    assert tag, "no process of the run carried its tag"
    return proc, driver, tag, out, err


def _agents_up(driver: psutil.Process) -> bool:
    # The processes that outlive a SIGKILLed driver without the reaper; their title hides
    # the tag, so only the driver's process tree tells that they belong to the run.
    names = " ".join(_describe(driver.children(recursive=True)))
    return "DashboardAgent" in names and "RuntimeEnvAgent" in names


def test_kill_9_of_the_driver_leaves_no_ray_process_after_10_s(tmp_path):
    proc, driver, tag, out, err = _start_long_run(tmp_path, "kill9")
    procs = _run_processes(driver, tag)
    try:
        assert _wait_for(lambda: _agents_up(driver), 30), _describe(procs.values())
        procs.update(_run_processes(driver, tag))
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()
        gone = _wait_for(lambda: not _alive(procs.values()), GONE_WITHIN_S, every=0.1)
        elapsed = time.monotonic() - killed
        print(f"\nkill -9: {len(procs)} processes gone {elapsed:.1f} s after the driver")
        assert gone, _describe(_alive(procs.values()))
        assert not _alive(run_processes(tag).values()), _describe(run_processes(tag).values())
    finally:
        proc.kill()
        proc.wait()
        _kill([*procs.values(), *run_processes(tag).values()])


def test_sigterm_stops_the_search_like_ctrl_c_and_leaves_nothing(tmp_path):
    proc, driver, tag, out, err = _start_long_run(tmp_path, "sigterm")
    procs = _run_processes(driver, tag)
    try:
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=30)
        exited = time.monotonic() - sent
        gone = _wait_for(lambda: not _alive([*procs.values(), *run_processes(tag).values()]),
                         GONE_WITHIN_S, every=0.1)
        print(f"\nSIGTERM: driver exited after {exited:.1f} s (code {proc.returncode}), "
              f"the rest gone {time.monotonic() - sent - exited:.1f} s later")
        assert gone, _describe(_alive([*procs.values(), *run_processes(tag).values()]))
        # Tune stopped the run as on Ctrl-C (not Ray's exit-at-once SIGTERM handler): it
        # saved the experiment, for `ftsearch resume`, and the summary was printed.
        output = out.read_text() + err.read_text()
        assert "Stop signal received" in output, output
        assert list((tmp_path / "runs" / "sigterm").glob("experiment_state*.json"))
        assert re.search(r"^trials: \d+ \(", out.read_text(), re.MULTILINE), output
        assert "Traceback" not in output, output
    finally:
        proc.kill()
        proc.wait()
        _kill([*procs.values(), *run_processes(tag).values()])


def test_start_ray_refuses_a_ray_imported_before_it(tmp_path):
    # Had anything imported ray first, Ray would have read its bind setting already and
    # listened on every interface: start_ray must say so, not start it.
    code = ("import ray\nfrom search import session\nsession.start_ray(address=None)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "RuntimeError: ray was imported before" in proc.stderr, proc.stderr


def test_reaper_ends_every_tagged_process_once_its_stdin_closes(tmp_path):
    tag = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = {**_env(), TAG_VAR: tag}
    sleeper = "import time; time.sleep(300)"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    # A tagged process whose child lost the tag (as a process that sets its title does).
    pidfile = tmp_path / "grandchild"
    parent = ("import os, subprocess, sys, time\n"
              f"env = {{k: v for k, v in os.environ.items() if k != {TAG_VAR!r}}}\n"
              f"child = subprocess.Popen([sys.executable, '-c', {sleeper!r}], env=env)\n"
              f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
              "time.sleep(300)")
    children = [subprocess.Popen([sys.executable, "-c", code], env=env)
                for code in (sleeper, stubborn, parent)]
    reaper = spawn_reaper(tag)
    grandchild = None
    try:
        assert _wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10)
        grandchild = psutil.Process(int(pidfile.read_text()))
        assert _has_no_tag(grandchild)
        assert set(run_processes(tag)) == {c.pid for c in children} | {grandchild.pid}
        time.sleep(1)
        assert reaper.poll() is None  # waits for its stdin to close, nothing else
        closed = time.monotonic()
        reaper.stdin.close()
        for child in children:
            child.wait(timeout=GONE_WITHIN_S)  # ends them, and reaps their zombies
        assert reaper.wait(timeout=GONE_WITHIN_S) == 0
        assert time.monotonic() - closed < GONE_WITHIN_S
        assert not _alive([grandchild])
        assert [c.returncode for c in children] == [-signal.SIGTERM, -signal.SIGKILL,
                                                    -signal.SIGTERM]
    finally:
        for child in children:
            child.kill()
            child.wait()
        _kill([grandchild] if grandchild else [])
        reaper.kill()
        reaper.wait()


def _has_no_tag(proc: psutil.Process) -> bool:
    return TAG_VAR not in proc.environ()



@contextlib.contextmanager
def _console(logger_name: str) -> Iterator[io.StringIO]:
    """What ``logger_name`` prints, with ftsearch's filter of failed state copies on."""
    from search.session import _state_save_failures

    console = io.StringIO()
    handler = logging.StreamHandler(console)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    _state_save_failures.install()
    try:
        yield console
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(_state_save_failures)


def test_a_state_copy_to_a_full_disk_is_one_line_without_ray_traceback(small_disk, tmp_path):
    """Ray's own syncer copies into a full file system, as Tune does with its experiment
    state at every save: the console gets one line naming the error, once."""
    if small_disk is None:
        pytest.skip("cannot mount a tmpfs to fill")
    import pyarrow.fs
    from ray.train._internal.storage import _FilesystemSyncer

    state = tmp_path / "driver-state"
    state.mkdir()
    (state / "experiment_state.json").write_bytes(bytes(2**20))
    filler = fill(small_disk)
    try:
        with _console("ray.train._internal.syncer") as console:
            syncer = _FilesystemSyncer(storage_filesystem=pyarrow.fs.LocalFileSystem(),
                                       sync_period=0, sync_timeout=30)
            for _ in range(3):  # each launch reports the previous copy's failure
                syncer.sync_up(str(state), str(small_disk / "experiment"))
                syncer._sync_process._process.join(timeout=30)
    finally:
        filler.unlink()
    lines = console.getvalue().splitlines()
    assert "Traceback" not in console.getvalue(), console.getvalue()
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert "ftsearch resume" in lines[0]


def test_any_other_failed_copy_keeps_rays_traceback():
    with _console("ray.tune.execution.experiment_state") as console:
        try:
            raise ValueError("a bug in a syncer")
        except ValueError:
            logging.getLogger("ray.tune.execution.experiment_state").error(
                "Saving experiment state to storage at 'x' failed with exception: ",
                exc_info=True)
    assert "Traceback" in console.getvalue() and "a bug in a syncer" in console.getvalue()
