"""``report.html``: one self-contained page (inline CSS, images as data URIs, no script).

It opens offline in any browser and can be mailed or archived as a single file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from search import contract as C
from search.analysis import (
    AnalysisError,
    Experiment,
    best_config,
    format_leaderboard,
    leaderboard,
    leaderboard_table,
    load_experiment,
    sampled_params,
    summary,
)
from search.importance import Importance, param_importance
from search.plots import write_plots

__all__ = ["analyze_experiments", "write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; max-width: 100%; }
/* A wide leaderboard or a long path wraps inside its cells instead of pushing the table
   past the page: at spaces, and at the <wbr> after each _ and / (efficientnet_lite0,
   STOPPED_EARLY, paths), never inside a number. */
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; overflow-wrap: break-word; }
th { background: #f0f0f0; } tr.best td { background: #fff3c4; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
figure { margin: 1.5em 0; } figcaption { font-weight: bold; margin-bottom: 0.3em; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
.note { color: #555; font-style: italic; }
.wide { overflow-x: auto; max-width: 100%; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _cell(value: Any) -> str:
    # Break opportunities inside identifiers and paths: they set a column's narrowest width.
    return _e(value).replace("_", "_<wbr>").replace("/", "/<wbr>")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]],
           highlight: int | None = None) -> str:
    head = "".join(f"<th>{_cell(h)}</th>" for h in header)
    body = "".join(
        ("<tr class='best'>" if i == highlight else "<tr>")
        + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows))
    # The scroll container is the fallback for a table that cannot wrap narrow enough.
    return (f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            f"</table></div>")


def _compute(seconds: float) -> str:
    return f"{seconds:,.1f} trial-seconds ({timedelta(seconds=round(seconds))} h:mm:ss)"


def _best_text(best: pd.Series | None) -> str:
    if best is None:
        return "none finished yet"
    return (f"{best['trial_id']}: top-1 {best['best_top1']:.2f} %, top-5 {best['best_top5']:.2f} %"
            f", {best['gmacs']:.3f} GMACs, {best['status']}")


def _summary_section(experiments: Sequence[Experiment]) -> str:
    rows = []
    for exp in experiments:
        s = summary(exp)
        started = s["started"].strftime("%Y-%m-%d %H:%M:%S") if s["started"] else "unknown"
        statuses = ", ".join(f"{n} {k}" for k, n in s["by_status"].items() if n)
        rows.append([s["name"], started, f"{s['trials']} ({statuses})",
                     _compute(s["trial_seconds"]), _best_text(s["best"]), s["directory"]])
    return "<h2>Experiments</h2>" + _table(
        ["experiment", "started", "trials by status", "total compute", "best trial",
         "directory"], rows)


def _leaderboard_section(board: pd.DataFrame, best: pd.Series | None, top: int) -> str:
    table = leaderboard_table(board, top=top)
    shown = board.head(top)["rank"].tolist()
    highlight = shown.index(best["rank"]) if best is not None and best["rank"] in shown else None
    return (f"<h2>Leaderboard (top {len(table)} of {len(board)} trials, by best validation "
            f"top-1)</h2>" + _table(list(table.columns), table.values.tolist(), highlight))


def _best_section(experiments: Sequence[Experiment], best: pd.Series | None,
                  best_yaml: str | None) -> str:
    if best is None:
        return "<h2>Best trial</h2><p>No trial has finished yet.</p>"
    exp = next(e for e in experiments if e.name == best["experiment"])
    params = list(sampled_params(exp, best["trial_id"]).items())
    out = (f"<h2>Best trial: {_e(best['trial_id'])} ({_e(best['experiment'])})</h2>"
           f"<p>{_e(_best_text(best))}, {int(best['epochs'])} epochs.</p>"
           + _table(["parameter", "value"], params))
    if best_yaml:
        out += ("<details><summary>Rerun it with <code>ftsearch run best.yaml</code> (click to "
                f"show best.yaml)</summary><pre>{_e(best_yaml)}</pre></details>")
    return out


def _importance_section(importances: Sequence[Importance]) -> str:
    out = "<h2>Hyperparameter importance (for top-1 at equal fidelity)</h2>"
    for imp in importances:
        title = f"<h3>{_e(imp.experiment)}</h3>" if len(importances) > 1 else ""
        out += title + (f"<p>{imp.finished} finished trials; compared at equal fidelity: "
                        f"{_e(imp.describe_fidelity())}.</p>")
        if imp.values:
            evaluators = list(imp.values)
            params = list(dict.fromkeys(p for v in imp.values.values() for p in v))
            rows = [[p, *(f"{imp.values[e][p]:.3f}" if p in imp.values[e] else "-"
                          for e in evaluators)] for p in params]
            out += _table(["parameter", *evaluators], rows)
        out += "".join(f"<p class='note'>{_e(m)}</p>" for m in imp.messages)
    return out


def _figures(images: Mapping[str, Path]) -> str:
    out = ("<h2>Plots</h2><p class='note'>In every scatter plot a hollow marker is a trial "
           "stopped early by the scheduler, a cross one that diverged or did not finish. "
           "Plots against a parameter show top-1 at equal fidelity (the epoch is in their "
           "titles); the Pareto front uses best top-1, the objective.</p>")
    for title, path in images.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        out += (f"<figure><figcaption>{_e(title)}</figcaption>"
                f"<img alt=\"{_e(title)}\" src=\"data:image/png;base64,{data}\"></figure>")
    return out


def write_report(
    *,
    experiments: Sequence[Experiment],
    board: pd.DataFrame,
    best: pd.Series | None,
    importances: Sequence[Importance],
    images: Mapping[str, Path],
    out: str | Path,
    top: int = 10,
    best_yaml: str | None = None,
) -> Path:
    """Writes the report and returns its path.

    Args:
        experiments: The analysed experiments.
        board: Their leaderboard (:func:`search.analysis.leaderboard`).
        best: The best trial (a leaderboard row), or None.
        importances: One per experiment.
        images: Title -> PNG path; each is embedded as a data URI.
        out: The HTML file to write.
        top: Leaderboard rows shown.
        best_yaml: Text of best.yaml, shown verbatim.
    """
    names = ", ".join(e.name for e in experiments)
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>ftsearch report: {_e(names)}</title><style>{_CSS}</style></head><body>"
        f"<h1>ftsearch report: {_e(names)}</h1>"
        f"<p class='note'>Generated {datetime.now():%Y-%m-%d %H:%M:%S} from trials.parquet and "
        f"epochs.parquet.</p>"
        + _summary_section(experiments)
        + _best_section(experiments, best, best_yaml)
        + _leaderboard_section(board, best, top)
        + _importance_section(importances)
        + _figures(images)
        + "</body></html>"
    )
    out = Path(out)
    out.write_text(page, encoding="utf-8")
    return out


def _best_yaml(experiment: Experiment, best: pd.Series) -> str:
    return (f"# Reruns trial {best['trial_id']} of experiment {experiment.name} "
            f"(best top-1 {best['best_top1']:.2f}%): `ftsearch run best.yaml`.\n"
            f"# Each searched parameter is pinned to the trial's value as a one-value choice.\n"
            + yaml.safe_dump(best_config(experiment, best), sort_keys=False))


def analyze_experiments(directories: Sequence[str | Path], *, out: str | Path | None,
                        top: int) -> list[str]:
    """``ftsearch analyze``: writes report, plots, leaderboard and best.yaml; returns the text.

    Raises:
        AnalysisError: An unreadable experiment, or two with the same name.
    """
    experiments = [load_experiment(d) for d in directories]
    names = [e.name for e in experiments]
    if len(set(names)) < len(names):
        raise AnalysisError(f"experiment names repeat ({names}); analyse experiments with "
                            f"distinct names together")
    folder = Path(out) if out else (
        experiments[0].directory / "analysis" if len(experiments) == 1 else Path("analysis"))
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for exp in experiments:
        s = summary(exp)
        counts = ", ".join(f"{n} {k.lower()}" for k, n in s["by_status"].items() if n)
        lines.append(f"experiment {exp.name} ({exp.directory}): {s['trials']} trials "
                     f"({counts}), {s['trial_seconds']:.1f} trial-seconds")
    board = leaderboard(experiments)
    lines += [f"\nleaderboard (top {min(top, len(board))} of {len(board)}, by best top-1):",
              format_leaderboard(board, top=top)]
    best = C.best_trial(board)
    best_yaml = None
    if best is None:
        lines.append("\nno trial has finished yet: no best config")
    else:
        exp = experiments[names.index(best["experiment"])]
        lines.append(f"\nbest trial: {best['trial_id']} ({exp.name})  top-1 "
                     f"{best['best_top1']:.2f}%  top-5 {best['best_top5']:.2f}%  epochs "
                     f"{best['epochs']}  {best['gmacs']:.3f} GMACs")
        lines.append("best config:")
        lines += [f"  {k}: {v}" for k, v in sampled_params(exp, best["trial_id"]).items()]
        if exp.config is None:
            lines.append(f"(no {C.CONFIG_FILE} in {exp.directory}: best.yaml not written)")
        else:
            best_yaml = _best_yaml(exp, best)
            (folder / "best.yaml").write_text(best_yaml)
    importances = [param_importance(e) for e in experiments]
    for imp in importances:
        lines.append(f"\nimportance for top-1 at equal fidelity ({imp.experiment}, "
                     f"{imp.finished} finished trials): {imp.describe_fidelity()}")
        for evaluator, values in imp.values.items():
            ranked = sorted(values.items(), key=lambda kv: -kv[1])
            lines.append(f"  {evaluator}: " + ", ".join(f"{p} {v:.3f}" for p, v in ranked))
        lines += [f"  {message}" for message in imp.messages]
    board.to_csv(folder / "leaderboard.csv", index=False)
    images = write_plots(experiments, board, importances, out=folder)
    report = write_report(experiments=experiments, board=board, best=best,
                          importances=importances, images=images, out=folder / "report.html",
                          top=top, best_yaml=best_yaml)
    written = (["best.yaml"] if best_yaml else []) + [report.name, "leaderboard.csv"]
    plots = f" ({', '.join(p.name for p in images.values())})" if images else ""
    lines.append(f"\nwrote {', '.join(written)} and {len(images)} plots{plots} to {folder}")
    return lines
