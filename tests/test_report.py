"""swarm.json is a typed, versioned contract: the documented schema is the code's."""

import json
from pathlib import Path

import pytest

from swarm_merge import report

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "swarm.schema.json"


def test_the_documented_schema_is_the_codes():
    assert json.loads(SCHEMA.read_text()) == report.json_schema(), (
        "docs/swarm.schema.json is stale: regenerate it with `python -m swarm_merge.report > docs/swarm.schema.json`"
    )


def sample() -> report.Report:
    from swarm_merge.recipe import parse_recipe

    recipe = parse_recipe({"name": "x", "experts": ["./a", "./b"], "objective": {"type": "loglik", "dev": "d.jsonl"},
                           "swarm": {"size": 3}})
    split = report.Split(utility=-1.5, groups={"g": None}, n=3)
    rows = [report.ScoreRow(name=n, kind=k, coefficients=[[1.0, 0.0]], dev=split)
            for n, k in (("a", "expert"), ("uniform average", "uniform"), ("swarm winner", "winner"))]
    return report.Report(
        recipe=recipe,
        experts=[report.ExpertRecord(name="a", model="./a", local=True, parameters=10, digest="d"),
                 report.ExpertRecord(name="b", model="./b", local=True, parameters=10, digest="e")],
        coefficients=report.Coefficients.of([[0.25, 0.75]], ["all tensors"]),
        scores=report.Scores(rows=rows),
        data=report.DataRecord(dev_rows=3),
        search=report.SearchRecord(iterations=0, evaluations=3, distinct_positions_scored=3, stop_reason="x",
                                   resumed=False, seconds=1.0,
                                   history=[report.HistoryEntry(iteration=0, best=None, evaluations=3, seconds=1)]),
        wall_seconds=2.0, hardware="cpu", versions={"swarm_merge": "0"},
    )


def test_a_report_round_trips_through_strict_json(tmp_path):
    r = sample()
    report.write(tmp_path / "swarm.json", r)
    text = (tmp_path / "swarm.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in swarm.json"))
    back = report.read(tmp_path / "swarm.json")
    assert back == r
    assert back.scores.winner.name == "swarm winner" and back.coefficients.model == [0.25, 0.75]
    assert json.loads(text)["schema_version"] == report.SCHEMA_VERSION


def test_the_winner_was_found_at_the_first_iteration_with_its_global_best():
    h = [{"iteration": i, "global_best": g, "evaluations": 8 + 4 * i, "items": 576 + 200 * i, "seconds": 1.0}
         for i, g in enumerate([0.4, 0.5, 0.5, 0.6, 0.6, 0.6])]
    assert report.FoundRecord.of(h) == report.FoundRecord(iteration=3, evaluations=20, items=1176)
    assert report.FoundRecord.of(h[:1]) == report.FoundRecord(iteration=0, evaluations=8, items=576)
    assert report.FoundRecord.of([{**h[0], "global_best": None}]) is None  # (every particle failed)
    assert report.FoundRecord.of([]) is None


def test_non_finite_numbers_are_null():
    assert report.finite(float("nan")) is None and report.finite(float("-inf")) is None
    assert report.finite(1) == 1.0


@pytest.mark.parametrize("content, message", [
    ("{", "cannot be read"),
    ("[]", "not a swarm_merge report"),
    ('{"schema_version": 99}', "schema 99"),
    ('{"schema_version": 2, "tool": "swarm_merge"}', "not a valid report"),
])
def test_unreadable_reports_are_clear_errors(tmp_path, content, message):
    (tmp_path / "swarm.json").write_text(content)
    with pytest.raises(report.ReportError, match=message):
        report.read(tmp_path / "swarm.json")


def test_a_scout_holding_the_global_best_is_named_in_the_card():
    # (swarm.scouts: the weak-to-strong analysis has no particle to rank; the card says what won instead)
    from types import SimpleNamespace

    from swarm_merge.publish import card

    w2s = report.WeakToStrong(particle=None, start_rank=None, started_as="scout", size=8)
    analysis = SimpleNamespace(weak_to_strong=w2s, emergence=None, winner_gap=None, selection_noise=None, warnings=[])
    lines = card._analysis_lines(SimpleNamespace(analysis=analysis))
    assert lines == ["Weak to strong: the global best is a scout (`swarm.scouts`: a draw of the initial children "
                     "scored at the start), which no particle beat."]
