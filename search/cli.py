"""``ftsearch`` command line: run, resume, backbones (and the analysis/cluster commands).

Exit codes: 0 success, 1 the search failed, 2 bad input (config, paths, arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
CONFIG_FILE = "config.yaml"


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"ftsearch: {message}", file=sys.stderr)
    return code


def _quiet_ray() -> None:
    # ftsearch prints its own one-line progress; Ray's tables and per-checkpoint
    # warnings would drown it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _init_ray(address: str | None) -> None:
    _quiet_ray()
    import ray

    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A laptop run stays on loopback: GCS, workers and object store bind to 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)


def _check_cluster_fits(cfg: Any) -> str | None:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.resources.gpu > 0 and cfg.resources.gpu > gpus:
        return (f"resources.gpu: {cfg.resources.gpu} GPU per trial, but the cluster has "
                f"{gpus:g} GPU(s); use at most {gpus:g} (0 for CPU-only)")
    cpus = ray.cluster_resources().get("CPU", 0)
    if cfg.resources.cpu > cpus:
        return (f"resources.cpu: {cfg.resources.cpu} CPU per trial, but the cluster has "
                f"{cpus:g} CPU(s)")
    return None


def _print_summary(directory: str) -> bool:
    """Prints the best trial; returns whether any trial produced a result."""
    import pandas as pd

    from search.store import TRIALS_FILE

    trials = pd.read_parquet(f"{directory}/{TRIALS_FILE}")
    counts = trials["status"].value_counts().to_dict()
    print(f"\ntrials: {len(trials)} (" + ", ".join(f"{v} {k.lower()}" for k, v in
                                                   sorted(counts.items())) + ")")
    ok = trials[trials["status"].isin(["TERMINATED", "STOPPED_EARLY"])]
    ok = ok.dropna(subset=["best_top1"])
    if ok.empty:
        errors = trials["error"].dropna()
        if not errors.empty:
            print("first error:\n" + errors.iloc[0], file=sys.stderr)
        return False
    best = ok.sort_values("best_top1", ascending=False).iloc[0]
    print(f"best trial: {best['trial_id']}  top-1 {best['best_top1']:.2f}%  "
          f"top-5 {best['best_top5']:.2f}%  epochs {best['epochs']}  "
          f"{best['gmacs']:.3f} GMACs  {best['params'] / 1e6:.2f}M params")
    print("best config:")
    for col in trials.columns:
        if col.startswith("config.") and not pd.isna(best[col]):
            print(f"  {col.removeprefix('config.')}: {best[col]}")
    print(f"experiment directory: {directory}")
    return True


def _run_search(cfg: Any, *, address: str | None, resume: bool) -> int:
    from search.tuner import build_tuner, experiment_dir, restore_tuner

    directory = experiment_dir(cfg)
    _init_ray(address)
    problem = _check_cluster_fits(cfg)
    if problem:
        return _fail(problem)
    tuner = restore_tuner(cfg) if resume else build_tuner(cfg)
    try:
        tuner.fit()
    except Exception as err:  # the search itself broke, not one trial
        print(f"ftsearch: the search failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if _print_summary(directory) else EXIT_FAILED


def _cmd_run(args: argparse.Namespace) -> int:
    from search.config import ConfigError, dump_config, load_config
    from search.tuner import experiment_dir

    overrides = list(args.set or [])
    if args.name:
        overrides.append(f"name={args.name}")
    if args.storage:
        overrides.append(f"storage={args.storage}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        for problem in err.problems:
            print(f"ftsearch: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    directory = experiment_dir(cfg)
    if "://" not in directory:
        path = Path(directory)
        if (path / CONFIG_FILE).exists():
            return _fail(f"experiment directory {directory} already holds a run; continue it "
                         f"with `ftsearch resume {directory}` or pick another --name")
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(dump_config(cfg))
    print(f"experiment {cfg.name}: results in {directory}", flush=True)
    return _run_search(cfg, address=args.address, resume=False)


def _cmd_resume(args: argparse.Namespace) -> int:
    from search.config import ConfigError, load_config

    directory = Path(args.directory)
    config_file = directory / CONFIG_FILE
    if not config_file.exists():
        return _fail(f"{directory} is not an ftsearch experiment directory (no {CONFIG_FILE})")
    try:
        cfg = load_config(config_file, [f"storage={directory.resolve().parent}",
                                        f"name={directory.resolve().name}"])
    except ConfigError as err:
        for problem in err.problems:
            print(f"ftsearch: {config_file}: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"resuming experiment {cfg.name} in {directory.resolve()}", flush=True)
    return _run_search(cfg, address=args.address, resume=True)


def _cmd_backbones(args: argparse.Namespace) -> int:
    from trainables.backbones import describe_backbones

    rows = describe_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'name':<18}{'stages':>7}{'params':>14}{'GMACs':>9}{'res':>6}  weights")
    for r in rows:
        weights = ", ".join(r["weights"]) or "-"
        print(f"{r['name']:<18}{r['stages']:>7}{r['params']:>14,}{r['gmacs']:>9.3f}"
              f"{r['resolution']:>6}  {weights}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a search from a YAML config")
    run.add_argument("config", help="experiment YAML file")
    run.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                     help="override a config field (repeatable)")
    run.add_argument("--name", help="experiment name (overrides `name`)")
    run.add_argument("--storage", help="results directory or URI (overrides `storage`)")
    run.add_argument("--address", help="join an existing Ray cluster instead of a local one")
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted experiment")
    resume.add_argument("directory", help="the experiment directory (<storage>/<name>)")
    resume.add_argument("--address", help="join an existing Ray cluster instead of a local one")
    resume.set_defaults(func=_cmd_resume)

    backbones = sub.add_parser("backbones", help="list the backbones")
    backbones.add_argument("--json", action="store_true", help="print a JSON list")
    backbones.set_defaults(func=_cmd_backbones)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
