"""The bench scripts' shared report: targets, verdicts, the table and the JSON.

The verdict words decide exit codes (``irishost_bench.py --strict``,
``ring_bench.py``), so they are checked here rather than trusted to a
benchmark run. No figure is measured: every value is given.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_util", Path(__file__).resolve().parent.parent / "bench" / "_util.py"
)
_util = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = _util  # dataclasses look their module up there
_SPEC.loader.exec_module(_util)

Target, Report, Verdict = _util.Target, _util.Report, _util.Verdict


def new_report() -> Report:
    return Report(
        {"cpu": "test cpu", "cores": 2, "python": "py", "os": "os", "load_at_start": "0"}, "test"
    )


@pytest.mark.parametrize(
    ("value", "verdict"),
    [(35_000, Verdict.GOAL_MET), (25_000, Verdict.FLOOR_MET), (15_000, Verdict.BELOW_FLOOR)],
)
def test_floor_and_goal_on_a_figure_where_higher_is_better(value, verdict):
    target = Target(floor=20_000, goal=30_000)
    assert target.verdict(value) is verdict
    assert target.describe() == "floor >= 20,000, goal >= 30,000"


@pytest.mark.parametrize(
    ("value", "verdict"),
    [(150, Verdict.GOAL_MET), (200, Verdict.GOAL_MET), (250, Verdict.GOAL_MISSED)],
)
def test_a_goal_alone_is_met_or_missed_never_below_floor(value, verdict):
    assert Target(goal=200, higher_is_better=False).verdict(value) is verdict


def test_a_target_needs_a_threshold():
    with pytest.raises(ValueError, match="floor, a goal or both"):
        Target()


def test_a_ratio_target_judges_the_ratio_to_the_baseline_not_the_figure():
    report = new_report()
    ceiling = Target(floor=1.3, higher_is_better=False, on_ratio=True)
    within = report.add("echo, host", 120.0, "us", ceiling, baseline=100.0)
    above = report.add("echo, host again", 140.0, "us", ceiling, baseline=100.0)
    assert within.ratio == pytest.approx(1.2)
    assert (within.target, within.verdict) == ("floor <= 1.3x", Verdict.FLOOR_MET)
    assert above.verdict == Verdict.BELOW_FLOOR


def test_a_ratio_target_without_a_baseline_is_the_callers_mistake():
    with pytest.raises(ValueError, match="echo: a target on a ratio needs a baseline"):
        new_report().add("echo", 1.0, "us", Target(floor=2.0, on_ratio=True))


def test_a_zero_baseline_meets_no_floor():
    row = new_report().add("rate", 10.0, "msgs/s", Target(floor=3.0, on_ratio=True), baseline=0.0)
    assert math.isnan(row.ratio)
    assert row.verdict == Verdict.BELOW_FLOOR


def test_only_figures_below_their_floor_count_as_missed():
    report = new_report()
    report.add("missed goal", 1.0, "x", Target(goal=2.0))
    report.add("below floor", 1.0, "x", Target(floor=2.0))
    report.add("no target", 1.0, "x")
    assert report.missed() == ["below floor"]


def test_latencies_give_mean_p50_p99_and_count_with_ratios_to_a_baseline():
    report = new_report()
    baseline = report.add_latencies("plain", [100.0] * 10)
    stats = report.add_latencies(
        "host",
        [110.0] * 9 + [300.0],
        Target(floor=1.3, higher_is_better=False, on_ratio=True),
        baseline=baseline,
    )
    assert stats == {"mean": pytest.approx(129.0), "p50": 110.0, "p99": 300.0}
    rows = {row.benchmark: row for row in report.rows}
    assert rows["host, mean"].verdict == Verdict.FLOOR_MET
    assert rows["host, p99"].ratio == pytest.approx(3.0)
    assert rows["host, p99"].verdict == ""
    assert rows["host, samples"].value == 10


def test_the_table_leaves_out_columns_no_row_fills():
    report = new_report()
    report.add("plain figure", 1234.5, "msgs/s")
    assert report.table().splitlines()[0].split("|")[1:-1] == [
        " benchmark    ",
        " value ",
        " unit   ",
    ]
    report.add("judged", 2.0, "x", Target(floor=1.0), peers="Go 1.5")
    header = [cell.strip() for cell in report.table().splitlines()[0].split("|")[1:-1]]
    assert header == ["benchmark", "value", "unit", "target", "verdict", "peers on this machine"]


def test_json_holds_the_verdict_words_the_table_prints(tmp_path):
    report = new_report()
    report.add("ring", 6.0, "msgs/s", Target(floor=3.0, on_ratio=True), baseline=1.0)
    report.errors["dispatch"] = "RuntimeError: worker stalled"
    path = tmp_path / "report.json"
    report.write_json(str(path), settings={"rounds": 1})
    written = json.loads(path.read_text())
    assert written["rows"][0]["verdict"] == "floor met"
    assert written["rows"][0]["target"] == "floor >= 3x"
    assert written["errors"] == {"dispatch": "RuntimeError: worker stalled"}
    assert written["settings"] == {"rounds": 1}
    assert "floor met" in report.table()
