"""Was the swarm worth it? Baselines at the swarm's budget, and the paper's analyses.

The searches run on a synthetic utility over coefficients (no model) where
exactness and budgets are checked; the CLI runs ``compare`` on tiny experts.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

from swarm_merge import baselines, cli, compare, report as report_mod, search, swarm
from swarm_merge.publish import card
from swarm_merge.objectives import Score
from swarm_merge.recipe import SwarmSettings

TARGET = np.array([[0.6, 0.5, -0.1]])


class Counting:
    """A smooth utility peaking at TARGET; counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x) -> Score:
        self.calls += 1
        return Score(-float(np.sum((np.asarray(x) - TARGET) ** 2)))


def test_a_position_is_scored_once_and_counted_once_per_method():
    ev = Counting()
    memo = {}
    first = baselines.Budgeted(ev, memo)
    x = np.array([[1.0, 0.0, 0.0]])
    first(x)
    first(x.copy())
    assert first.used == 1 and ev.calls == 1
    second = baselines.Budgeted(ev, memo)  # another method asking for the same position
    second(x)
    assert second.used == 1 and second.fresh == 0 and ev.calls == 1


@pytest.mark.parametrize("method", [baselines.random_search, baselines.cmaes_search])
def test_searches_use_exactly_the_budget_and_are_reproducible(method):
    def go(seed, memo=None):
        ev = Counting()
        counted = baselines.Budgeted(ev, {} if memo is None else memo)
        run = method(counted, num_experts=3, num_groups=1, budget=23, seed=seed)
        return run, counted, ev

    a, counted, ev = go(1)
    assert a.evaluations == counted.used == 23 and ev.calls == 23
    b, _, _ = go(1)
    assert np.array_equal(a.best, b.best) and a.dev.utility == b.dev.utility
    c, _, _ = go(2)
    assert not np.array_equal(a.best, c.best)
    assert np.allclose(a.best.sum(axis=1), 1.0)  # affine, like the swarm's positions
    # With the swarm's memo already holding positions, they still count against the budget, once.
    memo = {}
    pre = baselines.Budgeted(Counting(), memo)
    for row in np.eye(3):
        pre(row[None, :])
    run, counted, ev = go(1, memo)
    assert counted.used == 23 and ev.calls <= 23


def test_cmaes_finds_the_optimum_of_a_smooth_utility():
    run = baselines.cmaes_search(baselines.Budgeted(Counting(), {}), num_experts=3, num_groups=1, budget=200, seed=0)
    assert np.abs(run.best - TARGET).max() < 0.05


def test_weak_to_strong_names_the_particle_that_found_the_global_best(tmp_path):
    settings = SwarmSettings(size=6, max_iterations=6, patience=6, scouts=0)  # (a scout: tests/test_swarm.py)
    result = search.run_search(settings, num_experts=3, num_groups=1, evaluate=Counting(),
                               checkpoint=tmp_path / "s.json", fingerprint="t", progress=False)
    initial = [result.lookup(x).utility for x in result.initial]
    found = baselines.weak_to_strong(result.state, initial, ["a", "b", "c"], seed_soup=True)
    i = found["particle"]
    assert np.array_equal(result.state.p[i], result.state.g)  # (the winner, or the top five's average: average_top)
    assert found["start_rank"] == 1 + sum(u > initial[i] for u in initial)
    assert found["started_as"] == (["a", "b", "c", "uniform soup"] + ["child"] * 2)[i]


def test_emergence_counts_on_a_hand_built_case():
    experts = [[1, 0, 0, 0, 1], [0, 1, 0, 0, 1]]
    winner = [1, 0, 1, 1, 0]
    groups = ["x", "x", "y", "y", None]
    got = baselines.emergence(experts, winner, groups)
    assert got["gained"] == 2 and got["lost"] == 2  # items 2, 3 gained; items 1, 4 lost
    assert got["groups"] == {"y": {"gained": 2, "lost": 0}, "x": {"gained": 0, "lost": 1}}
    assert got["solved_by_some_expert"] == 3 and got["solved_by_winner"] == 3
    assert baselines.emergence([None, experts[1]], winner, groups) is None


def test_compare_reports_every_method_at_the_swarms_budget(tiny_recipe, capsys):
    recipe = tiny_recipe(objective="exact_match")
    assert cli.main(["compare", str(recipe), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "at equal budget" in out and "CMA-ES" in out and "random search" in out
    data = json.loads((recipe.parent / "out" / "swarm.json").read_text())
    report = report_mod.read(recipe.parent / "out" / "swarm.json")
    c = report.comparison
    # The baselines get the swarm's item budget: the dev rows it scored buy whole-dev-set evaluations.
    assert c.items == report.search.items and c.seeds == [42, 43]
    assert c.budget == c.items // report.data.dev_rows <= report.search.distinct_positions_scored
    methods = ("swarm", "random search", "CMA-ES", "GP (Optuna)", "NGOpt (Nevergrad)")
    assert sorted((r.method, r.seed) for r in c.runs) == sorted((m, s) for m in methods for s in (42, 43))
    # One renderer: the terminal's tables and the card's show the same cells (the card adds per-task columns)
    card_text = (recipe.parent / "out" / "README.md").read_text()
    for summary in c.summary:
        cells = [summary.method, f"{summary.dev_mean:.4f} ± {summary.dev_std:.4f}", str(summary.items)]
        assert "| " + " | ".join([card.md(cells[0]), cells[1]]) in card_text
        assert re.search(r"\s+".join(re.escape(x.replace("±", "+-")) for x in cells[:2]), out), summary.method
    for row in report.scores.rows:
        assert re.search(re.escape(row.name) + r"\s+" + re.escape(f"{row.dev.utility:.4f}"), out), row.name
        assert f"| {row.dev.utility:.4f} | {row.test.utility:.4f} |" in card_text
    # At each seed, the dev rows the swarm scored at that seed (paired budgets).
    budgets = {r.seed: r.items // report.data.dev_rows for r in c.runs if r.method == "swarm"}
    assert budgets[42] == c.budget
    assert all(r.evaluations == budgets[r.seed] for r in c.runs if r.method in ("random search", "CMA-ES"))
    # (a GP or NGOpt that keeps proposing the same position stops short of the budget, never past it)
    assert all(0 < r.evaluations <= budgets[r.seed] for r in c.runs if r.method != "swarm")
    assert all(r.items == r.evaluations * report.data.dev_rows for r in c.runs if r.method != "swarm")
    assert next(r for r in c.runs if r.method == "swarm" and r.seed == 42).items == report.search.items
    # The search line gives the search's own time, then the whole run's (mostly the baselines here).
    assert f"{report.search.seconds:.0f} s (the whole run: {report.wall_seconds:.0f} s)" in out
    assert all(r.test is not None for r in c.runs)
    first = next(r for r in c.runs if r.method == "swarm" and r.seed == 42)
    assert first.coefficients == report.scores.winner.coefficients
    assert report.analysis.emergence is not None and report.analysis.weak_to_strong.size == 5
    assert {m.method for m in c.summary} == set(methods)
    assert data["comparison"]["summary"][0]["seeds"] == 2
    # Each method's gap to the swarm, paired by seed: the swarm's utility minus its own, at each seed.
    for summary in c.summary:
        if summary.method == "swarm":
            assert summary.dev_gap is None and summary.test_gap is None
            continue
        for split, gap in (("dev", summary.dev_gap), ("test", summary.test_gap)):
            d = [getattr(next(r for r in c.runs if r.method == "swarm" and r.seed == s), split).utility
                 - getattr(next(r for r in c.runs if r.method == summary.method and r.seed == s), split).utility
                 for s in (42, 43)]
            assert gap.seeds == 2 and gap.mean == pytest.approx(np.mean(d))
            assert (gap.above, gap.below) == (sum(x > 0 for x in d), sum(x < 0 for x in d))
            # 95 % Student t with one degree of freedom: 12.706 * sd / sqrt(2)
            assert gap.half_width == pytest.approx(12.7062 * np.std(d, ddof=1) / np.sqrt(2), rel=1e-4)
        cell = f"{summary.test_gap.mean:+.4f} ± {summary.test_gap.half_width:.4f}"
        assert cell in card_text and cell.replace("±", "+-") in out
    assert "### Was the swarm worth it?" in card_text and "Weak to strong" in card_text


def test_seeds_without_baselines_is_refused(tiny_recipe, capsys):
    assert cli.main([str(tiny_recipe()), "--seeds", "3"]) == 2
    assert "needs --baselines" in capsys.readouterr().err


def test_initial_swarm_distribution_is_what_random_search_draws():
    rng = np.random.default_rng(5)
    x = swarm.initial_positions(3, 9, seed_soup=True, rng=rng)
    run = baselines.random_search(baselines.Budgeted(Counting(), {}), num_experts=3, num_groups=1, budget=9, seed=5)
    pool = {search.position_key(p) for p in x}
    assert search.position_key(run.best) in pool


# ------------------------------------------------------------ mergekit's methods


@pytest.fixture(scope="module")
def based(tmp_path_factory):
    """A tiny base and three experts perturbed from it (tiny.make_experts uses the same base)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny

    root = tmp_path_factory.mktemp("based")
    base = tiny.make_base(root)
    return base, tiny.make_experts(root, 3, scale=0.3)


@pytest.mark.parametrize("name, point", [("task_arithmetic", {"weight": 0.5}),
                                         ("ties", {"weight": 1.0, "density": 0.5})])
def test_mergekit_baselines_equal_mergekit_yaml_on_the_same_config(name, point, based, tmp_path):
    from safetensors.torch import load_file

    from swarm_merge.publish import merge

    base, experts = based
    out = tmp_path / "merged"
    merge.write_merge(baselines.mergekit_config(name, point, base, experts), out)
    written = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    e = [load_file(str(p / "model.safetensors")) for p in experts]
    for tensor, want in written.items():
        got = baselines.mergekit_tensor(name, point, b[tensor], [x[tensor] for x in e])
        assert torch.allclose(got, want, atol=1e-6), tensor


def test_dare_is_seeded(based):
    from safetensors.torch import load_file

    base, experts = based
    b = load_file(str(base / "model.safetensors"))
    e = [load_file(str(p / "model.safetensors")) for p in experts]
    name = "model.layers.0.mlp.up_proj.weight"

    def draw(seed):
        torch.manual_seed(seed)
        return baselines.mergekit_tensor("dare_ties", {"weight": 0.5, "density": 0.5}, b[name], [x[name] for x in e])

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_compare_with_a_base_adds_task_arithmetic_ties_and_dare(based, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny

    base, experts = based
    recipe = tiny.write_recipe(tmp_path, experts, objective="exact_match")
    recipe.write_text(f"base_model: {base}\n" + recipe.read_text())
    assert cli.main(["compare", str(recipe), "--set", "swarm.max_iterations=1"]) == 0
    report = report_mod.read(tmp_path / "out" / "swarm.json")
    got = {r.method: r for r in report.comparison.runs}
    assert {"task arithmetic", "TIES", "DARE"} <= set(got)
    assert got["TIES"].config["merge_method"] == "ties" and got["TIES"].evaluations == 3
    assert got["TIES"].seed is None and got["DARE"].seed == 42
    assert got["task arithmetic"].test is not None
    assert "Task arithmetic, TIES and DARE" in (tmp_path / "out" / "README.md").read_text()
    # The method configs name the models as swarm.json publishes them: relative to the recipe's folder.
    import os

    config = got["TIES"].config
    assert config["base_model"] == os.path.relpath(base, tmp_path)
    assert [m["model"] for m in config["models"]] == [os.path.relpath(p, tmp_path) for p in experts]
    assert str(base.parent) not in (tmp_path / "out" / "swarm.json").read_text()


def test_selection_noise_warns_when_the_gain_is_within_chance():
    """sd/sqrt(N) * sqrt(2 ln E) at the winner's accuracy; a warning when the gain over uniform is within it."""
    import math

    from swarm_merge import report as report_mod, results
    from swarm_merge.recipe import Objective

    def row(name, kind, dev):
        return report_mod.ScoreRow(name=name, kind=kind, coefficients=[[0.5, 0.5]],
                                   dev=report_mod.Split(utility=dev, n=72), test=None)

    objective = Objective(type="exact_match", dev="x.jsonl")
    expected = math.sqrt(0.5 * 0.5) / math.sqrt(72) * math.sqrt(2 * math.log(56))
    close = report_mod.Scores(rows=[row("uniform average", "uniform", 0.375), row("swarm winner", "winner", 0.5)])
    noise, warnings = results.selection_noise(objective, close, 56)
    assert noise == pytest.approx(expected, abs=1e-6) and expected > 0.125
    assert len(warnings) == 1 and "+0.125" in warnings[0] and "56 scores on 72 dev rows" in warnings[0]
    far = report_mod.Scores(rows=[row("uniform average", "uniform", 0.2), row("swarm winner", "winner", 0.5)])
    assert results.selection_noise(objective, far, 56)[1] == []  # a gain of 0.3 is not chance
    loglik = Objective(type="loglik", dev="x.jsonl")
    assert results.selection_noise(loglik, close, 56) == (None, [])  # accuracy objectives only


def test_gap_pairs_seeds_and_skips_missing_scores():
    gap = compare._gap({1: 0.5, 2: 0.7, 3: 0.6, 4: None}, {1: 0.4, 2: 0.7, 3: 0.65, 4: 0.1, 5: 0.9})
    d = np.array([0.1, 0.0, -0.05])  # seeds 1-3: seed 4 has no swarm score, seed 5 no swarm run
    assert (gap.seeds, gap.above, gap.below) == (3, 1, 1)
    assert gap.mean == pytest.approx(d.mean())
    assert gap.half_width == pytest.approx(4.3027 * d.std(ddof=1) / np.sqrt(3), rel=1e-4)  # t(0.975, 2 df)
    one = compare._gap({7: 0.5}, {7: 0.25})
    assert (one.seeds, one.mean, one.half_width, one.above) == (1, 0.25, None, 1)
    assert compare._gap({7: None}, {7: 0.25}) is None


def test_the_swarm_at_another_seed_runs_in_compare_as_it_runs_alone(tiny_recipe, tmp_path, caplog):
    """compare's swarm at its second seed is the run that seed gives alone: raced, and its winner bagged, on
    the rows of every position it scores (the shared memo keeps them), at the same dev rows."""
    recipe = tiny_recipe(objective="exact_match")
    # (without scouts the tiny model's race drops positions at seed 43, which the rows check below needs)
    raced = ["--set", "swarm.racing=true", "--set", "swarm.scouts=0"]
    with caplog.at_level(logging.INFO, logger="swarm_merge.search"):
        assert cli.main(["compare", str(recipe), "--seeds", "2", *raced]) == 0
    # Each seed's winner is the bag's pick (every position has its rows), never the top five's fallback.
    picks = [r.message for r in caplog.records if "against the global best's" in r.message]
    assert len(picks) == 2 and all(m.startswith("the bagged average of") for m in picks), picks
    c = report_mod.read(recipe.parent / "out" / "swarm.json").comparison
    alone_out = tmp_path / "alone"
    assert cli.main([str(recipe), "--seed", "43", "--out", str(alone_out), *raced]) == 0
    alone = report_mod.read(alone_out / "swarm.json")
    other = next(r for r in c.runs if r.method == "swarm" and r.seed == 43)
    assert alone.search.racing is not None and alone.search.racing.dropped > 0  # (the race drops some here)
    assert other.items == alone.search.items < other.evaluations * alone.data.dev_rows
    assert other.coefficients == alone.scores.winner.coefficients
    # The baselines at that seed get its rows, as whole-dev-set evaluations (the run's seed's rows are another budget).
    assert all(r.evaluations == alone.search.items // alone.data.dev_rows
               for r in c.runs if r.seed == 43 and r.method in ("random search", "CMA-ES"))
