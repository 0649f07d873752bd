"""Static PNG plots of one or several experiments (matplotlib, no display needed).

Figures are built with :class:`matplotlib.figure.Figure` directly, never
through pyplot, so no global backend or figure registry is touched (Agg
renders the PNG). The conventions every scatter plot shares (colour per
backbone, hollow = stopped early, one panel per experiment) live in
:mod:`search.plotkit`. Plots against a parameter show top-1 at equal fidelity
(:mod:`search.fidelity`), at the epoch importance compared the trials at.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from search import plotkit as K
from search.analysis import Experiment, trial_config
from search.contract import TRANSFER_SCORE, Status, pareto_mask
from search.fidelity import TOP1_AT, Fidelity, equal_fidelity
from search.importance import Importance
from search.prior import cell_of
from search.transfer import experiment_cells, kendall_tau
from trainables.models import resolve_efficientnet_coefficients
from trainables.params import trial_defaults

__all__ = ["PLOTS", "Measured", "build_figures", "measure", "trial_frame", "write_plots"]

# File name -> title, in the order the report shows them.
PLOTS = {
    "freeze_depth.png": "Top-1 at equal fidelity against frozen stages, per backbone",
    "lr_scale.png": "Top-1 at equal fidelity against the backbone's learning-rate scale",
    "pareto.png": "Best top-1 against compute, with the Pareto front",
    "learning_curves.png": "Learning curves",
    "efficientnet.png": ("EfficientNet: top-1 at equal fidelity over width x depth, coloured by "
                         "resolution"),
    "importance.png": "Hyperparameter importance for top-1 at equal fidelity",
    "transferability.png": "Transferability before training against best top-1, per cell",
}
_TOP1 = "best validation top-1 (%)"
_KEYS = ("backbone", "freeze_depth", "lr_scale", "width_mult", "depth_mult", "resolution", "phi",
         "alpha", "beta", "gamma")
_ROW = ("experiment", "trial_id", "status", "best_top1", "gmacs", "epochs")
# Experiment name -> its trials at equal fidelity (TOP1_AT) and how they were compared.
Measured = Mapping[str, tuple[pd.DataFrame, Fidelity | None]]


def measure(experiments: Sequence[Experiment], importances: Sequence[Importance] = ()
            ) -> dict[str, tuple[pd.DataFrame, Fidelity | None]]:
    """Each experiment's trials at equal fidelity, apart (their budgets differ).

    At the epoch its importance compared finished trials at, when it did, so a
    plot and the importance beside it speak of the same epoch; else by the rule.
    """
    epochs = {i.experiment: i.fidelity.epoch for i in importances if i.fidelity and i.values}
    return {e.name: equal_fidelity(e.trials, e.epochs, epoch=epochs.get(e.name))
            for e in experiments}


def trial_frame(experiments: Sequence[Experiment], board: pd.DataFrame,
                measured: Measured | None = None) -> pd.DataFrame:
    """One row per leaderboard trial with a result: its full parameters (fixed ones too)
    and :data:`~search.fidelity.TOP1_AT` (NaN for a trial not measured at the epoch)."""
    by_name = {e.name: e for e in experiments}
    measured = measure(experiments) if measured is None else measured
    at = {(name, t): v for name, (frame, _) in measured.items()
          for t, v in zip(frame["trial_id"], frame[TOP1_AT], strict=True)}
    rows = []
    defaults = trial_defaults()
    for _, row in board[board["best_top1"].notna()].iterrows():
        cfg = {**defaults, **trial_config(by_name[row["experiment"]], row)}
        rows.append({**{k: cfg.get(k) for k in _KEYS}, **{k: row[k] for k in _ROW},
                     TOP1_AT: at.get((row["experiment"], row["trial_id"]), np.nan)})
    return pd.DataFrame(rows, columns=[*_KEYS, *_ROW, TOP1_AT])


def _names(data: pd.DataFrame, measured: Measured) -> list[str]:
    """The experiments with points in ``data``, in the order they were given."""
    present = set(data["experiment"])
    return [name for name in measured if name in present]


def _title(ax: Any, name: str, fidelity: Fidelity | None) -> None:
    text = name
    if fidelity:
        text += f": {fidelity.describe()}"
        # measure() took the epoch from importance: say why it is not the rule's own.
        text += ", the epoch importance used" if fidelity.min_trials is None else ""
        ax.set_ylabel(f"validation top-1 at epoch {fidelity.epoch} (%)")
    ax.set_title(textwrap.fill(text, 100), fontsize=8.5)


def _per_param(frame: pd.DataFrame, measured: Measured, plot: str, x: str, xlabel: str, *,
               jitter: float = 0.0, best_line: bool = False) -> tuple[Figure, list[Any]] | None:
    """Top-1 at equal fidelity against parameter ``x``, one panel per experiment."""
    data = frame.dropna(subset=[x, TOP1_AT])
    names = _names(data, measured)
    if not names:
        return None
    fig, axes = K.panels(PLOTS[plot], names)
    backbones = K.colours(frame)
    for ax, name in zip(axes, names, strict=True):
        part = data[data["experiment"] == name]
        for backbone, group in part.groupby("backbone"):
            offset = (sorted(backbones).index(backbone) - (len(backbones) - 1) / 2) * jitter
            K.scatter(ax, group, x, TOP1_AT, backbones[backbone], offset=offset)
            if best_line:  # this experiment's best at each value: where freezing starts to hurt
                best = group.groupby(x)[TOP1_AT].max()
                ax.plot(best.index.astype(float), best.values, color=backbones[backbone],
                        alpha=0.5)
        _title(ax, name, measured[name][1])
        ax.set_xlabel(xlabel)
        extra = ([Line2D([], [], color="grey", alpha=0.5, label="best per depth")]
                 if best_line else [])
        K.legend(ax, part, {b: c for b, c in backbones.items() if b in set(part["backbone"])},
                 extra=extra)
    return fig, axes


def _freeze_depth(frame: pd.DataFrame, measured: Measured) -> Figure | None:
    drawn = _per_param(frame, measured, "freeze_depth.png", "freeze_depth",
                       "freeze_depth (leading backbone stages frozen; 0 = train all)",
                       jitter=0.12, best_line=True)
    if drawn is None:
        return None
    for ax in drawn[1]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    return drawn[0]


def _lr_scale(frame: pd.DataFrame, measured: Measured) -> Figure | None:
    positive = frame[pd.to_numeric(frame["lr_scale"], errors="coerce") > 0]
    drawn = _per_param(positive, measured, "lr_scale.png", "lr_scale",
                       "lr_scale = backbone learning rate / head learning rate (log scale)")
    if drawn is None:
        return None
    for ax in drawn[1]:
        ax.set_xscale("log")
    return drawn[0]


def _pareto(frame: pd.DataFrame, measured: Measured) -> Figure | None:
    data = frame.dropna(subset=["gmacs"])
    names = _names(data, measured)
    if not names:
        return None
    fig, axes = K.panels(PLOTS["pareto.png"], names)
    backbones = K.colours(frame)
    for ax, name in zip(axes, names, strict=True):
        part = data[data["experiment"] == name]
        for backbone, group in part.groupby("backbone"):
            K.scatter(ax, group, "gmacs", "best_top1", backbones[backbone])
        # The objective's front (best top-1, as the leaderboard and `pareto` rank), per
        # experiment: one dataset's accuracy does not dominate another's.
        on_front = pareto_mask(part[["gmacs", "best_top1"]].to_numpy(), ["min", "max"])
        front = part[on_front].sort_values("gmacs")
        ax.step(front["gmacs"], front["best_top1"], where="post", color="crimson",
                linewidth=1.5, zorder=1)
        ax.scatter(front["gmacs"], front["best_top1"], s=140, facecolors="none",
                   edgecolors="crimson", linewidths=1.5)
        for _, row in front.iterrows():
            ax.annotate(row["trial_id"], (row["gmacs"], row["best_top1"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        if part["gmacs"].min() > 0 and part["gmacs"].max() / part["gmacs"].min() > 20:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("compute per image (GMACs, multiply-adds x 1e9)")
        ax.set_ylabel(_TOP1)
        K.legend(ax, part, {b: c for b, c in backbones.items() if b in set(part["backbone"])},
                 extra=[Line2D([], [], color="crimson", marker="s", markerfacecolor="none",
                               linestyle="-", label="Pareto front")])
    return fig


_END = {Status.TERMINATED: {"marker": "o", "markersize": 3},
        Status.STOPPED_EARLY: {"marker": "o", "markersize": 7, "markerfacecolor": "none",
                               "markeredgewidth": 1.5}}
_END_LABEL = {Status.TERMINATED: K.COMPLETE_LABEL, Status.STOPPED_EARLY: K.STOPPED_EARLY_LABEL}
_END_LEGEND = {K.COMPLETE_LABEL: {"marker": "o", "markersize": 3},
               K.STOPPED_EARLY_LABEL: {"linestyle": "--", "marker": "o", "markerfacecolor": "none"},
               K.UNFINISHED_LABEL: {"linestyle": "--", "marker": "x"}}


def _learning_curves(frame: pd.DataFrame, epochs: pd.DataFrame, measured: Measured
                     ) -> Figure | None:
    info = frame.set_index(["experiment", "trial_id"])
    keys = pd.MultiIndex.from_arrays([epochs["experiment"], epochs["trial_id"]])
    epochs = epochs[keys.isin(info.index)]
    names = _names(epochs, measured)
    if not names:
        return None
    fig, axes = K.panels(PLOTS["learning_curves.png"], names)
    backbones = K.colours(frame)
    for ax, name in zip(axes, names, strict=True):
        for trial, curve in epochs[epochs["experiment"] == name].groupby("trial_id", sort=False):
            row = info.loc[(name, trial)]
            curve = curve.sort_values("epoch")
            colour = backbones[row["backbone"]]
            ax.plot(curve["epoch"], curve["top1"], color=colour, alpha=0.8, linewidth=1.2,
                    linestyle="-" if row["status"] == Status.TERMINATED else "--")
            # Where it ended: a dot ran to its end, a ring was stopped early, a cross else.
            end = _END.get(row["status"], {"marker": "x", "markersize": 7})
            ax.plot(curve["epoch"].iloc[-1:], curve["top1"].iloc[-1:], color=colour,
                    linestyle="", **end)
        fidelity = measured.get(name, (None, None))[1]
        part = frame[frame["experiment"] == name]
        ends = {_END_LABEL.get(s, K.UNFINISHED_LABEL) for s in part["status"]}
        extra = [Line2D([], [], color="grey", label=label, **style)
                 for label, style in _END_LEGEND.items() if label in ends]
        if fidelity:
            ax.axvline(fidelity.epoch, color="black", linestyle=":", linewidth=1)
            extra.append(Line2D([], [], color="black", linestyle=":",
                                label=f"equal-fidelity epoch ({fidelity.epoch})"))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation top-1 (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(handles=[*(Line2D([], [], color=c, label=b) for b, c in backbones.items()
                             if b in set(part["backbone"])), *extra],
                  fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _coefficients(row: pd.Series) -> tuple[float, float, float]:
    kwargs = {k: row[k] for k in ("phi", "alpha", "beta", "gamma") if pd.notna(row[k])}
    if not kwargs:
        kwargs = {k: row[k] for k in ("width_mult", "depth_mult") if pd.notna(row[k])}
        if pd.notna(row["resolution"]):
            kwargs["resolution"] = int(row["resolution"])
    c = resolve_efficientnet_coefficients(**kwargs)
    return c.width_mult, c.depth_mult, c.resolution


def _efficientnet(frame: pd.DataFrame, measured: Measured) -> Figure | None:
    data = frame[(frame["backbone"] == "efficientnet") & frame[TOP1_AT].notna()]
    if data.empty:
        return None
    coeffs = pd.DataFrame([_coefficients(row) for _, row in data.iterrows()], index=data.index,
                          columns=["w", "d", "r"], dtype=float)
    data = pd.concat([data, coeffs], axis=1)
    names = _names(data, measured)
    fig, axes = K.panels(PLOTS["efficientnet.png"] + "\n(marker size and label: top-1 %)",
                         names)
    scale = ScalarMappable(norm=Normalize(data["r"].min(), data["r"].max()), cmap="viridis")
    fig.colorbar(scale, ax=axes, label="input resolution (px)")
    for ax, name in zip(axes, names, strict=True):
        part = data[data["experiment"] == name]
        K.scatter(ax, part, "w", "d", scale.to_rgba(part["r"].to_numpy()),
                  size=30 + 4 * part[TOP1_AT].to_numpy(dtype=float))
        for row in part.itertuples():
            ax.annotate(f"{getattr(row, TOP1_AT):.1f}%", (row.w, row.d), fontsize=7,
                        xytext=(6, 6), textcoords="offset points")
        _title(ax, name, measured[name][1])
        ax.set_ylabel("depth_mult (layer multiplier)")
        ax.set_xlabel("width_mult (channel multiplier)")
        K.legend(ax, part)
    return fig


def _importance(importances: Sequence[Importance]) -> Figure | None:
    bars = [(f"{imp.experiment} {name}" if len(importances) > 1 else name, values)
            for imp in importances for name, values in imp.values.items()]
    if not bars:
        return None
    params = list(dict.fromkeys(p for _, values in bars for p in values))
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    epochs = [textwrap.fill(f"{i.experiment}: {i.fidelity.describe()}", 100)
              for i in importances if i.values and i.fidelity]
    ax.set_title("\n".join([PLOTS["importance.png"], *epochs]), fontsize=9)
    height = 0.8 / len(bars)
    y = np.arange(len(params))
    for i, (label, values) in enumerate(bars):
        ax.barh(y + i * height, [values.get(p, 0.0) for p in params], height=height, label=label)
    ax.set_yticks(y + height * (len(bars) - 1) / 2, params)
    ax.invert_yaxis()
    ax.set_xlabel("importance for top-1 at equal fidelity (fraction of the total, sums to 1)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _cell_status(experiment: Experiment, cells: pd.DataFrame) -> list[str]:
    """The status of the trial that gave each cell its best top-1."""
    best: dict[Any, tuple[float, str]] = {}
    for _, row in experiment.trials[experiment.trials["best_top1"].notna()].iterrows():
        cell = cell_of(trial_config(experiment, row))
        if cell and row["best_top1"] > best.get(cell, (-np.inf, ""))[0]:
            best[cell] = (row["best_top1"], row["status"])
    return [best.get((b, d), (0, Status.TERMINATED))[1]
            for b, d in zip(cells["backbone"], cells["depth"], strict=True)]


def _transferability(experiments: Sequence[Experiment]) -> Figure | None:
    cells = {e.name: (e, experiment_cells(e)) for e in experiments}
    cells = {n: (e, c) for n, (e, c) in cells.items() if c is not None and not c.empty}
    if not cells:
        return None
    fig = Figure(figsize=(max(7.0, 4.5 * len(cells) + 1), 4.4), layout="constrained")
    fig.suptitle(PLOTS["transferability.png"], fontsize=11)
    # One panel per experiment: scores of different datasets are not comparable.
    for ax, (name, (exp, part)) in zip(np.atleast_1d(fig.subplots(1, len(cells))),
                                       cells.items(), strict=True):
        part = part.assign(status=_cell_status(exp, part))
        backbones = {b: f"C{i % 10}" for i, b in enumerate(sorted(part["backbone"].unique()))}
        for backbone, group in part.groupby("backbone"):
            K.scatter(ax, group, TRANSFER_SCORE, "best_top1", backbones[backbone])
            for row in group.itertuples():
                ax.annotate(str(row.depth), (getattr(row, TRANSFER_SCORE), row.best_top1),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{name}: Kendall tau {kendall_tau(part):.2f} over {len(part)} cells",
                     fontsize=9)
        ax.set_xlabel(f"{TRANSFER_SCORE} of the stage's pooled features (label: depth)")
        ax.set_ylabel(_TOP1)
        ax.grid(True, alpha=0.3)
        K.legend(ax, part, backbones)
    return fig


def build_figures(experiments: Sequence[Experiment], board: pd.DataFrame,
                  importances: Sequence[Importance]) -> dict[str, Figure]:
    """Every plot that applies, as file name -> figure, in report order.

    ``efficientnet.png`` needs free-``efficientnet`` trials, ``importance.png``
    importance values and ``transferability.png`` a ranking; the other four are
    always drawn when any trial has a result.
    """
    measured = measure(experiments, importances)
    frame = trial_frame(experiments, board, measured)
    epochs = pd.concat([e.epochs.assign(experiment=e.name) for e in experiments],
                       ignore_index=True)
    some = not frame.empty
    figures: Mapping[str, Figure | None] = {
        "freeze_depth.png": _freeze_depth(frame, measured) if some else None,
        "lr_scale.png": _lr_scale(frame, measured) if some else None,
        "pareto.png": _pareto(frame, measured) if some else None,
        "learning_curves.png": _learning_curves(frame, epochs, measured) if some else None,
        "efficientnet.png": _efficientnet(frame, measured) if some else None,
        "importance.png": _importance(importances),
        "transferability.png": _transferability(experiments),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_plots(experiments: Sequence[Experiment], board: pd.DataFrame,
                importances: Sequence[Importance], *, out: str | Path) -> dict[str, Path]:
    """Writes :func:`build_figures` as PNGs to ``out``; returns title -> PNG path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, fig in build_figures(experiments, board, importances).items():
        fig.savefig(out / name, dpi=110)
        written[PLOTS[name]] = out / name
    return written
