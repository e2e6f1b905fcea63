"""compare's black-box baselines (GP with Optuna, NGOpt with Nevergrad; CMA-ES and random
search as controls) on a synthetic utility over coefficients, no model: budgets, affine
positions, winners, seeds and non-finite utilities.

Runs are module-scoped and shared: a GP step fits a GP (a few tenths of a second)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from swarm_merge import baselines
from swarm_merge.errors import InputError
from swarm_merge.objectives import Score
from swarm_merge.search import position_key

pytest.importorskip("optuna")
pytest.importorskip("nevergrad")

K, G = 3, 2  # experts, groups
TARGET = np.array([[0.6, 0.1, 0.3], [0.2, 0.5, 0.3]])  # affine (rows sum to 1), inside the search box
SOUP = np.full((G, K), 1.0 / K)
BUDGET = 30
SMALL = 12  # for the seed checks: the GP's 10 startup trials, then 2 GP steps
OTHER = 11  # the other seed's run, compared with the first OTHER positions of seed 0's

METHODS = {
    "gp": baselines.gp_search,
    "ngopt": baselines.ngopt_search,
    "cmaes": baselines.cmaes_search,
    "random": baselines.random_search,
}


def utility(x) -> float:
    return -float(np.sum((np.asarray(x) - TARGET) ** 2))


def smooth(x) -> Score:
    return Score(utility(x))


def holey(x) -> Score:
    """NaN wherever the first coefficient passes 0.5, around the optimum too."""
    return Score(math.nan if x[0, 0] > 0.5 else utility(x))


class Recording(baselines.Budgeted):
    """A Budgeted that keeps every position asked, in order (duplicates too)."""

    def __init__(self, evaluate):
        super().__init__(evaluate, {})
        self.positions = []
        self.utilities = []

    def __call__(self, x):
        self.positions.append(np.array(x, dtype=float))
        s = super().__call__(x)
        self.utilities.append(s.utility)
        return s


def run(method, *, budget=BUDGET, seed=0, evaluate=smooth):
    score = Recording(evaluate)
    result = METHODS[method](score, num_experts=K, num_groups=G, budget=budget, seed=seed)
    return score, result


@pytest.fixture(scope="module")
def main_runs():
    return {m: run(m) for m in METHODS}


@pytest.fixture(scope="module")
def seed_runs():
    """Per method: seed 0 twice at the small budget, and seed 1 a little shorter."""
    return {m: (run(m, budget=SMALL), run(m, budget=SMALL), run(m, budget=OTHER, seed=1)) for m in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
def test_exactly_the_budget_of_distinct_positions(main_runs, method):
    score, result = main_runs[method]
    assert score.used == BUDGET and result.evaluations == BUDGET
    assert len({position_key(x) for x in score.positions}) == BUDGET


@pytest.mark.parametrize("method", list(METHODS))
def test_every_position_asked_is_affine(main_runs, method):
    score, result = main_runs[method]
    for x in score.positions + [result.best]:
        assert x.shape == (G, K)
        np.testing.assert_allclose(x.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_winner_is_the_best_position_seen(main_runs, method):
    score, result = main_runs[method]
    assert result.dev.utility == max(score.utilities)
    assert result.dev.utility == utility(result.best)


@pytest.mark.parametrize("method", ["gp", "ngopt", "cmaes"])
def test_it_beats_the_soup(main_runs, method):
    score, result = main_runs[method]
    assert result.dev.utility > utility(SOUP)


@pytest.mark.parametrize("method", ["gp", "ngopt"])
def test_it_starts_at_the_soup(main_runs, method):
    score, _ = main_runs[method]
    np.testing.assert_allclose(score.positions[0], SOUP, atol=1e-15)


def test_the_names():
    assert baselines.gp_search.__name__ in baselines.__all__ and baselines.ngopt_search.__name__ in baselines.__all__
    _, gp = run("gp", budget=1)
    _, ng = run("ngopt", budget=1)
    assert (gp.method, ng.method) == ("GP (Optuna)", "NGOpt (Nevergrad)")


@pytest.mark.parametrize("method", list(METHODS))
def test_the_same_seed_gives_the_same_run(seed_runs, method):
    (a, ra), (b, rb), _ = seed_runs[method]
    assert len(a.positions) == len(b.positions)
    for x, y in zip(a.positions, b.positions):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(ra.best, rb.best)
    assert ra.dev.utility == rb.dev.utility and ra.evaluations == rb.evaluations == SMALL


@pytest.mark.parametrize("method", ["gp", "cmaes", "random"])
def test_another_seed_asks_other_positions(seed_runs, method):
    (a, _), _, (c, rc) = seed_runs[method]
    assert rc.evaluations == OTHER
    n = min(len(a.positions), len(c.positions))
    assert [position_key(x) for x in a.positions[:n]] != [position_key(x) for x in c.positions[:n]]


def test_ngopt_ignores_the_seed_where_it_picks_cobyla(seed_runs):
    """At compare's sizes NGOpt (Nevergrad 1.0) picks Cobyla, a deterministic local search from
    the soup: the seed changes nothing. If this fails, Nevergrad chose otherwise: then seeds
    matter, and this test should become another_seed_asks_other_positions."""
    (a, _), _, (c, _) = seed_runs["ngopt"]
    assert [position_key(x) for x in a.positions[:OTHER]] == [position_key(x) for x in c.positions]


@pytest.mark.parametrize("method", list(METHODS))
def test_a_nan_utility_is_never_the_winner(method):
    score, result = run(method, budget=14, evaluate=holey)
    assert score.used == result.evaluations == 14
    assert any(math.isnan(u) for u in score.utilities)
    assert math.isfinite(result.dev.utility) and result.best[0, 0] <= 0.5
    assert result.dev.utility == max(u for u in score.utilities if math.isfinite(u))


@pytest.mark.parametrize("method", ["gp", "ngopt"])
def test_only_duplicates_end_the_search_instead_of_looping(monkeypatch, method):
    """Every ask lands on the soup (one distinct position): the search gives up after MAX_ASKS * budget asks."""
    monkeypatch.setattr(baselines, "_affine", lambda z, g, k: SOUP.copy())
    monkeypatch.setattr(baselines, "GP_STARTUP", 10**6)  # no GP fits: random asks only (fast)
    score, result = run(method, budget=3)
    assert score.used == result.evaluations == 1
    assert len(score.positions) == baselines.MAX_ASKS * 3


@pytest.mark.parametrize("method, module", [("gp", "optuna"), ("ngopt", "nevergrad")])
def test_a_missing_package_says_which_extra(monkeypatch, method, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(InputError) as info:
        run(method, budget=2)
    message = str(info.value)
    assert message == "compare's GP and NGOpt baselines need optuna and nevergrad: pip install 'swarm-merge[search]'"
    assert "\n" not in message
