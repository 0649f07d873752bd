"""The ``ftsearch`` command line's grammar: every command and its arguments, declared once.

:mod:`search.cli` holds what each command does; this module only says how it is spelled.
``run``, ``rank``, ``advise``, ``images`` and ``submit`` take a config and the same three
ways to change it (:func:`add_override_arguments`), so their spelling, help and meaning
cannot drift apart.
"""

from __future__ import annotations

import argparse

from search.changes import RESUMABLE_FIELDS
from search.images import SPLITS
from search.session import job_address

__all__ = ["add_override_arguments", "build_parser", "config_overrides"]


def add_override_arguments(parser: argparse.ArgumentParser, *, storage_help: str) -> None:
    """Adds ``--set`` (repeatable), ``--name`` and ``--storage`` to ``parser``.

    Args:
        parser: A command's parser.
        storage_help: What ``--storage`` names for this command (a local directory, a URI).
    """
    parser.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--name", help="experiment name (overrides `name`)")
    parser.add_argument("--storage", help=f"{storage_help} (overrides `storage`)")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items, then ``--name`` and ``--storage`` as the overrides they stand for."""
    found = list(args.set or [])
    if args.name:
        found.append(f"name={args.name}")
    if args.storage:
        found.append(f"storage={args.storage}")
    return found


_ADDRESS_HELP = ("join a running Ray cluster: `auto` (the one `ray start` started on this "
                 "machine) or HOST:PORT. Default: start a new Ray on this machine, bound "
                 "to 127.0.0.1, whatever other clusters run here")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The parser of every command; ``args.command`` names the one given."""
    parser = argparse.ArgumentParser(prog="ftsearch", description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a search from a YAML config")
    run.add_argument("config", help="experiment YAML file")
    add_override_arguments(run, storage_help="results directory or URI")
    run.add_argument("--address", default=job_address(), help=_ADDRESS_HELP)

    resume = sub.add_parser("resume", help="continue an interrupted experiment")
    resume.add_argument("directory", help="the experiment directory (<storage>/<name>)")
    resume.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="change a field that a resume may change (repeatable): "
                             + ", ".join(RESUMABLE_FIELDS))
    resume.add_argument("--trust", action="store_true",
                        help="load Tune state files whose signature does not verify (they "
                             "are unpickled: only for files you know where they came from)")
    resume.add_argument("--address", default=job_address(), help=_ADDRESS_HELP)

    rank = sub.add_parser("rank", help="rank (backbone, depth) cells by transferability "
                                       "before training (no Ray)")
    rank.add_argument("target", metavar="CONFIG", help="experiment YAML file, or an "
                                                       "experiment directory")
    add_override_arguments(rank, storage_help="results directory")
    rank.add_argument("--top", type=int, default=None, help="cells shown (default: all)")

    advise = sub.add_parser("advise", help="measure data size and similarity, place the data "
                                           "in a fine-tuning quadrant, write a narrowed config")
    advise.add_argument("target", metavar="CONFIG", help="experiment YAML file, or an "
                                                         "experiment directory")
    advise.add_argument("--out", help="config to write (default: CONFIG's stem + "
                                      "-advised.yaml beside it)")
    advise.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_override_arguments(advise, storage_help="results directory")

    replay = sub.add_parser("replay", help="replay a finished grid experiment as a benchmark "
                                           "of search strategies (seconds, no training)")
    replay.add_argument("directory", metavar="GRID_EXPERIMENT",
                        help="a finished grid experiment directory (<storage>/<name>)")
    replay.add_argument("--method", action="append", metavar="SPEC",
                        help="searcher[+scheduler][+prior]: grid, random, tpe; asha; prior "
                             "(repeatable; default: grid, random, tpe+asha, tpe+asha+prior)")
    replay.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    replay.add_argument("--budget", type=int, default=None,
                        help="epochs each search may spend (default: the grid's total)")
    replay.add_argument("--within", type=float, default=1.0,
                        help="points below the grid's best that count as reached (default 1)")

    backbones = sub.add_parser("backbones", help="list the backbones")
    backbones.add_argument("--json", action="store_true", help="print a JSON list")

    analyze = sub.add_parser("analyze", help="leaderboard, importance, plots, report, best.yaml "
                                             "(reads the Parquet files only, no Ray)")
    analyze.add_argument("directories", nargs="+", metavar="DIR",
                         help="experiment directories (<storage>/<name>); several are compared")
    analyze.add_argument("--out", help="output folder (default: DIR/analysis for one DIR, "
                                       "./analysis for several)")
    analyze.add_argument("--top", type=int, default=10, help="leaderboard rows (default 10)")

    export = sub.add_parser("export", help="a trial's checkpoint as one standalone model file")
    export.add_argument("directory", help="the experiment directory (<storage>/<name>)")
    export.add_argument("--trial", help="trial id (default: the best finished trial)")
    export.add_argument("--out", default="model.pt",
                        help="model file to write or replace, a regular file (default model.pt)")

    predict = sub.add_parser("predict", help="class probabilities of images, from a model file")
    predict.add_argument("model", help="a file written by `ftsearch export`")
    predict.add_argument("path", help="an image file, or a folder of images (subfolders too)")
    predict.add_argument("--top", type=int, default=5, help="classes per image (default 5)")

    evaluate = sub.add_parser("evaluate", help="top-1, top-5, per-class accuracy and confusion "
                                               "matrix of a model file on labelled images")
    evaluate.add_argument("model", help="a file written by `ftsearch export`")
    evaluate.add_argument("folder", help="one subfolder of images per class, named as the "
                                         "model's classes")
    evaluate.add_argument("--out", help="folder for predictions.csv, per_class.csv, "
                                        "confusion.png (default: FOLDER-evaluation beside it)")
    evaluate.add_argument("--force", action="store_true",
                          help="replace those files where --out holds them")

    images = sub.add_parser("images", help="a config's train or validation images as a "
                                           "folder per class (for predict and evaluate)")
    images.add_argument("target", metavar="CONFIG", help="experiment YAML file, or an "
                                                         "experiment directory")
    images.add_argument("--split", choices=SPLITS, default="val",
                        help="which split every trial of CONFIG gets (default val)")
    images.add_argument("--out", help="an absent or empty folder (default: "
                                      "<storage>/<name>-<split>)")
    add_override_arguments(images, storage_help="results directory")

    submit = sub.add_parser("submit", help="run a search on a Ray cluster, as a Ray job")
    submit.add_argument("config", help="experiment YAML file, inside the uploaded directory")
    submit.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 "
                                          "(default: $RAY_API_SERVER_ADDRESS)")
    add_override_arguments(submit, storage_help="results path on the cluster or URI")
    submit.add_argument("--working-dir", help="directory uploaded as the job's working dir "
                                              "(default: the ftsearch project)")

    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted search")
    jobs.add_argument("action", choices=["status", "logs", "stop", "list"])
    jobs.add_argument("job", nargs="?", help="the job id `ftsearch submit` printed")
    jobs.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 "
                                        "(default: $RAY_API_SERVER_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    jobs.add_argument("--wait", action="store_true",
                      help="status: wait until the job ends; exit 1 unless it SUCCEEDED")
    return parser
