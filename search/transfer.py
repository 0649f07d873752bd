"""``ftsearch rank``: (backbone, depth) cells ranked by transferability, before training.

For every pretrained backbone a config can sample, :func:`trainables.ranking.score_stages`
scores the pooled output of each stage on the training split (one forward pass, through the
experiment's frozen-stage cache); :func:`rank_config` ranks all cells by LogME and
:func:`write_ranking` stores them as ``transferability.parquet`` in the experiment
directory. ``ftsearch rank`` runs the jobs in its own process; a search with
``search.prior: transferability`` runs them as Ray tasks holding a trial's resources.
Reading and formatting the table needs neither torch nor Ray.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from search import contract as C
from search.analysis import Experiment, trial_config
from search.config import ExperimentConfig, load_config
from search.prior import cell_of, space_cells
from search.storage import frozen_cache_dir, is_uri, replace_file
from trainables import metrics as M
from trainables.params import EFFICIENTNET_KEYS

__all__ = [
    "RankingError",
    "cell_outcomes",
    "experiment_cells",
    "format_ranking",
    "kendall_tau",
    "load_target",
    "rank_config",
    "ranking_jobs",
    "ray_runner",
    "read_ranking",
    "timed_rank",
    "write_ranking",
]

# Parameters that say which cell a trial is; a ranking job scores every cell itself.
_CELL_KEYS = ("head", "head_init", "features_from", "freeze_depth", "freeze_fraction",
              "unfreeze_at_epoch")

Runner = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


class RankingError(ValueError):
    """A config with nothing to rank, or an unreadable ranking file."""


def load_target(target: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config of ``target``: a YAML file, or an experiment directory (its config.yaml,
    placed where the directory is, so a copied experiment is ranked in place).

    Raises:
        search.config.ConfigError: An invalid config, or a directory without config.yaml.
    """
    path = Path(target)
    if path.is_dir():
        config = path / C.CONFIG_FILE
        if not config.is_file():
            from search.config import ConfigError

            raise ConfigError([f"{path}: not an experiment directory (no {C.CONFIG_FILE}) "
                               f"and not a config file"])
        resolved = path.resolve()
        return load_config(config, [f"storage={resolved.parent}", f"name={resolved.name}",
                                    *overrides])
    return load_config(path, overrides)


def ranking_jobs(cfg: ExperimentConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """One trial dict per pretrained (backbone, weights) of ``cfg``, and why others are not.

    Raises:
        RankingError: No backbone of the space has pretrained weights.
    """
    fixed = {k: v for k, v in cfg.fixed().items() if k not in _CELL_KEYS}
    searched = cfg.searched()
    jobs, notes = [], []
    for _, backbone, weights in cfg.weights_choices():
        if weights == "none":
            notes.append(f"{backbone}: weights 'none', nothing pretrained to score")
            continue
        if backbone == "efficientnet" and set(EFFICIENTNET_KEYS) & set(searched):
            notes.append("efficientnet: its coefficients are searched, so its stages differ "
                         "from trial to trial")
            continue
        job = {**fixed, "backbone": backbone, "weights": weights,
               "cache_dir": fixed.get("cache_dir", frozen_cache_dir(cfg.storage, cfg.name))}
        if "resolution" in searched:
            job.pop("resolution", None)  # the backbone's default
        jobs.append(job)
    if not jobs:
        raise RankingError(f"nothing to rank: no backbone of {cfg.backbone_choices()} has "
                           f"pretrained weights")
    return jobs, notes


def _local(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from trainables.ranking import score_stages

    return [score_stages(job) for job in jobs]


def rank_config(cfg: ExperimentConfig, *, run: Runner | None = None
                ) -> tuple[pd.DataFrame, list[str]]:
    """Every cell of ``cfg``'s pretrained backbones, ranked; and notes on skipped ones.

    Args:
        cfg: The experiment.
        run: Runs the jobs and returns :func:`~trainables.ranking.score_stages`'s dicts in
            order; default: one after the other in this process.
    """
    jobs, notes = ranking_jobs(cfg)
    results = (run or _local)(jobs)
    cells = space_cells(cfg)
    rows = []
    for result in results:
        kinds = cells.get(result["backbone"], {})
        for cell in result["cells"]:
            depth = cell["depth"]
            rows.append({
                "backbone": result["backbone"], "weights": result["weights"], "depth": depth,
                "stages": result["stages"], "resolution": result["resolution"],
                "feature_dim": cell["feature_dim"],
                **{name: cell[name] for name in M.TRANSFER_SCORES},
                "in_space": depth in kinds.get("linear", []) + kinds.get("classical", []),
                "score_seconds": cell["score_seconds"],
                "feature_seconds": result["feature_seconds"],
                "backbone_seconds": result["seconds"],
                "backbone_cpu_seconds": result["cpu_seconds"],
                "train_images": result["train_images"], "classes": result["classes"]})
    table = pd.DataFrame(rows).sort_values(
        [C.TRANSFER_SCORE, "backbone", "depth"], ascending=[False, True, True], kind="stable")
    table.insert(C.TRANSFERABILITY_COLUMNS.index("rank"), "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)[list(C.TRANSFERABILITY_COLUMNS)], notes


def write_ranking(directory: str, table: pd.DataFrame) -> str:
    """Writes ``table`` as ``<directory>/transferability.parquet`` atomically; its path."""
    arrow = pa.Table.from_pandas(table, preserve_index=False).replace_schema_metadata(
        {b"ftsearch.schema_version": C.SCHEMA_VERSION.encode()})
    if is_uri(directory):
        fs, root = pafs.FileSystem.from_uri(directory)
        path = f"{root}/{C.TRANSFERABILITY_FILE}"
        pq.write_table(arrow, path, filesystem=fs)  # an object store's put is atomic
        return f"{directory}/{C.TRANSFERABILITY_FILE}"
    buffer = io.BytesIO()
    pq.write_table(arrow, buffer)
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / C.TRANSFERABILITY_FILE
    replace_file(path, buffer.getvalue())
    return str(path)


def read_ranking(directory: str | Path) -> pd.DataFrame | None:
    """``transferability.parquet`` of a local experiment directory, or None when absent.

    Raises:
        RankingError: The file is unreadable or lacks the contract's columns.
    """
    path = Path(directory) / C.TRANSFERABILITY_FILE
    if not path.is_file():
        return None
    try:
        with path.open("rb") as file:
            table = pq.read_table(file).to_pandas()
    except (pa.ArrowException, OSError) as err:
        raise RankingError(f"{path}: unreadable Parquet file ({err})") from None
    missing = [c for c in C.TRANSFERABILITY_COLUMNS if c not in table.columns]
    if missing:
        raise RankingError(f"{path}: missing column(s) {missing}")
    return table


def format_ranking(table: pd.DataFrame, notes: Sequence[str] = (), *, top: int | None = None
                   ) -> list[str]:
    """The ranking as text: one line per cell (best first), then one per backbone."""
    shown = table if top is None else table.head(top)
    lines = [f"{'rank':>4}  {'backbone':<18} {'depth':>5} {'LogME':>8} {'H-score':>8} "
             f"{'dim':>5}  in space  {'s':>6}"]
    for r in shown.itertuples():
        lines.append(f"{r.rank:>4}  {r.backbone:<18} {r.depth:>3}/{r.stages:<1} "
                     f"{getattr(r, M.LOGME):>8.3f} {getattr(r, M.HSCORE):>8.2f} "
                     f"{r.feature_dim:>5}  {'yes' if r.in_space else 'no':<8}  "
                     f"{r.score_seconds:>6.2f}")
    if top is not None and len(table) > top:
        lines.append(f"  ... {len(table) - top} more cells")
    for backbone, group in table.groupby("backbone", sort=False):
        first = group.iloc[0]
        features = ("read from the frozen-stage cache" if first.feature_seconds == 0
                    else f"one forward pass {first.feature_seconds:.1f} s")
        lines.append(f"{backbone} ({first.weights}, {first.resolution} px): {len(group)} stage "
                     f"outputs of {first.train_images} training images, {features}; "
                     f"{first.backbone_seconds:.1f} s in all")
    lines += [f"skipped {note}" for note in notes]
    return lines


def cell_outcomes(trials: pd.DataFrame, configs: Sequence[Mapping[str, Any]],
                  ranking: pd.DataFrame) -> pd.DataFrame:
    """Each ranked cell beside the best top-1 its finished trials reached.

    Args:
        trials: trials.parquet rows.
        configs: Each row's whole flat trial config (:func:`search.analysis.trial_config`).
        ranking: transferability.parquet.

    Returns:
        The ranking's cells that some finished trial trained on, with ``best_top1`` and
        ``trials`` (how many), best score first.
    """
    outcomes: dict[tuple[str, int], list[float]] = {}
    for (_, row), config in zip(trials.iterrows(), configs, strict=True):
        cell = cell_of(config)
        if cell and row["status"] in C.FINISHED and pd.notna(row["best_top1"]):
            outcomes.setdefault(cell, []).append(float(row["best_top1"]))
    table = pd.DataFrame([{"backbone": b, "depth": d, "best_top1": max(v), "trials": len(v)}
                          for (b, d), v in outcomes.items()],
                         columns=["backbone", "depth", "best_top1", "trials"])
    keep = ["backbone", "depth", *M.TRANSFER_SCORES, "rank"]
    return ranking[keep].merge(table, on=["backbone", "depth"]).sort_values("rank")


def experiment_cells(experiment: Experiment) -> pd.DataFrame | None:
    """:func:`cell_outcomes` of an experiment with a ranking, or None without one."""
    ranking = read_ranking(experiment.directory)
    if ranking is None:
        return None
    configs = [trial_config(experiment, row) for _, row in experiment.trials.iterrows()]
    return cell_outcomes(experiment.trials, configs, ranking)


def kendall_tau(cells: pd.DataFrame, score: str = C.TRANSFER_SCORE) -> float:
    """Kendall's tau-b between ``score`` and ``best_top1`` over ``cells`` (NaN below 3)."""
    if len(cells) < 3:
        return math.nan
    from scipy.stats import kendalltau

    return float(kendalltau(cells[score], cells["best_top1"]).statistic)


def ray_runner(cfg: ExperimentConfig) -> Runner:
    """Runs ranking jobs as Ray tasks, one per backbone, each with a trial's resources."""
    def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import ray

        from trainables.ranking import score_stages

        task = ray.remote(score_stages).options(
            num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu, max_retries=0)
        threads = max(1, int(cfg.resources.cpu))
        return ray.get([task.remote(job, threads=threads) for job in jobs])

    return run


def timed_rank(cfg: ExperimentConfig, *, run: Runner | None = None
               ) -> tuple[pd.DataFrame, list[str], float]:
    """:func:`rank_config` and the wall seconds it took."""
    t0 = time.perf_counter()
    table, notes = rank_config(cfg, run=run)
    return table, notes, time.perf_counter() - t0
