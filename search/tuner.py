"""Config -> ``ray.tune.Tuner``: scheduler, searcher, resources, storage, failure handling.

Everything here is assembly; the trial itself is
:func:`trainables.finetune.tune_trainable`, which receives plain dicts only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from search.callback import FailFast, ParquetCallback
from search.config import ExperimentConfig
from search.prior import Prior, order_points
from search.signing import SEARCH_GENERATOR_STATE, TUNER_STATE_FILE, sign_files
from search.space import (
    column_types,
    grid_points,
    make_define_by_run,
    make_sampler,
    sample_configs,
)
from search.storage import frozen_cache_dir, is_uri, replace_file, storage_root
from search.store import ResultsStore
from trainables import metrics as M
from trainables.finetune import tune_trainable

__all__ = [
    "PBT_MUTABLE",
    "build_scheduler",
    "build_searcher",
    "build_tuner",
    "preset_points",
    "restore_tuner",
    "results_store",
]

# Parameters PBT may mutate: they change the optimiser, not the model's shape,
# so a trial can continue from another's checkpoint with them.
PBT_MUTABLE = ("lr", "lr_scale", "weight_decay", "momentum", "label_smoothing")


def _primary(cfg: ExperimentConfig) -> tuple[str, str]:
    first = cfg.search.objectives[0]
    return first.metric, first.mode


class _HyperBand(HyperBandScheduler):
    """HyperBand that ends a bracket when the trial it waited for leaves it early.

    Ray's ``on_trial_remove`` processes a bracket only while it is unfinished. When the
    other trials of a bracket are paused at ``max_t`` and the one it waited for ends early
    (a classical head, complete at epoch 1; an error; a divergence), the bracket becomes
    finished by that removal and nothing stops the paused trials: the search never ends.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ending = False

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        bracket, _ = self._trial_info[trial]
        super().on_trial_remove(tune_controller, trial)
        if bracket.finished() and not self._ending:
            self._ending = True  # stopping a paused trial removes it too
            try:
                bracket.cleanup_full(tune_controller)
            finally:
                self._ending = False


class _ASHA(ASHAScheduler):
    """ASHA whose rungs hold only results of the fidelity they compare.

    A classical-head trial reports its final top-1 as epoch 1 (:data:`~trainables.metrics.
    COMPLETE`). Ray's ASHA records every completed trial in the rungs it reached, so that
    final result would sit in the epoch-1 rung beside SGD trials' first epochs, and a
    fine-tuning run that starts slowly (most do) would be stopped for not matching a
    finished fit. Measured on the digits-100 grid (BENCHMARKS.md section 3), TPE + ASHA then
    missed the grid's best by more than a point on 4 of 5 seeds.
    """

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result and result.get(M.COMPLETE):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


def build_scheduler(cfg: ExperimentConfig) -> TrialScheduler:
    """The trial scheduler; its time unit is the epoch."""
    # metric and mode come from TuneConfig (the first objective).
    s = cfg.scheduler
    max_t = s.max_t or cfg.epochs
    if s.type == "asha":
        return _ASHA(time_attr=M.EPOCH, max_t=max_t,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                             brackets=s.brackets)
    if s.type == "hyperband":
        return _HyperBand(time_attr=M.EPOCH, max_t=max_t, reduction_factor=s.reduction_factor)
    if s.type == "median":
        return MedianStoppingRule(time_attr=M.EPOCH,
                                  grace_period=s.grace_period,
                                  min_samples_required=s.min_samples_required)
    if s.type == "pbt":
        mutations = {}
        for key, dist in cfg.searched().items():
            if key not in PBT_MUTABLE:
                continue
            if dist.type == "choice":
                mutations[key] = list(dist.values or [])
            elif dist.type == "loguniform":
                mutations[key] = tune.loguniform(dist.low, dist.high)
            else:
                mutations[key] = tune.uniform(dist.low, dist.high)
        if not mutations:
            raise ValueError(f"scheduler.type: pbt needs at least one of {list(PBT_MUTABLE)} "
                             f"searched in space")
        return PopulationBasedTraining(
            time_attr=M.EPOCH,
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=mutations, quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability, synch=False)
    return FIFOScheduler()


def preset_points(cfg: ExperimentConfig) -> list[dict[str, Any]] | None:
    """Every trial's parameters when they are known up front, else None (Optuna proposes).

    A grid is a finite list of points; PBT refuses a search algorithm, so its
    initial population is sampled up front from the same space.
    """
    if not cfg.presets_trials():
        return None
    if cfg.search.algorithm == "grid":
        return grid_points(cfg)
    return sample_configs(cfg, cfg.search.num_samples)


def _param_space(cfg: ExperimentConfig, points: list[dict[str, Any]] | None) -> dict[str, Any]:
    space = cfg.fixed()
    # `train.cache_dir: null` turns the frozen-stage cache off.
    space.setdefault("cache_dir", frozen_cache_dir(cfg.storage, cfg.name))
    # Tune only lets preset points fill keys the param space already has.
    for point in points or ():
        space.update({k: None for k in point if k not in space})
    return space


class _OptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended.

    A diverged trial ends normally with its last finite top-1; reported as COMPLETE it
    would teach TPE that a NaN-producing region is merely mediocre: it is FAILED. A trial
    the scheduler stopped before ``max_t`` epochs is PRUNED, its value the last of the
    per-epoch values Tune already reported: as COMPLETE, its epoch-1 top-1 would stand
    beside other trials' final top-1 (a classical head's, say) and TPE would learn that
    slow starters are bad. Optuna's TPE ranks pruned trials by how far they got.
    """

    def __init__(self, *args: Any, max_t: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = max_t

    def _stopped_early(self, result: dict | None) -> bool:
        max_t = getattr(self, "_max_t", None)  # None in a searcher pickled before it existed
        return bool(max_t and result and not isinstance(self.metric, list)
                    and not result.get(M.COMPLETE) and result.get(M.EPOCH, max_t) < max_t)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result and result.get(M.DIVERGED):
            result, error = None, True
        if not error and self._stopped_early(result) and trial_id not in self._completed_trials:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def build_searcher(cfg: ExperimentConfig, points: list[dict[str, Any]] | None = None,
                   prior: Prior | None = None) -> Searcher | BasicVariantGenerator:
    """OptunaSearch over the define-by-run space, or a generator over preset ``points``.

    A ``prior`` (:mod:`search.prior`) puts its cells' trials first and leaves its pruned
    cells out: a grid's points are reordered and filtered, Optuna gets the cells' points
    enqueued first and a space limited to the kept depths and backbones.
    """
    if points is not None:
        if prior is not None:
            points = order_points(points, cfg, prior)
        return BasicVariantGenerator(points_to_evaluate=points,
                                     max_concurrent=cfg.search.max_concurrent or 0)
    warm = list(cfg.search.points_to_evaluate)
    if prior is not None:
        warm = prior.points + [p for p in warm if p not in prior.points]
    objectives = cfg.search.objectives
    metric: str | list[str] = [o.metric for o in objectives]
    mode: str | list[str] = [o.mode for o in objectives]
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
    # TuneConfig.max_concurrent_trials wraps this in a ConcurrencyLimiter.
    space = (make_define_by_run(prior.config(cfg), prior.depth_limits) if prior is not None
             else make_define_by_run(cfg))
    return _OptunaSearch(space=space, metric=metric, mode=mode,
                         points_to_evaluate=warm or None, sampler=make_sampler(cfg),
                         max_t=cfg.scheduler.max_t or cfg.epochs)


def results_store(cfg: ExperimentConfig) -> ResultsStore:
    """The results of ``cfg``'s experiment, as its callback writes them."""
    return ResultsStore(cfg.directory, **_store_args(cfg))


def _store_args(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"param_types": column_types(cfg), "max_epochs": cfg.scheduler.max_t or cfg.epochs,
            "objectives": [(o.metric, o.mode) for o in cfg.search.objectives]}


def _callbacks(cfg: ExperimentConfig, fail_fast: FailFast) -> list[Any]:
    # Remote storage is never resumed by ftsearch (resume takes a local directory).
    return [ParquetCallback(directory=cfg.directory, fail_fast=fail_fast,
                            sign_state=not is_uri(cfg.storage), **_store_args(cfg))]


def _trainable(cfg: ExperimentConfig) -> Any:
    resources = {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}
    return tune.with_resources(tune_trainable, resources)


def build_tuner(cfg: ExperimentConfig, *, prior: Prior | None = None) -> tune.Tuner:
    """A Tuner for ``cfg``, warm-started by ``prior``; results go to ``<storage>/<name>``."""
    metric, mode = _primary(cfg)
    points = preset_points(cfg)
    searcher = build_searcher(cfg, points, prior)
    if points is not None and prior is not None:
        points = order_points(points, cfg, prior)
    tune_config = tune.TuneConfig(
        metric=metric, mode=mode, search_alg=searcher,
        scheduler=build_scheduler(cfg),
        num_samples=cfg.search.num_samples if points is None else len(points),
        # BasicVariantGenerator limits concurrency itself.
        max_concurrent_trials=cfg.search.max_concurrent if points is None else None,
        time_budget_s=cfg.search.time_budget_s,
        # A reused actor keeps torch imported and the dataset decoded.
        reuse_actors=True,
    )
    fail_fast = FailFast()
    run_config = tune.RunConfig(
        name=cfg.name,
        storage_path=storage_root(cfg.storage),
        failure_config=tune.FailureConfig(max_failures=cfg.failure.max_failures),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode),
        callbacks=_callbacks(cfg, fail_fast),
        stop=fail_fast,
        verbose=0,
    )
    # Tune writes tuner.pkl here: signed at once, as resume will unpickle it.
    tuner = tune.Tuner(_trainable(cfg), param_space=_param_space(cfg, points),
                       tune_config=tune_config, run_config=run_config)
    if not is_uri(cfg.storage):
        sign_files(cfg.directory, [Path(cfg.directory, TUNER_STATE_FILE)])
    return tuner


def restore_tuner(cfg: ExperimentConfig) -> tune.Tuner:
    """Resumes the experiment of ``cfg``: unfinished and errored trials continue.

    The callbacks and stopper are built anew for ``cfg.directory``, never taken from the
    pickled tuner: a copied experiment directory resumes into itself, not the original.
    Its Tune state files must have been verified (:mod:`search.signing`) before this.
    """
    _update_search_state(cfg)
    tuner = tune.Tuner.restore(cfg.directory, trainable=_trainable(cfg),
                               resume_unfinished=True, resume_errored=True,
                               param_space=_param_space(cfg, preset_points(cfg)))
    # Tuner has no public setter for a restored config; TunerInternal holds the objects
    # fit() uses. What a resume may change (search.changes.RESUMABLE_FIELDS) is set here.
    internal = tuner._local_tuner
    run_config = internal.get_run_config()
    fail_fast = FailFast()
    run_config.callbacks = _callbacks(cfg, fail_fast)
    run_config.stop = fail_fast
    run_config.failure_config = tune.FailureConfig(max_failures=cfg.failure.max_failures)
    internal._tune_config.time_budget_s = cfg.search.time_budget_s
    if not cfg.presets_trials():
        internal._tune_config.num_samples = cfg.search.num_samples
        internal._tune_config.max_concurrent_trials = cfg.search.max_concurrent
    return tuner


def _update_search_state(cfg: ExperimentConfig) -> None:
    """Writes ``num_samples`` and ``max_concurrent`` into the saved search state.

    On restore Tune takes both from the saved state of its search generator and concurrency
    limiter, not from the TuneConfig, so a resume that raises them edits that state (a file
    whose signature was just verified) and signs the new version.
    """
    if is_uri(cfg.storage) or cfg.presets_trials():
        return
    saved = sorted(Path(cfg.directory).glob(SEARCH_GENERATOR_STATE))
    if not saved:
        return
    import ray.cloudpickle as cloudpickle

    newest = saved[-1]  # the one Tune loads
    state = cloudpickle.loads(newest.read_bytes())
    state["total_samples"] = cfg.search.num_samples
    state["finished"] = state.get("counter", 0) >= cfg.search.num_samples
    limiter = state.get("name:ConcurrencyLimiter")
    if isinstance(limiter, dict) and cfg.search.max_concurrent:
        limiter["max_concurrent"] = cfg.search.max_concurrent
    replace_file(newest, cloudpickle.dumps(state))
    sign_files(cfg.directory, [newest])
