"""``ftsearch`` command line: run, resume, backbones (and the analysis/cluster commands).

Exit codes: 0 success, 1 the search failed, 2 bad input (config, paths, arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from search import contract as C
from search.cliargs import build_parser, config_overrides

__all__ = ["main"]


def _fail(message: str, code: int = C.EXIT_BAD_INPUT) -> int:
    for line in message.splitlines() or [""]:  # one `ftsearch:` line per problem
        print(f"ftsearch: {line}", file=sys.stderr)
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from search.runner import run_search

    return run_search(args.config, overrides=config_overrides(args), address=args.address)


def _cmd_resume(args: argparse.Namespace) -> int:
    from search.runner import resume_search

    return resume_search(args.directory, overrides=list(args.set or []), address=args.address,
                         trust=args.trust)


def _cmd_rank(args: argparse.Namespace) -> int:
    # No Ray: the scores need one forward pass per backbone, in this process.
    from search.config import ConfigError
    from search.preflight import preflight_problems
    from search.transfer import (
        RankingError,
        format_ranking,
        load_target,
        timed_rank,
        write_ranking,
    )

    try:
        cfg = load_target(args.target, config_overrides(args))
    except ConfigError as err:
        return _fail("\n".join(err.problems))
    problems = preflight_problems(cfg, local=True)
    if problems:
        return _fail("\n".join(problems))
    try:
        table, notes, seconds = timed_rank(cfg)
    except RankingError as err:
        return _fail(str(err))
    except (ValueError, OSError, RuntimeError) as err:  # data or weights that cannot load
        return _fail(f"ranking failed: {type(err).__name__}: {err}", C.EXIT_FAILED)
    path = write_ranking(cfg.directory, table)
    print("\n".join(format_ranking(table, notes, top=args.top)))
    print(f"ranked {len(table)} cells in {seconds:.1f} s -> {path}")
    return C.EXIT_OK


def _cmd_advise(args: argparse.Namespace) -> int:
    from search.advise import advice_text, advise, default_out, write_advice
    from search.config import ConfigError
    from search.preflight import preflight_problems
    from search.storage import FileTargetError, file_target
    from search.transfer import RankingError, load_target

    out = args.out or default_out(args.target)
    try:
        target = file_target(out)
    except FileTargetError as err:
        return _fail(f"--out: {err}")
    if target.exists() and not args.force:
        return _fail(f"--out: {target} exists; give another --out, or --force to replace it")
    try:
        problems = preflight_problems(load_target(args.target, config_overrides(args)), local=True)
        if problems:
            return _fail("\n".join(problems))
        advice = advise(args.target, config_overrides(args))
    except ConfigError as err:
        return _fail("\n".join(err.problems))
    except RankingError as err:
        return _fail(str(err))
    except (ValueError, OSError, RuntimeError) as err:  # data or weights that cannot load
        return _fail(f"advise failed: {type(err).__name__}: {err}", C.EXIT_FAILED)
    write_advice(advice, target)
    print("\n".join(advice_text(advice, out=target)))
    return C.EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    # Parquet and Optuna only: no Ray workers, no torch.
    from search.replay import (
        METHODS,
        ReplayError,
        format_replay,
        load_grid,
        parse_method,
        replay_methods,
    )

    if args.seeds < 1:
        return _fail(f"--seeds: must be >= 1 (got {args.seeds})")
    try:
        methods = [parse_method(m) for m in args.method] if args.method else None
        grid = load_grid(args.directory)
        if methods is None:
            methods = [m for m in METHODS if not m.prior or grid.ranking is not None]
        seeds = list(range(args.seeds))
        results = replay_methods(grid, methods, seeds=seeds, budget=args.budget,
                                 within=args.within)
    except ReplayError as err:
        return _fail(str(err))
    print("\n".join(format_replay(grid, methods, results, seeds=seeds, budget=args.budget,
                                  within=args.within)))
    return C.EXIT_OK


def _cmd_backbones(args: argparse.Namespace) -> int:
    from trainables.models import describe_backbones

    rows = describe_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return C.EXIT_OK
    print(f"{'name':<18}{'stages':>7}{'params':>14}{'GMACs':>9}{'res':>6}  weights")
    for r in rows:
        weights = ", ".join(r["weights"]) or "-"
        print(f"{r['name']:<18}{r['stages']:>7}{r['params']:>14,}{r['gmacs']:>9.3f}"
              f"{r['resolution']:>6}  {weights}")
    return C.EXIT_OK


def _cmd_analyze(args: argparse.Namespace) -> int:
    # Parquet only: neither Ray nor the search modules that import it are loaded here.
    from search.analysis import AnalysisError
    from search.report import analyze_experiments

    try:
        for line in analyze_experiments(args.directories, out=args.out, top=args.top):
            print(line)
    except AnalysisError as err:
        return _fail(str(err))
    return C.EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from search.storage import FileTargetError, file_target

    try:  # before search.export, which imports torch: a bad --out is refused at once
        file_target(args.out)
    except FileTargetError as err:
        return _fail(f"--out: {err}")
    from search.analysis import AnalysisError
    from search.export import export_model, export_summary
    from search.predict import ModelFileError

    try:
        meta = export_model(args.directory, out=args.out, trial_id=args.trial)
    except ModelFileError as err:  # --out refused, before the checkpoint is read
        return _fail(f"--out: {err}")
    except AnalysisError as err:
        return _fail(str(err))
    except OSError as err:  # the write itself (disk full...): --out is as it was
        return _fail(f"--out: {args.out}: not written ({err.strerror or err})", C.EXIT_FAILED)
    print(export_summary(meta, out=args.out))
    return C.EXIT_OK


def _unreadable(failures: Sequence[tuple[object, str]]) -> int:
    for path, why in failures:
        print(f"ftsearch: {path}: cannot read image ({why})", file=sys.stderr)
    return C.EXIT_BAD_INPUT if failures else C.EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from search.predict import ModelFileError, image_files, load_model, predict, prediction_lines

    if args.top < 1:
        return _fail(f"--top: must be >= 1 (got {args.top})")
    try:
        model, meta = load_model(args.model)
        files = image_files(args.path)
    except ModelFileError as err:
        return _fail(str(err))
    predictions, failures = predict(model, meta, files, top=args.top)
    for line in prediction_lines(predictions, root=args.path):
        print(line)
    return _unreadable(failures)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from search import evaluate as E
    from search.predict import ModelFileError, load_model
    from search.storage import FileTargetError

    try:  # before any work: the outputs of an earlier evaluation are not replaced unasked
        out = E.output_dir(args.out, folder=args.folder, force=args.force)
    except FileTargetError as err:
        return _fail(f"--out: {err}")
    try:
        model, meta = load_model(args.model)
        images = E.labelled_images(args.folder, meta["class_names"])  # before inference
    except ModelFileError as err:
        return _fail(str(err))
    result = E.evaluate(model, meta, images)
    try:
        written = E.write_evaluation(result, out)
    except OSError as err:
        return _fail(f"--out: {out}: not written ({err.strerror or err})", C.EXIT_FAILED)
    print("\n".join(E.summary_lines(result, meta, written)))
    return _unreadable(result.unreadable)


def _cmd_images(args: argparse.Namespace) -> int:
    from search.config import ConfigError
    from search.images import ImagesError, default_out, write_split
    from search.preflight import data_problems
    from search.transfer import load_target

    try:
        cfg = load_target(args.target, config_overrides(args))
        problems = data_problems(cfg)  # no trial runs: resources and weights do not matter
        if problems:
            return _fail("\n".join(problems))
        out = Path(args.out) if args.out else default_out(cfg, args.split)
        counts = write_split(cfg, split=args.split, out=out)
    except ConfigError as err:
        return _fail("\n".join(err.problems))
    except ImagesError as err:
        return _fail(str(err))
    except (ValueError, OSError) as err:  # data that cannot load, a full disk
        return _fail(f"images: {type(err).__name__}: {err}", C.EXIT_FAILED)
    print(f"wrote {sum(counts.values())} {args.split} images of {len(counts)} classes to "
          f"{out}/<class>/ (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    return C.EXIT_OK


def _cmd_submit(args: argparse.Namespace) -> int:
    from search.jobs import JobsError, submit_search

    overrides = config_overrides(args)
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
    return C.EXIT_OK


def _cmd_jobs(args: argparse.Namespace) -> int:
    from search import jobs

    try:
        if args.action == "list":
            for job in jobs.list_jobs(address=args.address):
                print(f"{job.job_id}\t{job.status}\t{job.metadata.get('ftsearch.experiment', '-')}")
            return C.EXIT_OK
        if not args.job:
            return _fail(f"jobs {args.action}: give the job id that `ftsearch submit` printed")
        if args.action == "status":
            job = (jobs.wait_for_job(args.job, address=args.address) if args.wait
                   else jobs.job_status(args.job, address=args.address))
            print(f"{job.job_id}\t{job.status}")
            if job.message:
                print(job.message)
            return C.EXIT_FAILED if args.wait and job.status != "SUCCEEDED" else C.EXIT_OK
        if args.action == "logs":
            if args.follow:
                for chunk in jobs.follow_logs(args.job, address=args.address):
                    print(chunk, end="", flush=True)
            else:
                print(jobs.job_logs(args.job, address=args.address), end="")
            return C.EXIT_OK
        stopped = jobs.stop_job(args.job, address=args.address)
        print(f"{args.job}: " + ("stop requested" if stopped else "was not running"))
        return C.EXIT_OK
    except jobs.JobsError as err:
        return _fail(str(err), err.code)


_COMMANDS = {
    "run": _cmd_run, "resume": _cmd_resume, "rank": _cmd_rank, "advise": _cmd_advise,
    "replay": _cmd_replay, "backbones": _cmd_backbones, "analyze": _cmd_analyze,
    "export": _cmd_export, "predict": _cmd_predict, "evaluate": _cmd_evaluate,
    "images": _cmd_images, "submit": _cmd_submit, "jobs": _cmd_jobs,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
