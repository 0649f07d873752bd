"""`make demo` as a user runs it: short output, no frozen random weights, and findings that
a direct query of its Parquet files confirms (DuckDB, not ftsearch's own code)."""

from __future__ import annotations

import re

import duckdb
import pytest

MAX_LINES = 40


@pytest.fixture(scope="module")
def demo(demo_run):
    root, proc = demo_run.root, demo_run.proc
    experiment = root / "runs" / "demo"
    assert experiment.is_symlink() and experiment.resolve().name.startswith("demo-")
    return experiment, proc.stdout + proc.stderr


def test_the_demo_output_is_short_and_ends_with_its_findings(demo):
    _, output = demo
    lines = output.rstrip("\n").splitlines()
    assert len(lines) <= MAX_LINES, output
    assert "findings, at equal fidelity: top-1 at epoch" in output
    for question in ("pretrained vs from scratch", "freeze depth", "head"):
        assert f"  {question}: " in output, output


def test_no_demo_trial_freezes_random_weights(demo):
    experiment, _ = demo
    rows = duckdb.sql(f"""
        select "config.head" as head, "config.freeze_depth" as depth, count(*) as n
        from '{experiment}/trials.parquet' where "config.backbone" = 'resnet18'
        group by all""").fetchall()
    assert rows and all(head == "linear" and depth == 0 for head, depth, _ in rows), rows


def _measured(experiment, epoch: int) -> str:
    """SQL: each selectable trial's best top-1 up to `epoch`, when it is measured there
    (reached the epoch, or ended TERMINATED before it)."""
    return f"""
        with t as (select * from '{experiment}/trials.parquet'
                   where status in ('TERMINATED', 'STOPPED_EARLY')),
             e as (select trial_id, epoch, top1 from '{experiment}/epochs.parquet'
                   where top1 is not null),
             reach as (select trial_id, max(epoch) as reached from e group by trial_id)
        select t.*, max(e.top1) as top1_at
        from t join reach using (trial_id) join e using (trial_id)
        where e.epoch <= {epoch} and (reach.reached >= {epoch} or t.status = 'TERMINATED')
        group by all"""


def _common_epoch(experiment) -> int:
    # The highest epoch at which at least min(4, trials) trials are measured.
    ended = duckdb.sql(f"""
        select distinct max(epoch) as reached from '{experiment}/epochs.parquet' e
        join '{experiment}/trials.parquet' t using (trial_id)
        where t.status in ('TERMINATED', 'STOPPED_EARLY') group by trial_id
        order by reached desc""").fetchall()
    total = len(ended_trials := duckdb.sql(f"""
        select distinct trial_id from '{experiment}/epochs.parquet'
        join '{experiment}/trials.parquet' t using (trial_id)
        where t.status in ('TERMINATED', 'STOPPED_EARLY')""").fetchall())
    assert ended_trials
    for (epoch,) in ended:
        if duckdb.sql(f"select count(*) from ({_measured(experiment, epoch)})"
                      ).fetchall()[0][0] >= min(4, total):
            return epoch
    raise AssertionError("no common epoch")


def test_the_pretrained_vs_scratch_and_freeze_depth_findings_match_the_parquet_files(demo):
    experiment, output = demo
    epoch = _common_epoch(experiment)
    assert re.search(rf"findings, at equal fidelity: top-1 at epoch {epoch}\b", output), output

    # Pretrained (Lite0) vs scratch (resnet18): at the common epoch, or at the last epoch
    # both reached when the scheduler stopped one side before it.
    for at in range(epoch, 0, -1):
        best = dict(duckdb.sql(f"""select "config.backbone", max(top1_at)
                                   from ({_measured(experiment, at)}) group by all""").fetchall())
        if len(best) == 2:
            break
    found = re.search(r"pretrained vs from scratch: (pretrained|from scratch), \+([\d.]+) points "
                      r"over (?:pretrained|from scratch) \(([\d.]+)% vs ([\d.]+)%\)", output)
    assert found, output
    winner = "pretrained" if best["efficientnet_lite0"] > best["resnet18"] else "from scratch"
    assert found[1] == winner
    assert float(found[2]) == pytest.approx(abs(best["efficientnet_lite0"] - best["resnet18"]),
                                            abs=0.051)
    assert (at == epoch) == (f"at epoch {at}, the last both sides reached" not in output)

    # The best freeze depth of the pretrained trials fine-tuned by SGD (the linear head; a
    # classical head freezes every stage it reads), at the common epoch or, when one depth
    # alone reached it, at the last epoch two depths reached.
    for at in range(epoch, 0, -1):
        depths = duckdb.sql(f"""select "config.freeze_depth" as depth, max(top1_at) as top1
                                from ({_measured(experiment, at)})
                                where "config.backbone" = 'efficientnet_lite0'
                                  and "config.head" = 'linear'
                                group by all order by top1 desc, depth""").fetchall()
        if len(depths) >= 2:
            break
    found = re.search(r"freeze depth: depth (\d+)(?:, \+| and depth \d+ tie)", output)
    assert found, output
    assert int(found[1]) == depths[0][0]
    gap = depths[0][1] - depths[1][1]
    if gap >= 1.0:
        assert f"+{gap:.1f} points over depth {depths[1][0]}" in output
    else:
        assert f"depth {depths[0][0]} and depth {depths[1][0]} tie" in output


def test_the_warm_start_baseline_is_compared_at_one_epoch(demo):
    experiment, output = demo
    found = re.findall(r"warm-start baseline (\S+): top-1 ([\d.]+)% -> best ([\d.]+)% "
                       r"\([+-][\d.]+ points, both up to epoch (\d+)\)", output)
    assert found, output
    best = re.search(r"^best trial: (\S+) ", output, re.M)[1]
    status = dict(duckdb.sql(f"select trial_id, status from '{experiment}/trials.parquet'"
                             ).fetchall())
    reached = dict(duckdb.sql(f"select trial_id, max(epoch) from '{experiment}/epochs.parquet'"
                              f" group by all").fetchall())
    for baseline, was, now, epoch in found:
        # the epoch both are measured at: where a trial the scheduler cut stopped, else the
        # longer run (a TERMINATED trial's final value stands for any later epoch)
        cut = [reached[t] for t in (baseline, best) if status[t] != "TERMINATED"]
        assert int(epoch) == (min(cut) if cut else max(reached[baseline], reached[best]))
        top1 = dict(duckdb.sql(f"""select trial_id, max(top1) from '{experiment}/epochs.parquet'
                                   where trial_id in ('{baseline}', '{best}')
                                     and epoch <= {epoch} group by all""").fetchall())
        assert float(was) == pytest.approx(top1[baseline], abs=0.006)
        assert float(now) == pytest.approx(top1[best], abs=0.006)
