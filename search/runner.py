"""``ftsearch run`` and ``ftsearch resume``: checks, the lock, Ray, the tuner, the summary.

The order is the product's promise: every check that needs no cluster runs before Ray
starts (config, resume changes, pre-flight, the experiment lock, the signatures of the
state a resume would unpickle), the experiment directory is created only once they all
pass, and the summary of the run is the last thing printed. A run that fails or is
interrupted leaves no trial RUNNING in trials.parquet.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from search import contract as C
from search.changes import config_changes, record_changes, refused_changes, write_config
from search.config import ConfigError, ExperimentConfig, load_config
from search.lock import ExperimentLock, LockedError
from search.preflight import preflight_problems
from search.signing import (
    TUNER_STATE_FILE,
    SignatureError,
    key_file,
    tune_state_files,
    unsigned_files,
)
from search.storage import is_uri

if TYPE_CHECKING:
    from search.prior import Prior

__all__ = ["resume_search", "run_search"]

# Enough for both Parquet files of a search of thousands of trials.
_RESERVE_BYTES = 8 * 2**20


def _refuse(problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"ftsearch: {problem}", file=sys.stderr)
    return C.EXIT_BAD_INPUT


def _has_results(directory: Path) -> bool:
    journal = directory / C.JOURNAL_FILE
    return (directory / C.TRIALS_FILE).exists() or (journal.exists() and
                                                     journal.stat().st_size > 0)


def _started(directory: Path) -> bool:
    """Whether a search ran here: Tune saved its experiment state, or results exist.

    A driver killed between writing config.yaml and Tune's first save leaves neither:
    such a directory is started afresh by ``run`` or ``resume``.
    """
    saved_state = [p for p in tune_state_files(directory) if p.name != TUNER_STATE_FILE]
    return bool(saved_state) or _has_results(directory)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    with ExperimentLock(directory):
        yield
    lock_only = {C.LOCK_FILE, C.LOCK_OWNER_FILE}
    if created and set(os.listdir(directory)) <= lock_only:
        # A run refused once Ray was up (the cluster cannot serve it) wrote nothing but the
        # lock: leave no directory behind.
        for name in lock_only:
            (directory / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()


@contextlib.contextmanager
def _space_reserve(cfg: ExperimentConfig) -> Iterator[None]:
    """A few MB held on the experiment's disk while the search runs, for :func:`_close_out`.

    A search usually fails for lack of disk space when checkpoints fill it; then even the
    small Parquet files that record how it ended cannot be written. Giving this space back
    first lets them be written. Remote storage gets none.
    """
    if is_uri(cfg.storage):
        yield
        return
    reserve = Path(cfg.directory) / C.RESERVE_FILE
    try:
        with reserve.open("wb") as handle:  # real bytes: a sparse file reserves nothing
            handle.write(bytes(_RESERVE_BYTES))
    except OSError:  # already full: the run goes on without one
        reserve.unlink(missing_ok=True)
    try:
        yield
    finally:
        reserve.unlink(missing_ok=True)


def _close_out(cfg: ExperimentConfig) -> None:
    """After a failed or interrupted fit: no trial stays RUNNING in trials.parquet."""
    from search.tuner import results_store

    try:  # _space_reserve gave its space back before this runs
        store = results_store(cfg)
        store.interrupt_unfinished()
        # Always: the callback may have journaled the end of the run but failed to write it.
        store.write()
    except OSError as err:  # disk full: the journal keeps what the files lack
        print(f"ftsearch: could not update the results files ({err.strerror or err}); "
              f"`ftsearch resume {cfg.directory}` completes them", file=sys.stderr)


def _search(cfg: ExperimentConfig, *, address: str | None, resume: bool) -> int:
    from search import session

    session.start_ray(address=address)
    try:
        problem = session.cluster_problems(cfg)
        if problem:
            return _refuse([problem])
        if not resume and not is_uri(cfg.storage):
            _start_fresh(cfg)  # only once every check passed: a refused run leaves nothing
        prior = None
        if not resume and cfg.search.prior == "transferability":
            # On resume Tune restores the searcher this prior built: it is not ranked again.
            try:
                prior = _transferability_prior(cfg)
            except Exception as err:  # noqa: BLE001 - a worker's error, reported once
                print(f"ftsearch: transferability ranking failed: "
                      f"{str(err).strip().splitlines()[-1]}", file=sys.stderr)
                return C.EXIT_FAILED
        from search.tuner import build_tuner, restore_tuner

        tuner = restore_tuner(cfg) if resume else build_tuner(cfg, prior=prior)
        try:
            with _space_reserve(cfg):
                tuner.fit()
        except BaseException as err:  # the search itself broke (or Ctrl-C), not one trial
            _close_out(cfg)
            if not isinstance(err, Exception):
                raise
            print(f"ftsearch: the search failed: {err}", file=sys.stderr)
            return C.EXIT_FAILED
    finally:
        session.stop_ray()
    from search.analysis import run_summary  # pandas: not on the path of a refused run

    lines, ok = run_summary(cfg.directory, cfg.search.points_to_evaluate)
    print("\n".join(lines), flush=True)
    return C.EXIT_OK if ok else C.EXIT_FAILED


def _transferability_prior(cfg: ExperimentConfig) -> Prior:
    """Ranks the cells as Ray tasks with a trial's resources; prints what the prior does."""
    from search.prior import build_prior
    from search.transfer import ray_runner, timed_rank, write_ranking

    table, notes, seconds = timed_rank(cfg, run=ray_runner(cfg))
    write_ranking(cfg.directory, table)
    prior = build_prior(cfg, table)
    cells = ", ".join(f"{b} depth {d}" for b, d in prior.cells) or "none in the space"
    print(f"transferability prior: {len(table)} cells ranked in {seconds:.1f} s "
          f"({C.TRANSFERABILITY_FILE}); first trials: {cells}", flush=True)
    if prior.pruned:
        print(f"pruned {len(prior.pruned)} cells below search.prune_below: "
              + ", ".join(f"{b} depth {d}" for b, d in prior.pruned), flush=True)
    for note in notes:
        print(f"  not ranked: {note}", flush=True)
    return prior


def _start_fresh(cfg: ExperimentConfig) -> None:
    # Nothing ran: Tune files left by a driver killed before its first save hold no trial.
    for leftover in tune_state_files(cfg.directory):
        leftover.unlink()
    write_config(cfg)


def run_search(config: str | Path, *, overrides: Sequence[str], address: str | None) -> int:
    """Validates ``config``, checks this machine, then runs the search; returns an exit code."""
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        return _refuse(err.problems)
    if is_uri(cfg.storage):
        problems = preflight_problems(cfg, local=address is None)
        return _refuse(problems) if problems else _announce_and_search(cfg, address, resume=False)
    directory = Path(cfg.directory)
    taken = [f"experiment directory {directory} already holds a run; continue it with "
             f"`ftsearch resume {directory}` or pick another --name"]
    try:
        ExperimentLock(directory).check_free()  # a running driver: name it
        if _started(directory):
            return _refuse(taken)
        problems = preflight_problems(cfg, local=address is None)
        if problems:
            return _refuse(problems)
        with _locked(directory):
            if _started(directory):  # another run got there between the checks
                return _refuse(taken)
            return _announce_and_search(cfg, address, resume=False)
    except LockedError as err:
        return _refuse([str(err)])


def _announce_and_search(cfg: ExperimentConfig, address: str | None, *, resume: bool) -> int:
    if resume:
        print(f"resuming experiment {cfg.name} in {cfg.directory}", flush=True)
    else:
        print(f"experiment {cfg.name}: results in {cfg.directory}", flush=True)
    return _search(cfg, address=address, resume=resume)


def _resume_config(directory: Path, overrides: Sequence[str]
                   ) -> tuple[ExperimentConfig, dict, list[str]]:
    """(config to resume with, its changes, problems) for the experiment in ``directory``."""
    config_file = directory / C.CONFIG_FILE
    # Paths come from the directory being resumed, never from what it recorded: a copied
    # experiment resumes into itself.
    place = [f"storage={directory.parent}", f"name={directory.name}"]
    saved = load_config(config_file, place)
    cfg = load_config(config_file, [*place, *overrides])
    changes = config_changes(saved, cfg)
    return cfg, changes, refused_changes(changes, preset_points=cfg.presets_trials())


def resume_search(directory: str | Path, *, overrides: Sequence[str] = (),
                  address: str | None, trust: bool = False) -> int:
    """Continues the experiment in ``directory``; returns an exit code.

    Args:
        directory: ``<storage>/<name>`` of a local experiment.
        overrides: ``--set`` changes; only :data:`search.changes.RESUMABLE_FIELDS`.
        address: A Ray cluster to join, or None for a local Ray.
        trust: Load Tune state files even when their signatures do not verify.
    """
    directory = Path(directory).resolve()
    config_file = directory / C.CONFIG_FILE
    try:
        if directory.is_dir():  # a driver still starting has no config.yaml yet: name it
            ExperimentLock(directory).check_free()
    except LockedError as err:
        return _refuse([str(err)])
    if not config_file.is_file():
        return _refuse([f"{directory} is not an ftsearch experiment directory (no "
                        f"{C.CONFIG_FILE})"])
    try:
        cfg, changes, refused = _resume_config(directory, overrides)
    except ConfigError as err:
        if not _started(directory):
            return _refuse([f"{config_file}: {err.problems[0]}; no trial ever ran in "
                            f"{directory}: delete it and start again with `ftsearch run`"])
        return _refuse([f"{config_file}: {p}" for p in err.problems])
    if refused:
        return _refuse(refused)
    problems = preflight_problems(cfg, local=address is None)
    if problems:
        return _refuse(problems)
    try:
        with _locked(directory):
            if not _started(directory):
                print(f"experiment {cfg.name} never started (its driver stopped before Tune "
                      f"saved any state): starting it now", flush=True)
                return _announce_and_search(cfg, address, resume=False)
            problem = None if trust else _signature_problem(directory)
            if problem:
                return _refuse([problem])
            if changes:
                record_changes(cfg, changes)
                print("resume changes " + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new)
                                                    in changes.items()), flush=True)
            return _announce_and_search(cfg, address, resume=True)
    except LockedError as err:
        return _refuse([str(err)])


def _signature_problem(directory: Path) -> str | None:
    try:
        unsigned = unsigned_files(directory)
    except SignatureError as err:
        return str(err)
    if not unsigned:
        return None
    return (f"{directory / unsigned[0]}: not signed by this user's ftsearch key "
            f"({key_file()}){f' (and {len(unsigned) - 1} more)' if len(unsigned) > 1 else ''}"
            f"; Tune would unpickle it, which runs any code it holds. It was changed, or "
            f"written by another user or machine: resume with --trust only if you know "
            f"where it came from")
