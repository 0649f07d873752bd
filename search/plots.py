"""Static PNG plots of one or several experiments (matplotlib, no display needed).

Figures are built with :class:`matplotlib.figure.Figure` directly, never
through pyplot, so no global backend or figure registry is touched (Agg
renders the PNG). Colour encodes the backbone and, across several
experiments, the marker shape encodes the experiment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from search.analysis import Experiment, trial_config
from search.contract import TRANSFER_SCORE, Status, pareto_mask
from search.importance import Importance
from search.transfer import experiment_cells, kendall_tau
from trainables.models import resolve_efficientnet_coefficients
from trainables.params import trial_defaults

__all__ = ["PLOTS", "trial_frame", "write_plots"]

# File name -> title, in the order the report shows them.
PLOTS = {
    "freeze_depth.png": "Top-1 against frozen stages, per backbone",
    "lr_scale.png": "Top-1 against the backbone's learning-rate scale",
    "pareto.png": "Top-1 against compute, with the Pareto front",
    "learning_curves.png": "Learning curves",
    "efficientnet.png": "EfficientNet: top-1 over width x depth, coloured by resolution",
    "importance.png": "Hyperparameter importance for top-1",
    "transferability.png": "Transferability before training against best top-1, per cell",
}
_MARKERS = "osD^vPX*<>"
_TOP1 = "best validation top-1 (%)"
_KEYS = ("backbone", "freeze_depth", "lr_scale", "width_mult", "depth_mult", "resolution", "phi",
         "alpha", "beta", "gamma")


def trial_frame(experiments: Sequence[Experiment], board: pd.DataFrame) -> pd.DataFrame:
    """One row per leaderboard trial with a result: its full parameters (fixed ones too)."""
    by_name = {e.name: e for e in experiments}
    rows = []
    defaults = trial_defaults()
    for _, row in board[board["best_top1"].notna()].iterrows():
        cfg = {**defaults, **trial_config(by_name[row["experiment"]], row)}
        rows.append({**{k: cfg.get(k) for k in _KEYS},
                     **{k: row[k] for k in ("experiment", "trial_id", "status", "best_top1",
                                            "gmacs", "epochs")}})
    return pd.DataFrame(rows, columns=[*_KEYS, "experiment", "trial_id", "status", "best_top1",
                                       "gmacs", "epochs"])


def _styles(frame: pd.DataFrame) -> tuple[dict[str, Any], dict[str, str]]:
    colours = {b: f"C{i % 10}" for i, b in enumerate(sorted(frame["backbone"].unique()))}
    markers = {x: _MARKERS[i % len(_MARKERS)]
               for i, x in enumerate(dict.fromkeys(frame["experiment"]))}
    return colours, markers


def _legend(ax: Any, frame: pd.DataFrame, *, extra: Sequence[Line2D] = ()) -> None:
    colours, markers = _styles(frame)
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=b)
               for b, c in colours.items()]
    if len(markers) > 1:
        handles += [Line2D([], [], color="grey", marker=m, linestyle="", label=x)
                    for x, m in markers.items()]
    # Outside the axes: a legend never hides a point.
    ax.legend(handles=[*handles, *extra], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


def _scatter(ax: Any, frame: pd.DataFrame, x: str, *, jitter: float = 0.0) -> None:
    colours, markers = _styles(frame)
    for (backbone, exp), part in frame.groupby(["backbone", "experiment"], sort=False):
        offset = (sorted(colours).index(backbone) - (len(colours) - 1) / 2) * jitter
        ax.scatter(part[x].astype(float) + offset, part["best_top1"], color=colours[backbone],
                   marker=markers[exp], s=40, alpha=0.85, edgecolors="black", linewidths=0.4)


def _figure(title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _freeze_depth(frame: pd.DataFrame) -> Figure | None:
    data = frame.dropna(subset=["freeze_depth"])
    if data.empty:
        return None
    fig, ax = _figure(PLOTS["freeze_depth.png"])
    colours, _ = _styles(data)
    _scatter(ax, data, "freeze_depth", jitter=0.12)
    for backbone, part in data.groupby("backbone"):
        # The best trial at each depth: where freezing starts to hurt.
        best = part.groupby("freeze_depth")["best_top1"].max()
        ax.plot(best.index.astype(float), best.values, color=colours[backbone], alpha=0.5)
    ax.set_xlabel("freeze_depth (leading backbone stages frozen; 0 = train all)")
    ax.set_ylabel(_TOP1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(ax, data, extra=[Line2D([], [], color="grey", alpha=0.5, label="best per depth")])
    return fig


def _lr_scale(frame: pd.DataFrame) -> Figure | None:
    data = frame[pd.to_numeric(frame["lr_scale"], errors="coerce") > 0]
    if data.empty:
        return None
    fig, ax = _figure(PLOTS["lr_scale.png"])
    _scatter(ax, data, "lr_scale")
    ax.set_xscale("log")
    ax.set_xlabel("lr_scale = backbone learning rate / head learning rate (log scale)")
    ax.set_ylabel(_TOP1)
    _legend(ax, data)
    return fig


def _pareto(frame: pd.DataFrame) -> Figure | None:
    data = frame.dropna(subset=["gmacs"])
    if data.empty:
        return None
    fig, ax = _figure(PLOTS["pareto.png"])
    _scatter(ax, data, "gmacs")
    on_front = pareto_mask(data[["gmacs", "best_top1"]].to_numpy(), ["min", "max"])
    front = data[on_front].sort_values("gmacs")
    ax.step(front["gmacs"], front["best_top1"], where="post", color="crimson", linewidth=1.5,
            zorder=1)
    ax.scatter(front["gmacs"], front["best_top1"], s=140, facecolors="none",
               edgecolors="crimson", linewidths=1.5)
    for _, row in front.iterrows():
        ax.annotate(row["trial_id"], (row["gmacs"], row["best_top1"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    if data["gmacs"].min() > 0 and data["gmacs"].max() / data["gmacs"].min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel("compute per image (GMACs, multiply-adds x 1e9)")
    ax.set_ylabel(_TOP1)
    _legend(ax, data, extra=[Line2D([], [], color="crimson", marker="o", markerfacecolor="none",
                                         label="Pareto front")])
    return fig


def _learning_curves(frame: pd.DataFrame, epochs: pd.DataFrame) -> Figure | None:
    if epochs.empty:
        return None
    fig, ax = _figure(PLOTS["learning_curves.png"])
    colours, markers = _styles(frame)
    info = frame.set_index(["experiment", "trial_id"])
    for (exp, trial), curve in epochs.groupby(["experiment", "trial_id"], sort=False):
        if (exp, trial) not in info.index:
            continue
        row = info.loc[(exp, trial)]
        curve = curve.sort_values("epoch")
        cut = row["status"] != Status.TERMINATED
        ax.plot(curve["epoch"], curve["top1"], color=colours[row["backbone"]],
                linestyle="--" if cut else "-", alpha=0.8, linewidth=1.2,
                marker=markers[exp] if len(markers) > 1 else None, markersize=3)
        # An early-stopped (or diverged) curve ends in a cross where it was cut.
        ax.plot(curve["epoch"].iloc[-1:], curve["top1"].iloc[-1:], color=colours[row["backbone"]],
                marker="x" if cut else "o", markersize=7 if cut else 3, linestyle="")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(ax, frame, extra=[
        Line2D([], [], color="grey", label="ran every epoch"),
        Line2D([], [], color="grey", linestyle="--", marker="x", label="stopped early / diverged"),
    ])
    return fig


def _coefficients(row: pd.Series) -> tuple[float, float, float]:
    kwargs = {k: row[k] for k in ("phi", "alpha", "beta", "gamma") if pd.notna(row[k])}
    if not kwargs:
        kwargs = {k: row[k] for k in ("width_mult", "depth_mult") if pd.notna(row[k])}
        if pd.notna(row["resolution"]):
            kwargs["resolution"] = int(row["resolution"])
    c = resolve_efficientnet_coefficients(**kwargs)
    return c.width_mult, c.depth_mult, c.resolution


def _efficientnet(frame: pd.DataFrame) -> Figure | None:
    data = frame[frame["backbone"] == "efficientnet"]
    if data.empty:
        return None
    coeffs = np.array([_coefficients(row) for _, row in data.iterrows()], dtype=float)
    fig, ax = _figure(PLOTS["efficientnet.png"] + "\n(marker size and label: best top-1 %)")
    top1 = data["best_top1"].to_numpy(dtype=float)
    points = ax.scatter(coeffs[:, 0], coeffs[:, 1], c=coeffs[:, 2], cmap="viridis",
                        s=30 + 4 * top1, edgecolors="black", linewidths=0.5)
    for (w, d, _), t in zip(coeffs, top1, strict=True):
        ax.annotate(f"{t:.1f}%", (w, d), fontsize=7, xytext=(6, 6), textcoords="offset points")
    fig.colorbar(points, ax=ax, label="input resolution (px)")
    ax.set_xlabel("width_mult (channel multiplier)")
    ax.set_ylabel("depth_mult (layer multiplier)")
    return fig


def _importance(importances: Sequence[Importance]) -> Figure | None:
    bars = [(f"{imp.experiment} {name}" if len(importances) > 1 else name, values)
            for imp in importances for name, values in imp.values.items()]
    if not bars:
        return None
    params = list(dict.fromkeys(p for _, values in bars for p in values))
    fig, ax = _figure(PLOTS["importance.png"])
    height = 0.8 / len(bars)
    y = np.arange(len(params))
    for i, (label, values) in enumerate(bars):
        ax.barh(y + i * height, [values.get(p, 0.0) for p in params], height=height, label=label)
    ax.set_yticks(y + height * (len(bars) - 1) / 2, params)
    ax.invert_yaxis()
    ax.set_xlabel("importance for best top-1 (fraction of the total, sums to 1)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _transferability(experiments: Sequence[Experiment]) -> Figure | None:
    cells = {e.name: experiment_cells(e) for e in experiments}
    cells = {name: c for name, c in cells.items() if c is not None and not c.empty}
    if not cells:
        return None
    fig = Figure(figsize=(max(7.0, 4.5 * len(cells) + 1), 4.4), layout="constrained")
    fig.suptitle(PLOTS["transferability.png"], fontsize=11)
    # One panel per experiment: scores of different datasets are not comparable.
    for ax, (name, part) in zip(np.atleast_1d(fig.subplots(1, len(cells))), cells.items(),
                                strict=True):
        for i, (backbone, group) in enumerate(part.groupby("backbone")):
            ax.scatter(group[TRANSFER_SCORE], group["best_top1"], color=f"C{i % 10}",
                       edgecolors="black", linewidths=0.4, label=backbone)
            for row in group.itertuples():
                ax.annotate(str(row.depth), (getattr(row, TRANSFER_SCORE), row.best_top1),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{name}: Kendall tau {kendall_tau(part):.2f} over {len(part)} cells",
                     fontsize=9)
        ax.set_xlabel(f"{TRANSFER_SCORE} of the stage's pooled features (label: depth)")
        ax.set_ylabel(_TOP1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def write_plots(experiments: Sequence[Experiment], board: pd.DataFrame,
                importances: Sequence[Importance], *, out: str | Path) -> dict[str, Path]:
    """Writes every plot that applies to ``out``; returns title -> PNG path, report order.

    ``efficientnet.png`` needs free-``efficientnet`` trials and ``importance.png``
    importance values; the other four are always written when any trial has a result.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = trial_frame(experiments, board)
    epochs = pd.concat([e.epochs.assign(experiment=e.name) for e in experiments],
                       ignore_index=True)
    figures: Mapping[str, Figure | None] = {
        "freeze_depth.png": _freeze_depth(frame) if not frame.empty else None,
        "lr_scale.png": _lr_scale(frame) if not frame.empty else None,
        "pareto.png": _pareto(frame) if not frame.empty else None,
        "learning_curves.png": _learning_curves(frame, epochs) if not frame.empty else None,
        "efficientnet.png": _efficientnet(frame) if not frame.empty else None,
        "importance.png": _importance(importances),
        "transferability.png": _transferability(experiments),
    }
    written = {}
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / name, dpi=110)
            written[PLOTS[name]] = out / name
    return written
