"""What every benchmark shares: figures, sections, the machine, a local Ray, small configs."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "DEMO_DATA",
    "DEMO_RESOLUTION",
    "DEMO_TRAIN",
    "INFO",
    "MISS",
    "OPEN",
    "PASS",
    "ROOT",
    "Figure",
    "Section",
    "experiment",
    "fmt_spread",
    "load_average",
    "local_ray",
    "machine",
    "median",
    "single_thread",
    "stop_ray",
    "run_as_script",
    "timed",
]

ROOT = Path(__file__).resolve().parents[1]
# The demo's data, read from configs/demo.yaml (scikit-learn's digits, a few training
# images per class): the figures speak of the data `make demo` searches.
_DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
DEMO_DATA: dict[str, Any] = _DEMO["data"]
# Its input resolution, and its fixed SGD settings (epochs, batch size, optimizer...).
DEMO_RESOLUTION: int = _DEMO["train"]["resolution"]
DEMO_TRAIN: dict[str, Any] = {k: v for k, v in _DEMO["train"].items()
                              if k not in ("weights", "resolution")}

PASS, MISS, OPEN, INFO = "PASS", "MISS", "OPEN", "INFO"


@dataclass
class Figure:
    """One measured figure and its goal.

    Attributes:
        name: What was measured.
        value: The measurement, formatted.
        goal: The goal, formatted ("" for context figures).
        status: PASS, MISS, OPEN (not measurable on this machine) or INFO (no goal).
    """

    name: str
    value: str
    goal: str = ""
    status: str = INFO

    @classmethod
    def check(cls, name: str, value: float, *, goal: float, at_least: bool, fmt: str = "{:.3g}",
              unit: str = "") -> Figure:
        """A figure whose status is ``value >= goal`` (``at_least``) or ``value <= goal``."""
        ok = value >= goal if at_least else value <= goal
        sign = "≥" if at_least else "≤"
        return cls(name, fmt.format(value) + unit, f"{sign} {fmt.format(goal)}{unit}",
                   PASS if ok else MISS)


@dataclass
class Section:
    """A benchmark's part of BENCHMARKS.md.

    Attributes:
        key: Module name (``trial_overhead``...).
        title: Heading.
        figures: The figures, in the summary table too.
        body: Markdown: how it was measured, the detailed numbers, why a goal was missed.
        seconds: Wall time the benchmark took.
        ref: The goal's number in issue 6 (or another issue), for the summary table.
    """

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    body: str = ""
    seconds: float = 0.0
    ref: str = ""


def median(values: Sequence[float]) -> float:
    """The median (0.0 for no values)."""
    return float(statistics.median(values)) if values else 0.0


def fmt_spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """``mean ± half-range (min-max)``, the spread of a handful of seeds."""
    lo, hi = min(values), max(values)
    mean = sum(values) / len(values)
    return f"{fmt.format(mean)} ± {fmt.format((hi - lo) / 2)} ({fmt.format(lo)}–{fmt.format(hi)})"


def load_average() -> str:
    """The 1-minute load average against the core count: other work skews timings."""
    one, _, _ = os.getloadavg()
    return f"{one:.2f} on {os.cpu_count()} cores"


def machine() -> dict[str, str]:
    """Platform, CPU model, cores, memory, GPU and library versions."""
    import optuna
    import ray

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f"{kb / 2**20:.0f} GiB"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "gpu": gpu,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
    }


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread, as a Ray trial with ``cpu: 1`` runs (tune_trainable sets it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_RAY_STARTED_HERE = False


def loopback_only() -> None:
    """Makes the Ray this process starts next listen and talk on loopback only.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at its first import (here
    search.tuner has imported it already); enabled, as on Linux by default, it rewrites a
    node address of 127.0.0.1 to the machine's own. The variable covers the processes Ray
    starts, the constant this one. ftsearch's own local runs do this in search/session.py,
    before anything imports ray.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def local_ray() -> None:
    """Starts a loopback Ray in this process once; later calls reuse it."""
    global _RAY_STARTED_HERE
    import ray

    if ray.is_initialized():
        return
    loopback_only()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Workers import the benchmark trainables by module name.
    path = os.environ.get("PYTHONPATH", "")
    if str(ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), path) if p)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    _RAY_STARTED_HERE = True


def stop_ray() -> None:
    """Shuts down a Ray that :func:`local_ray` started."""
    global _RAY_STARTED_HERE
    import ray

    if _RAY_STARTED_HERE and ray.is_initialized():
        ray.shutdown()
    _RAY_STARTED_HERE = False


def experiment(storage: Path, name: str, *, train: dict[str, Any], space: dict[str, Any],
               search: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
               resources: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
               seed: int = 0) -> Any:
    """A validated ftsearch experiment config (``search.config.parse_config``), written to
    its directory's config.yaml as ``ftsearch run`` does before its tuner starts (the study
    journal for optuna-dashboard reads it)."""
    from search.changes import write_config
    from search.config import parse_config

    cfg = parse_config({
        "name": name,
        "storage": str(storage),
        "seed": seed,
        "data": data or DEMO_DATA,
        "train": train,
        "space": space,
        "search": search or {"algorithm": "random", "num_samples": 1, "max_concurrent": 1},
        "scheduler": scheduler or {"type": "none"},
        "resources": resources or {"cpu": 1, "gpu": 0},
    })
    Path(cfg.directory).mkdir(parents=True, exist_ok=True)
    write_config(cfg)
    return cfg


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_as_script(run: Callable[..., Section], *, doc: str | None) -> None:
    """``python -m benchmarks.<name> [--smoke]``: runs one benchmark and prints its section."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    section = run(smoke=parser.parse_args().smoke)
    print(section.body)
    for figure in section.figures:
        print(figure)
