"""``ftsearch`` command line: run, resume, backbones (and the analysis/cluster commands).

Exit codes: 0 success, 1 the search failed, 2 bad input (config, paths, arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
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


def _job_address() -> str | None:
    # Inside a Ray job (`ftsearch submit`, `ray job submit`) Ray points RAY_ADDRESS at the
    # cluster the driver must join; an http:// one is a dashboard, for the jobs CLI only.
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address and not address.startswith(("http://", "https://")) else None


def _init_ray(address: str | None) -> None:
    _quiet_ray()
    import ray

    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A laptop run stays on loopback: GCS, workers and object store bind to 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)


def _check_local_gpus(cfg: Any) -> str | None:
    """A local run can check its GPUs before Ray starts."""
    if cfg.resources.gpu <= 0:
        return None
    import torch

    gpus = torch.cuda.device_count()
    if cfg.resources.gpu > gpus:
        return (f"resources.gpu: {cfg.resources.gpu:g} GPU per trial, but this machine has "
                f"{gpus} usable GPU(s); use at most {gpus} (0 for CPU-only), or join a GPU "
                f"cluster with --address")
    return None


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


def _check_shared_storage(cfg: Any) -> str | None:
    """Trials on other nodes than the driver's need storage every node sees."""
    import ray

    from search.config import shared_storage

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    mine = next((n["Resources"] for n in nodes if n["NodeID"] == here), {})
    fits_here = (mine.get("CPU", 0) >= cfg.resources.cpu
                 and mine.get("GPU", 0) >= cfg.resources.gpu)
    if (len(nodes) < 2 and fits_here) or shared_storage(cfg):
        return None
    where = (f"this Ray cluster has {len(nodes)} nodes" if len(nodes) > 1 else
             "the trials cannot run on the driver's node, so they run on others")
    # Tune writes checkpoints from the trial's node and restores a retried trial from
    # them: a node-local directory would scatter them and lose them with the node.
    return (f"storage: {cfg.storage!r} is a node-local path, but {where}; give a path on a "
            f"filesystem every node mounts at the same place (NFS, EFS, Lustre...), an "
            f"s3:// or gs:// URI, or set storage_shared: true if {cfg.storage!r} is shared "
            f"in a way ftsearch cannot detect")


def _print_summary(directory: str, points: Sequence[dict[str, Any]] = ()) -> bool:
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
    for point in points:
        baseline = _matching_trial(ok, point)
        if baseline is not None:
            gain = best["best_top1"] - baseline["best_top1"]
            print(f"warm-start baseline {baseline['trial_id']}: top-1 "
                  f"{baseline['best_top1']:.2f}% -> best {best['best_top1']:.2f}% "
                  f"({gain:+.2f} points)")
    print(f"experiment directory: {directory}")
    return True


def _matching_trial(trials: Any, point: dict[str, Any]) -> Any:
    """The finished trial whose searched values equal ``point`` (a points_to_evaluate entry)."""
    import math

    for _, row in trials.iterrows():
        same = True
        for key, value in point.items():
            got = row.get(f"config.{key}")
            if isinstance(value, float) and isinstance(got, float):
                same &= math.isclose(value, got, rel_tol=1e-9)
            else:
                same &= got == value
        if same:
            return row
    return None


def _run_search(cfg: Any, *, address: str | None, resume: bool,
                on_ready: Callable[[], None] | None = None) -> int:
    from search.tuner import build_tuner, experiment_dir, restore_tuner

    directory = experiment_dir(cfg)
    _init_ray(address)
    problem = _check_cluster_fits(cfg) or _check_shared_storage(cfg)
    if problem:
        return _fail(problem)
    if on_ready is not None:
        on_ready()
    tuner = restore_tuner(cfg) if resume else build_tuner(cfg)
    try:
        tuner.fit()
    except Exception as err:  # the search itself broke, not one trial
        print(f"ftsearch: the search failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    ok = _print_summary(directory, cfg.search.points_to_evaluate)
    return EXIT_OK if ok else EXIT_FAILED


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items, then ``--name`` and ``--storage`` as the overrides they stand for."""
    overrides = list(args.set or [])
    if args.name:
        overrides.append(f"name={args.name}")
    if args.storage:
        overrides.append(f"storage={args.storage}")
    return overrides


def _cmd_run(args: argparse.Namespace) -> int:
    from search.config import ConfigError, dump_config, load_config
    from search.tuner import experiment_dir

    overrides = _overrides(args)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        for problem in err.problems:
            print(f"ftsearch: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = None if args.address else _check_local_gpus(cfg)
    if problem:
        return _fail(problem)
    directory = experiment_dir(cfg)
    path = Path(directory)
    if "://" not in directory and (path / CONFIG_FILE).exists():
        return _fail(f"experiment directory {directory} already holds a run; continue it "
                     f"with `ftsearch resume {directory}` or pick another --name")

    def save_config() -> None:
        # Only once every check passed: a refused run leaves nothing behind.
        if "://" not in directory:
            path.mkdir(parents=True, exist_ok=True)
            (path / CONFIG_FILE).write_text(dump_config(cfg))

    print(f"experiment {cfg.name}: results in {directory}", flush=True)
    return _run_search(cfg, address=args.address, resume=False, on_ready=save_config)


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


def _cmd_analyze(args: argparse.Namespace) -> int:
    # Parquet only: neither Ray nor the search modules that import it are loaded here.
    import yaml

    from search.analysis import (
        AnalysisError,
        best_config,
        best_trial,
        format_leaderboard,
        leaderboard,
        load_experiment,
        param_importance,
        sampled_params,
        summary,
    )
    from search.plots import write_plots
    from search.report import write_report

    try:
        experiments = [load_experiment(d) for d in args.directories]
    except AnalysisError as err:
        return _fail(str(err))
    names = [e.name for e in experiments]
    if len(set(names)) < len(names):
        return _fail(f"experiment names repeat ({names}); analyse experiments with distinct "
                     f"names together")
    out = Path(args.out) if args.out else (
        experiments[0].directory / "analysis" if len(experiments) == 1 else Path("analysis"))
    out.mkdir(parents=True, exist_ok=True)
    for exp in experiments:
        s = summary(exp)
        counts = ", ".join(f"{n} {k.lower()}" for k, n in s["by_status"].items() if n)
        print(f"experiment {exp.name} ({exp.directory}): {s['trials']} trials ({counts}), "
              f"{s['trial_seconds']:.1f} trial-seconds")
    board = leaderboard(experiments)
    print(f"\nleaderboard (top {min(args.top, len(board))} of {len(board)}, by best top-1):")
    print(format_leaderboard(board, top=args.top))
    best = best_trial(board)
    best_yaml = None
    if best is None:
        print("\nno trial has finished yet: no best config")
    else:
        exp = experiments[names.index(best["experiment"])]
        print(f"\nbest trial: {best['trial_id']} ({exp.name})  top-1 {best['best_top1']:.2f}%  "
              f"top-5 {best['best_top5']:.2f}%  epochs {best['epochs']}  "
              f"{best['gmacs']:.3f} GMACs")
        print("best config:")
        for name, value in sampled_params(exp, best["trial_id"]).items():
            print(f"  {name}: {value}")
        if exp.config is None:
            print(f"(no {CONFIG_FILE} in {exp.directory}: best.yaml not written)")
        else:
            best_yaml = (f"# Reruns trial {best['trial_id']} of experiment {exp.name} "
                         f"(best top-1 {best['best_top1']:.2f}%): `ftsearch run best.yaml`.\n"
                         f"# Each searched parameter is pinned to the trial's value as a "
                         f"one-value choice.\n"
                         + yaml.safe_dump(best_config(exp, best), sort_keys=False))
            (out / "best.yaml").write_text(best_yaml)
    importances = [param_importance(e) for e in experiments]
    for imp in importances:
        print(f"\nimportance for best top-1 ({imp.experiment}, {imp.finished} finished trials):")
        for evaluator, values in imp.values.items():
            ranked = sorted(values.items(), key=lambda kv: -kv[1])
            print(f"  {evaluator}: " + ", ".join(f"{p} {v:.3f}" for p, v in ranked))
        for message in imp.messages:
            print(f"  {message}")
    board.to_csv(out / "leaderboard.csv", index=False)
    images = write_plots(experiments, board, importances, out=out)
    report = write_report(experiments=experiments, board=board, best=best,
                          importances=importances, images=images, out=out / "report.html",
                          top=args.top, best_yaml=best_yaml)
    written = (["best.yaml"] if best_yaml else []) + [report.name, "leaderboard.csv"]
    plots = f" ({', '.join(p.name for p in images.values())})" if images else ""
    print(f"\nwrote {', '.join(written)} and {len(images)} plots{plots} to {out}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from search.analysis import AnalysisError
    from search.export import export_model

    try:
        meta = export_model(args.directory, out=args.out, trial_id=args.trial)
    except AnalysisError as err:
        return _fail(str(err))
    top1 = "" if meta["top1"] is None else f", top-1 {meta['top1']:.2f}%"
    print(f"exported trial {meta['trial_id']} of {meta['experiment']} (epoch {meta['epoch']}"
          f"{top1}): {meta['backbone']}, {meta['num_classes']} classes, "
          f"{meta['resolution']} px -> {args.out}")
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from search.export import ModelFileError, image_files, load_model, predict

    if args.top < 1:
        return _fail(f"--top: must be >= 1 (got {args.top})")
    try:
        model, meta = load_model(args.model)
        files = image_files(args.path)
    except ModelFileError as err:
        return _fail(str(err))
    predictions, failures = predict(model, meta, files, top=args.top)
    for path, classes in predictions:
        print(f"{path.name}\t" + "\t".join(f"{name} {p:.4f}" for name, p in classes))
    for path, why in failures:
        print(f"ftsearch: {path}: cannot read image ({why})", file=sys.stderr)
    return EXIT_BAD_INPUT if failures else EXIT_OK


def _cmd_submit(args: argparse.Namespace) -> int:
    from search.jobs import JobsError, submit_search

    overrides = _overrides(args)
    try:
        job_id = submit_search(args.config, address=args.address, overrides=overrides,
                               working_dir=args.working_dir)
    except JobsError as err:
        for line in str(err).splitlines():
            print(f"ftsearch: {line}", file=sys.stderr)
        return err.code
    # stdout holds the id alone, for `JOB=$(ftsearch submit ...)`.
    print(job_id, flush=True)
    where = f" --address {args.address}" if args.address else ""
    print(f"follow it: ftsearch jobs logs {job_id} --follow{where}", file=sys.stderr)
    return EXIT_OK


def _cmd_jobs(args: argparse.Namespace) -> int:
    from search import jobs

    try:
        if args.action == "list":
            for job in jobs.list_jobs(address=args.address):
                print(f"{job.job_id}\t{job.status}\t{job.metadata.get('ftsearch.experiment', '-')}")
            return EXIT_OK
        if not args.job:
            return _fail(f"jobs {args.action}: give the job id that `ftsearch submit` printed")
        if args.action == "status":
            job = (jobs.wait_for_job(args.job, address=args.address) if args.wait
                   else jobs.job_status(args.job, address=args.address))
            print(f"{job.job_id}\t{job.status}")
            if job.message:
                print(job.message)
            return EXIT_FAILED if args.wait and job.status != "SUCCEEDED" else EXIT_OK
        if args.action == "logs":
            if args.follow:
                for chunk in jobs.follow_logs(args.job, address=args.address):
                    print(chunk, end="", flush=True)
            else:
                print(jobs.job_logs(args.job, address=args.address), end="")
            return EXIT_OK
        stopped = jobs.stop_job(args.job, address=args.address)
        print(f"{args.job}: " + ("stop requested" if stopped else "was not running"))
        return EXIT_OK
    except jobs.JobsError as err:
        return _fail(str(err), err.code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a search from a YAML config")
    run.add_argument("config", help="experiment YAML file")
    run.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                     help="override a config field (repeatable)")
    run.add_argument("--name", help="experiment name (overrides `name`)")
    run.add_argument("--storage", help="results directory or URI (overrides `storage`)")
    run.add_argument("--address", default=_job_address(),
                     help="join an existing Ray cluster instead of a local one")
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted experiment")
    resume.add_argument("directory", help="the experiment directory (<storage>/<name>)")
    resume.add_argument("--address", default=_job_address(),
                        help="join an existing Ray cluster instead of a local one")
    resume.set_defaults(func=_cmd_resume)

    backbones = sub.add_parser("backbones", help="list the backbones")
    backbones.add_argument("--json", action="store_true", help="print a JSON list")
    backbones.set_defaults(func=_cmd_backbones)

    analyze = sub.add_parser("analyze", help="leaderboard, importance, plots, report, best.yaml "
                                             "(reads the Parquet files only, no Ray)")
    analyze.add_argument("directories", nargs="+", metavar="DIR",
                         help="experiment directories (<storage>/<name>); several are compared")
    analyze.add_argument("--out", help="output folder (default: DIR/analysis for one DIR, "
                                       "./analysis for several)")
    analyze.add_argument("--top", type=int, default=10, help="leaderboard rows (default 10)")
    analyze.set_defaults(func=_cmd_analyze)

    export = sub.add_parser("export", help="a trial's checkpoint as one standalone model file")
    export.add_argument("directory", help="the experiment directory (<storage>/<name>)")
    export.add_argument("--trial", help="trial id (default: the best finished trial)")
    export.add_argument("--out", default="model.pt", help="model file (default model.pt)")
    export.set_defaults(func=_cmd_export)

    predict = sub.add_parser("predict", help="class probabilities of images, from a model file")
    predict.add_argument("model", help="a file written by `ftsearch export`")
    predict.add_argument("path", help="an image file, or a folder of images")
    predict.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    predict.set_defaults(func=_cmd_predict)

    submit = sub.add_parser("submit", help="run a search on a Ray cluster, as a Ray job")
    submit.add_argument("config", help="experiment YAML file, inside the uploaded directory")
    submit.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 "
                                          "(default: $RAY_API_SERVER_ADDRESS)")
    submit.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="override a config field (repeatable)")
    submit.add_argument("--name", help="experiment name (overrides `name`)")
    submit.add_argument("--storage", help="results path on the cluster or URI (overrides "
                                          "`storage`)")
    submit.add_argument("--working-dir", help="directory uploaded as the job's working dir "
                                              "(default: the ftsearch project)")
    submit.set_defaults(func=_cmd_submit)

    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted search")
    jobs.add_argument("action", choices=["status", "logs", "stop", "list"])
    jobs.add_argument("job", nargs="?", help="the job id `ftsearch submit` printed")
    jobs.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 "
                                        "(default: $RAY_API_SERVER_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    jobs.add_argument("--wait", action="store_true",
                      help="status: wait until the job ends; exit 1 unless it SUCCEEDED")
    jobs.set_defaults(func=_cmd_jobs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
