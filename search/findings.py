"""What a search found for the fine-tuning questions, from its own Parquet files.

The end-of-run summary (and ``ftsearch analyze``) answers, when the space asked them:
pretrained vs from scratch, the best freeze depth (of the pretrained trials fine-tuned with
the linear head), the best backbone/head learning-rate ratio (``lr_scale``) and the best
head (a classical one named with the stage its best trial read). Every answer is read at
one common epoch (:mod:`search.fidelity`): a trial the scheduler stopped after one epoch is
not compared with one that ran to the end. Each answer carries its evidence (trials per
group at that epoch, and those stopped before it); an answer resting on one trial per side
says so, and groups within :data:`TIE_POINTS` of each other are called a tie, not a winner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from search import contract as C
from search.analysis import Experiment
from search.fidelity import TOP1_AT, Fidelity, equal_fidelity
from trainables.models import stage_count
from trainables.params import TrialParams, resolve_weights

__all__ = ["TIE_POINTS", "Finding", "findings", "format_findings"]

# Closer than this (top-1 points) is within the noise of one validation split of a few
# hundred images (one image is 0.2-0.5 points): reported as a tie.
TIE_POINTS = 1.0
# lr_scale bands around the rule of thumb "backbone at 1/10 of the head's rate".
_SCALE_BANDS = ((0.0, 0.03, "< 1/30"), (0.03, 0.3, "1/30..1/3 (~1/10)"),
                (0.3, float("inf"), ">= 1/3 (~1)"))
_SHOWN = 4  # groups listed in an answer's evidence
# Settings whose difference between two compared trials the evidence names.
_CONTEXT = ("backbone", "head", "freeze_depth", "lr", "lr_scale")


@dataclass(frozen=True)
class Finding:
    """One question's answer and the evidence for it."""

    question: str
    answer: str
    evidence: str


def _values(exp: Experiment, trials: pd.DataFrame, name: str) -> pd.Series:
    """Each trial's value of a parameter: its column when searched, else the fixed one."""
    column = C.CONFIG_PREFIX + name
    if column in trials.columns:
        return trials[column]
    fixed = ((exp.config or {}).get("train") or {}).get(name,
                                                        TrialParams.model_fields[name].default)
    return pd.Series([fixed] * len(trials), index=trials.index, dtype=object)


def _groups(measured: pd.DataFrame, labels: pd.Series) -> pd.DataFrame:
    """Best top-1 and trial count per label, best first."""
    frame = pd.DataFrame({"label": labels, "top1": measured[TOP1_AT]}).dropna()
    table = frame.groupby("label").top1.agg(["max", "size", "idxmax"])
    # Stable: equal best values keep the labels' sorted order (the smaller depth first).
    return table.sort_values("max", ascending=False, kind="stable")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    return a == b


def _who(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def _compare(question: str, table: pd.DataFrame, name: Callable[[Any], str], stopped: str
             ) -> Finding | None:
    """The best group against the runner-up (or the rest)."""
    if table.empty:
        return None
    if len(table) == 1:
        label, row = next(iter(table.iterrows()))
        return Finding(question, f"only {name(label)} measured ({row['max']:.1f}%)",
                       _who(int(row["size"])) + stopped)
    (first, a), (second, b) = list(table.iloc[:2].iterrows())
    gap = a["max"] - b["max"]
    if gap < TIE_POINTS:
        answer = (f"{name(first)} and {name(second)} tie ({a['max']:.1f}% vs {b['max']:.1f}%, "
                  f"within {TIE_POINTS:g} point)")
    else:
        answer = (f"{name(first)}, +{gap:.1f} points over {name(second)} "
                  f"({a['max']:.1f}% vs {b['max']:.1f}%)")
    counts = ", ".join(f"{name(label)} {int(row['size'])}"
                       for label, row in table.iloc[:_SHOWN].iterrows())
    if len(table) > _SHOWN:
        counts += f", {len(table) - _SHOWN} more"
    thin = " (one trial on a side: a hint, not a result)" if min(a["size"], b["size"]) == 1 else ""
    return Finding(question, answer, f"trials: {counts}{thin}{stopped}")


def _stopped(measured: pd.DataFrame, mask: pd.Series) -> str:
    """How many trials of a group the comparison leaves out (ended before the epoch)."""
    left_out = int(mask.sum()) - int(mask.reindex(measured.index, fill_value=False).sum())
    return f"; {left_out} stopped before the epoch" if left_out > 0 else ""


def findings(exp: Experiment, *, min_trials: int | None = None
             ) -> tuple[Fidelity | None, list[Finding]]:
    """The answers the experiment's trials support, at one common epoch.

    Args:
        exp: A loaded experiment (:func:`search.analysis.load_experiment`).
        min_trials: Passed to :func:`search.fidelity.equal_fidelity` (its default if None).

    Returns:
        The fidelity every answer is read at (None: too few trials), and the answers, in
        the order pretrained vs scratch, freeze depth, lr_scale, head; a question the
        space did not ask (one value only) is left out.
    """
    trials = exp.trials[exp.trials["status"].isin(C.SELECTABLE)]
    kwargs = {} if min_trials is None else {"min_trials": min_trials}
    measured, fidelity = equal_fidelity(trials, exp.epochs, **kwargs)
    if fidelity is None or measured.empty:
        return fidelity, []
    backbone = _values(exp, trials, "backbone")
    weights = _values(exp, trials, "weights")
    pretrained = pd.Series([resolve_weights(w, b) != "none" for w, b in zip(weights, backbone,
                                                                            strict=True)],
                           index=trials.index)
    head = _values(exp, trials, "head").fillna("linear")
    depth = _values(exp, trials, "freeze_depth").fillna(0).astype(int)
    out: list[Finding] = []

    def confounded(table: pd.DataFrame, own: tuple[str, ...]) -> str:
        """Which other settings the two compared groups' best trials also differ in: the
        gap is theirs too, not the question's alone."""
        if len(table) < 2:
            return ""
        a, b = table["idxmax"].iloc[0], table["idxmax"].iloc[1]
        columns = [C.CONFIG_PREFIX + k for k in _CONTEXT if k not in own]
        # A setting one of them does not have (a classical head's lr) is not a difference.
        differ = [c.removeprefix(C.CONFIG_PREFIX) for c in columns if c in trials.columns
                  and pd.notna(trials.at[a, c]) and pd.notna(trials.at[b, c])
                  and not _same(trials.at[a, c], trials.at[b, c])]
        return f"; their best trials also differ in {', '.join(differ)}" if differ else ""

    def ask(question: str, mask: pd.Series, labels: pd.Series, name: Callable[[Any], str],
            *, own: tuple[str, ...], why_not: str = "") -> None:
        if labels[mask].nunique() < 2:
            if why_not:  # searched, but the trials cannot answer it
                out.append(Finding(question, "not answered", why_not.format(int(mask.sum()))))
            return  # otherwise not a question this space asked
        rows = measured[mask.reindex(measured.index, fill_value=False)]
        note = _stopped(rows, mask)
        if labels.reindex(rows.index).nunique() < 2:
            # One side never reached the common epoch (the scheduler stopped it): compare
            # at the highest epoch both sides reached, and say so.
            for epoch in range(fidelity.epoch - 1, 0, -1):
                rows, _ = equal_fidelity(trials[mask], exp.epochs, epoch=epoch)
                if labels.reindex(rows.index).nunique() >= 2:
                    note = (f"; at epoch {epoch}, the last both sides reached"
                            + _stopped(rows, mask))
                    break
        table = _groups(rows, labels.reindex(rows.index))
        finding = _compare(question, table, name, note + confounded(table, own))
        if finding is not None:
            out.append(finding)

    everything = pd.Series(True, index=trials.index)
    ask("pretrained vs from scratch", everything,
        pretrained.map({True: "pretrained", False: "from scratch"}), str,
        own=("backbone", "weights", "head", "freeze_depth"))
    # Freezing is a question for pretrained weights only (random ones are never frozen), and
    # for fine-tuning: a classical head freezes every stage it reads (its depth is the stage
    # its features come from), so it answers "which stage's features", under "head" below.
    linear = head == "linear"
    ask("freeze depth", pretrained & linear, depth, lambda d: f"depth {d}",
        own=("freeze_depth",))
    # The 1/10 rule protects pretrained weights; lr_scale acts only where some pretrained
    # stage trains under the linear head (a network from scratch has nothing to protect).
    stages = backbone.map(stage_count)
    trains_backbone = pretrained & (head == "linear") & (depth < stages)
    if C.CONFIG_PREFIX + "lr_scale" in trials.columns:
        scale = trials[C.CONFIG_PREFIX + "lr_scale"]
        band = pd.cut(scale, [lo for lo, _, _ in _SCALE_BANDS] + [float("inf")], right=False,
                      labels=[label for _, _, label in _SCALE_BANDS])
        ask("backbone/head lr ratio (lr_scale)", trains_backbone & scale.notna(),
            band.astype(object), lambda b: f"lr_scale {b}", own=("lr_scale",),
            why_not="{} trial(s) trained pretrained stages with the linear head, all in one "
                    "lr_scale band")
    ask("head", pretrained, head, _head_names(measured, head, depth),
        own=("head", "freeze_depth", "lr", "lr_scale"))
    return fidelity, out


def _head_names(measured: pd.DataFrame, head: pd.Series, depth: pd.Series
                ) -> Callable[[Any], str]:
    """Names a head in an answer; a classical head with the stage of its best trial."""
    best = measured[TOP1_AT].groupby(head.reindex(measured.index)).idxmax()
    stage = {h: int(depth[i]) for h, i in best.items() if h != "linear"}
    return lambda h: f"{h} (stage {stage[h]} features)" if h in stage else str(h)


def format_findings(fidelity: Fidelity | None, answers: list[Finding]) -> list[str]:
    """Lines for a terminal: the fidelity once, then one or two lines per answer."""
    if fidelity is None or not answers:
        return []
    lines = [f"findings, at equal fidelity: {fidelity.describe()}"]
    for f in answers:
        lines.append(f"  {f.question}: {f.answer}")
        lines.append(f"    {f.evidence}")
    return lines
