"""Several objectives at once (`objectives:` + `combine: mean | harmonic`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import tiny
from swarm_merge import cli, report as report_mod
from swarm_merge.objectives import Score, Suite
from swarm_merge.recipe import Objective


def suite(combine: str, weights=(1.0, 1.0)) -> Suite:
    parts = tuple(Objective(type="exact_match", dev=f"{n}.jsonl", name=n, weight=w) for n, w in zip("ab", weights))
    return Suite(parts, combine)


def test_mean_and_harmonic_by_hand():
    a, b = Score(0.8, {"x": 0.5}, 10), Score(0.2, {}, 5)
    mean = suite("mean", (1, 3)).combined([a, b])
    assert mean.utility == pytest.approx((0.8 + 3 * 0.2) / 4) and mean.n == 15
    assert mean.groups == {"a": 0.8, "a/x": 0.5, "b": 0.2}
    harmonic = suite("harmonic", (1, 3)).combined([a, b])
    assert harmonic.utility == pytest.approx(4 / (1 / 0.8 + 3 / 0.2))
    assert suite("harmonic").combined([a, Score(0.0)]).utility == 0.0  # one skill lost: no credit
    assert math.isnan(suite("mean").combined([a, Score(float("nan"))]).utility)


def write(root: Path, body: str, experts) -> Path:
    rows = tiny.arithmetic_rows(12)
    for name, data in (("a", rows[:6]), ("b", rows[6:]), ("at", tiny.arithmetic_rows(6, offset=3)),
                       ("bt", tiny.arithmetic_rows(6, offset=9))):
        tiny.write_jsonl(root / "data" / f"{name}.jsonl", data)
    lines = "\n".join(f"  - {p}" for p in experts)
    path = root / "recipe.yml"
    path.write_text(f"name: multi\nexperts:\n{lines}\n{body}\nswarm: {{size: 5, max_iterations: 2}}\n"
                    f"output: {{dir: {root / 'out'}}}\n")
    return path


TWO = """objectives:
  - {type: exact_match, dev: data/a.jsonl, test: data/at.jsonl, name: first, max_new_tokens: 3}
  - {type: multiple_choice, dev: data/b.jsonl, test: data/bt.jsonl, weight: 2}
combine: harmonic"""


def test_a_harmonic_run_reports_every_component(tiny_experts, tmp_path, capsys):
    # multiple_choice rows need choices: give the b files some.
    recipe = write(tmp_path, TWO, tiny_experts)
    for name in ("b", "bt"):
        path = tmp_path / "data" / f"{name}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        tiny.write_jsonl(path, [{"prompt": r["prompt"], "choices": [r["answer"], "0", "99"], "answer": 0,
                                 "task": r["task"]} for r in rows])
    assert cli.main([str(recipe)]) == 0
    report = report_mod.read(tmp_path / "out" / "swarm.json")
    for row in report.scores.rows:
        for split in (row.dev, row.test):
            first, b = split.groups["first"], split.groups["b"]
            want = 0.0 if min(first, b) <= 0 else 3 / (1 / first + 2 / b)
            assert split.utility == pytest.approx(want)
            assert {"first/add", "first/sum", "b/add", "b/sum"} <= set(split.groups)
    assert report.data.dev_rows == 12 and report.data.test_rows == 12
    card = (tmp_path / "out" / "README.md").read_text()
    assert "harmonic of first (exact_match), b (multiple_choice)" in card


@pytest.mark.parametrize("body, message", [
    ("objective: {type: loglik, dev: data/a.jsonl}\n" + TWO, "both objective: and objectives:"),
    ("combine: mean", "missing key 'objective'"),
    ("objectives:\n  - {type: loglik, dev: data/a.jsonl}\n  - {type: loglik, dev: data/b.jsonl}\ncombine: harmonic",
     "needs positive utilities"),
    ("objectives:\n  - {type: loglik, dev: data/a.jsonl}", "lists one objective"),
    ("objectives:\n  - {type: loglik, dev: data/a.jsonl, name: x}\n  - {type: loglik, dev: data/b.jsonl, name: x}",
     "named 'x'"),
    ("objective: {type: loglik, dev: data/a.jsonl}\ncombine: harmonic", "combine applies to an objectives"),
    ("objectives:\n  - {type: loglik, dev: data/a.jsonl, name: 'a b'}\n  - {type: loglik, dev: data/b.jsonl}",
     "objectives.0.name"),
])
def test_bad_objective_lists_exit_2_with_one_line(body, message, tiny_experts, tmp_path, capsys):
    recipe = write(tmp_path, body, tiny_experts)
    assert cli.main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
