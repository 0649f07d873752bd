"""What every scatter plot of :mod:`search.plots` shares: colours, marks, panels, legend.

Colour encodes the backbone, the same in every panel. The fill encodes how a trial
ended: filled ran its every epoch (or was complete, a classical head), hollow was stopped
early by the scheduler, and a cross is drawn over one that diverged or has not finished.
A reader must see which points are early-stopped before reading a trend into them.
Several experiments get one panel each: their datasets and budgets differ, so neither
their points nor a "best per x" line are ever pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from search.contract import Status

__all__ = ["COMPLETE_LABEL", "STOPPED_EARLY_LABEL", "UNFINISHED_LABEL", "colours", "legend",
           "panels", "scatter"]

STOPPED_EARLY_LABEL = "stopped early by the scheduler"
UNFINISHED_LABEL = "diverged / not finished"
COMPLETE_LABEL = "ran to its end"


def colours(frame: pd.DataFrame) -> dict[str, str]:
    """Backbone -> matplotlib colour, over every panel."""
    return {b: f"C{i % 10}" for i, b in enumerate(sorted(frame["backbone"].dropna().unique()))}


def panels(title: str, names: Sequence[str]) -> tuple[Figure, list[Any]]:
    """A figure with one panel (axes) per experiment in ``names``, stacked."""
    fig = Figure(figsize=(9, 1.0 + 3.8 * len(names)), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(len(names), 1, squeeze=False)[:, 0]))
    fig.suptitle(title, fontsize=11)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _kinds(part: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    stopped = part["status"] == Status.STOPPED_EARLY
    unfinished = ~part["status"].isin([Status.TERMINATED, Status.STOPPED_EARLY])
    return stopped, unfinished


def scatter(ax: Any, part: pd.DataFrame, x: str, y: str, colour: Any, *,
            offset: float = 0.0, size: Any = 40) -> None:
    """Draws ``part``'s trials at (``x``, ``y``): filled, hollow when stopped early.

    ``colour`` and ``size`` are one value or one per row (a colormap's RGBA rows).
    """
    xs = part[x].astype(float).to_numpy() + offset
    ys = part[y].astype(float).to_numpy()
    stopped, unfinished = (k.to_numpy() for k in _kinds(part))
    rgba = np.broadcast_to(np.asarray(_rgba(colour), dtype=float), (len(part), 4))
    sizes = np.broadcast_to(np.asarray(size, dtype=float), (len(part),))
    full = ~stopped
    if full.any():
        ax.scatter(xs[full], ys[full], c=rgba[full], s=sizes[full], alpha=0.85,
                   edgecolors="black", linewidths=0.4, gid="complete")
    if stopped.any():
        # Hollow: the ring keeps the backbone's colour, the empty middle says "cut short".
        ax.scatter(xs[stopped], ys[stopped], facecolors="none", edgecolors=rgba[stopped],
                   s=sizes[stopped], linewidths=1.6, gid="stopped_early")
    if unfinished.any():
        ax.scatter(xs[unfinished], ys[unfinished], marker="x", c="black",
                   s=sizes[unfinished] * 0.6, linewidths=1.0, gid="unfinished")


def _rgba(colour: Any) -> Any:
    from matplotlib.colors import to_rgba, to_rgba_array

    array = np.asarray(colour)
    return to_rgba_array(array) if array.ndim == 2 else to_rgba(colour)


def legend(ax: Any, frame: pd.DataFrame, backbones: dict[str, str] | None = None, *,
           extra: Sequence[Line2D] = ()) -> None:
    """Backbone colours (when given), the kinds of ending present in ``frame``, ``extra``."""
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=b)
               for b, c in (backbones or {}).items()]
    stopped, unfinished = _kinds(frame)
    if (~stopped & ~unfinished).any():
        handles.append(Line2D([], [], color="grey", marker="o", markeredgecolor="black",
                              linestyle="", label=COMPLETE_LABEL))
    if stopped.any():
        handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none",
                              markeredgewidth=1.6, linestyle="", label=STOPPED_EARLY_LABEL))
    if unfinished.any():
        handles.append(Line2D([], [], color="black", marker="x", linestyle="",
                              label=UNFINISHED_LABEL))
    # Outside the axes: a legend never hides a point.
    ax.legend(handles=[*handles, *extra], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
