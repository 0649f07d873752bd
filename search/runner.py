"""``ftsearch run`` and ``ftsearch resume``: pre-flight, Ray, the tuner, the summary.

The order is the product's promise: every check that needs no cluster runs before Ray
starts (config, then pre-flight), the experiment directory is created only once they all
pass, and the summary of the run is the last thing printed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from search import contract as C
from search.config import ConfigError, ExperimentConfig, dump_config, load_config
from search.preflight import preflight_problems
from search.storage import is_uri

__all__ = ["resume_search", "run_search"]


def _refuse(problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"ftsearch: {problem}", file=sys.stderr)
    return C.EXIT_BAD_INPUT


def _search(cfg: ExperimentConfig, *, address: str | None, resume: bool) -> int:
    from search import session

    session.start_ray(address=address)
    try:
        problem = session.cluster_problems(cfg)
        if problem:
            return _refuse([problem])
        if not resume and not is_uri(cfg.storage):
            # Only once every check passed: a refused run leaves nothing behind.
            Path(cfg.directory).mkdir(parents=True, exist_ok=True)
            (Path(cfg.directory) / C.CONFIG_FILE).write_text(dump_config(cfg))
        from search.tuner import build_tuner, restore_tuner

        tuner = restore_tuner(cfg) if resume else build_tuner(cfg)
        try:
            tuner.fit()
        except Exception as err:  # the search itself broke, not one trial
            print(f"ftsearch: the search failed: {err}", file=sys.stderr)
            return C.EXIT_FAILED
    finally:
        session.stop_ray()
    from search.analysis import run_summary  # pandas: not on the path of a refused run

    lines, ok = run_summary(cfg.directory, cfg.search.points_to_evaluate)
    print("\n".join(lines), flush=True)
    return C.EXIT_OK if ok else C.EXIT_FAILED


def run_search(config: str | Path, *, overrides: Sequence[str], address: str | None) -> int:
    """Validates ``config``, checks this machine, then runs the search; returns an exit code."""
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        return _refuse(err.problems)
    if not is_uri(cfg.storage) and (Path(cfg.directory) / C.CONFIG_FILE).exists():
        return _refuse([f"experiment directory {cfg.directory} already holds a run; continue "
                        f"it with `ftsearch resume {cfg.directory}` or pick another --name"])
    problems = preflight_problems(cfg, local=address is None)
    if problems:
        return _refuse(problems)
    print(f"experiment {cfg.name}: results in {cfg.directory}", flush=True)
    return _search(cfg, address=address, resume=False)


def resume_search(directory: str | Path, *, address: str | None) -> int:
    """Continues the experiment in ``directory``; returns an exit code."""
    directory = Path(directory).resolve()
    config_file = directory / C.CONFIG_FILE
    if not config_file.is_file():
        return _refuse([f"{directory} is not an ftsearch experiment directory (no "
                        f"{C.CONFIG_FILE})"])
    try:
        cfg = load_config(config_file, [f"storage={directory.parent}", f"name={directory.name}"])
    except ConfigError as err:
        return _refuse([f"{config_file}: {p}" for p in err.problems])
    problems = preflight_problems(cfg, local=address is None)
    if problems:
        return _refuse(problems)
    print(f"resuming experiment {cfg.name} in {directory}", flush=True)
    return _search(cfg, address=address, resume=True)
