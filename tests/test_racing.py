"""Racing (swarm_merge/racing.py): moving particles scored stage by stage, dropped where they cannot
beat the global best; the search stays exact, reproducible and resumable, and counts its dev rows."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from swarm_merge import cli, distributed, racing, search, swarm
from swarm_merge.errors import EvaluationError, RecipeError
from swarm_merge.objectives import Custom, Example, Score, Suite, aggregate
from swarm_merge.recipe import SwarmSettings

ROWS = 96
DEV = [Example(prompt=f"q{i}", answer="a", group=f"task{i % 4}") for i in range(ROWS)]
OBJECTIVE = SimpleNamespace(type="exact_match")
TARGET = np.array([[0.6, 0.3, 0.1]])
# Row r is solved by a position within reach_r of the target: the closer, the more rows (utility).
REACH = np.random.default_rng(0).uniform(0.05, 0.9, ROWS)


def row_values(x: np.ndarray) -> np.ndarray:
    return (np.linalg.norm(np.asarray(x) - TARGET) < REACH).astype(float)


def race_of(seed=42, fraction=0.25, confidence=0.95, data=DEV, objective=OBJECTIVE):
    return racing.plan_race(objective, data, fraction=fraction, confidence=confidence, seed=seed)


def score_rows(values, idx, race):
    return aggregate([values[i] for i in idx], [1.0] * len(idx), [race.data[i] for i in idx])


# ------------------------------------------------------------------ the race's rows


def test_stages_are_nested_stratified_and_drawn_from_the_seed():
    race = race_of()
    seen = [race.seen(j) for j in range(len(race.parts))]
    assert [len(s) for s in seen] == [24, 48, 72, 96]  # a quarter, a half, three quarters, all
    everything = np.concatenate(race.parts)
    assert sorted(everything.tolist()) == list(range(ROWS))  # disjoint parts that cover every row once
    for group in range(4):  # each stage takes its share of every row group
        assert [sum(int(i) % 4 == group for i in part) for part in race.parts] == [6, 6, 6, 6]
    # The slice doubles up to half the rows, then the rows left are halved while they are at least the slice.
    assert [len(s) for s in map(race_of(fraction=0.125).seen, range(6))] == [12, 24, 48, 72, 84, 96]
    assert [len(s) for s in map(race_of(fraction=0.3).seen, range(3))] == [28, 56, 96]
    # A row group used up before the last stage adds nothing to a halving stage (left out, not an empty stage).
    small = [Example(prompt=f"q{i}", answer="a", group=f"task{i % 4}") for i in range(20)]
    assert [len(p) for p in race_of(data=small).parts] == [8, 8, 4]
    assert all(np.array_equal(a, b) for a, b in zip(race.parts, race_of().parts))
    assert not np.array_equal(race.parts[0], race_of(seed=43).parts[0])


def test_too_few_rows_to_race_is_none_and_racing_true_says_so():
    few = DEV[:4]
    assert race_of(data=few) is None
    settings = SwarmSettings(racing=True)
    with pytest.raises(RecipeError, match="race_slice"):
        racing.race_of(settings, OBJECTIVE, few)
    assert racing.race_of(SwarmSettings(), OBJECTIVE, few) is None  # auto: quietly off


@pytest.mark.parametrize("bad", [{"race_slice": 0}, {"race_slice": 1}, {"race_slice": "half"},
                                 {"race_neighbours": -1}, {"race_neighbours": 2.5}, {"race_neighbours": "many"}])
def test_a_bad_race_setting_is_refused_by_name(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=next(iter(bad))):
        SwarmSettings(**bad)


def test_objectives_that_score_a_whole_set_never_race():
    custom = Custom(SimpleNamespace(type="custom"), lambda *a: 0.0)
    lm_eval = SimpleNamespace(type="lm_eval", name="t", weight=1.0)
    mixed = Suite((SimpleNamespace(type="exact_match", name="e", weight=1.0), lm_eval))
    for objective in (custom, lm_eval, mixed):
        assert not racing.can_race(objective)
        assert racing.race_of(SwarmSettings(), objective, DEV) is None
        with pytest.raises(RecipeError, match="racing: auto"):
            racing.race_of(SwarmSettings(racing=True), objective, DEV)
    assert racing.race_of(SwarmSettings(racing=False), OBJECTIVE, DEV) is None


def test_the_stages_combined_are_the_whole_sets_score():
    race = race_of()
    values = np.random.default_rng(1).integers(0, 2, ROWS).astype(float)
    whole = aggregate(values, [1.0] * ROWS, DEV)
    parts = [score_rows(values, idx, race) for idx in race.parts]
    got = race.combine(parts)
    assert got.utility == whole.utility and got.groups == whole.groups and got.n == ROWS
    half = race.combine(parts[:2])  # before the last stage: the score of the rows seen
    assert half.utility == pytest.approx(values[race.seen(1)].mean()) and half.n == 48
    failed = race.combine([parts[0], Score(float("nan"), {}, 24)])
    assert math.isnan(failed.utility)


# ------------------------------------------------------------------ the rule


def reference(values):
    return aggregate(values, [1.0] * ROWS, DEV).to_dict(rows=True)


def test_a_particle_as_good_as_the_best_goes_on_and_a_clearly_worse_one_is_dropped():
    race = race_of()
    best = np.ones(ROWS)
    best[::3] = 0.0
    ref = reference(best)
    same = score_rows(best, race.seen(0), race)
    assert race.verdict(same, race.seen(0), ref) is None
    worse = best.copy()
    worse[race.seen(0)[::2]] = 0.0  # half the slice lost
    estimate = race.verdict(score_rows(worse, race.seen(0), race), race.seen(0), ref)
    assert estimate is not None and estimate < ref["utility"]
    diff = (worse - best)[race.seen(0)].mean()
    assert estimate == pytest.approx(ref["utility"] + diff)
    assert math.isnan(race.verdict(Score(float("nan"), {}, 24), race.seen(0), ref))  # failed: nothing to finish
    assert race.verdict(same, race.seen(0), {"utility": 0.5}) is None  # a reference without rows: no race


def test_one_row_worse_on_the_slice_is_not_enough_evidence():
    race = race_of()
    best = np.ones(ROWS)
    best[::2] = 0.0
    worse = best.copy()
    worse[next(i for i in race.seen(0) if best[i] == 1)] = 0.0
    assert race.verdict(score_rows(worse, race.seen(0), race), race.seen(0), reference(best)) is None


def test_race_gain_row_drops_a_tie_and_finishes_a_particle_that_may_gain_a_row():
    any_gain, row_gain = race_of(), racing.plan_race(OBJECTIVE, DEV, fraction=0.25, confidence=0.95, seed=42,
                                                      gain="row")
    best = np.ones(ROWS)
    best[::3] = 0.0
    ref, seen = reference(best), row_gain.seen(0)
    tie = score_rows(best, seen, row_gain)
    assert any_gain.verdict(tie, seen, ref) is None  # "any": a tie may still beat the best on the other rows
    assert row_gain.verdict(tie, seen, ref) == ref["utility"]  # "row": dropped, at the best's own score
    ahead = best.copy()
    ahead[next(i for i in seen if best[i] == 0)] = 1.0  # one row better on the slice: it may change the winner
    assert row_gain.verdict(score_rows(ahead, seen, row_gain), seen, ref) is None
    soft = best * 0.5 + 0.25  # rows that are not 0/1 (loglik, reward): no whole row to ask for, as "any"
    assert row_gain.verdict(score_rows(soft, seen, row_gain), seen, reference(soft)) is None
    assert racing.race_of(SwarmSettings(race_gain="row"), OBJECTIVE, DEV).gain == "row"


def test_a_harmonic_suite_races_on_its_linearised_utility():
    parts = (SimpleNamespace(type="exact_match", name="a", weight=1.0),
             SimpleNamespace(type="exact_match", name="b", weight=1.0))
    suite = Suite(parts, "harmonic")
    data = [DEV[:48], DEV[48:]]
    race = racing.plan_race(suite, data, fraction=0.25, confidence=0.95, seed=42)
    assert race is not None and racing.can_race(suite)
    best = np.ones(ROWS)
    best[1::4] = 0.0

    def scored(values, idx):
        mine = [i for i in idx if i < 48], [i for i in idx if i >= 48]
        return suite.combined([aggregate(values[m], [1.0] * len(m), [DEV[i] for i in m]) for m in mine])

    ref = scored(best, np.arange(ROWS)).to_dict(rows=True)
    assert ref["utility"] == pytest.approx(0.75)
    worse = best.copy()
    worse[[i for i in race.seen(0) if i >= 48]] = 0.0  # component b collapses on the slice
    assert race.verdict(scored(worse, race.seen(0)), race.seen(0), ref) is not None
    assert race.verdict(scored(best, race.seen(0)), race.seen(0), ref) is None


def test_the_contested_rows_come_after_the_slice_and_the_settled_rows_keep_the_stages():
    race = racing.plan_race(OBJECTIVE, DEV, fraction=0.25, confidence=0.95, seed=42, neighbours=2)
    best = np.ones(ROWS)
    best[::3] = 0.0
    near, far = np.array([[0.5, 0.3, 0.2]]), np.array([[0.0, 0.0, 1.0]])
    differ = best.copy()
    differ[[1, 2, 3, 50]] = 1 - differ[[1, 2, 3, 50]]
    other = best.copy()
    other[[90]] = 1 - other[[90]]
    x = np.array([[0.55, 0.3, 0.15]])
    # The two positions nearest x are `near` and the one beside it; `far` (its row 90 differs) is left out.
    finished = [(far, other), (near, differ), (near + 1e-3, best)]
    contested = race.contested(x, best, finished)
    assert sorted(np.flatnonzero(contested).tolist()) == [1, 2, 3, 50]
    plan = race.plan(contested)
    assert np.array_equal(plan[0], race.parts[0])  # the slice first, as for every particle
    assert sorted(plan[1].tolist()) == sorted(set([1, 2, 3, 50]) - set(race.parts[0].tolist()))
    for got, stage in zip(plan[2:], race.parts[1:]):  # then each stage's settled rows
        assert np.array_equal(got, stage[~contested[stage]])
    assert sorted(np.concatenate(plan).tolist()) == list(range(ROWS))  # every row once
    # Nothing to stratify by: no neighbours, none differs, or every row differs (continuous rows).
    assert racing.plan_race(OBJECTIVE, DEV, fraction=0.25, confidence=0.95, seed=42).contested(x, best, finished) is None
    assert race.contested(x, best, [(near, best)]) is None
    assert race.contested(x, best, [(near, best * 0.5 + 0.1)]) is None
    half = best.copy()
    half[: ROWS // 2 + 1] = 1 - half[: ROWS // 2 + 1]
    assert race.contested(x, best, [(near, half)]) is None  # over half the rows: the neighbours say too little
    assert race.contested(x, best, [(near, half), (far, best)]) is None
    half[ROWS // 2] = best[ROWS // 2]
    assert race.contested(x, best, [(near, half)]).sum() == ROWS // 2
    assert race.plan(None) == race.parts


def test_one_contested_row_lost_is_dropped_where_the_plain_estimate_goes_on():
    race = racing.plan_race(OBJECTIVE, DEV, fraction=0.25, confidence=0.95, seed=42, neighbours=4)
    best = np.ones(ROWS)
    best[::3] = 0.0
    ref = reference(best)
    contested = np.zeros(ROWS, dtype=bool)
    contested[[i for i in range(ROWS) if best[i] == 1][:6]] = True
    plan = race.plan(contested)
    worse = best.copy()
    worse[np.flatnonzero(contested)[0]] = 0.0  # one row lost, a contested one; the settled rows as the best's
    seen = np.sort(np.concatenate(plan[:2]))  # the slice and every contested row
    estimate = race.verdict(score_rows(worse, seen, race), seen, ref, contested)
    assert estimate == pytest.approx(ref["utility"] - 1 / ROWS)  # the contested rows are known: exact there
    # The same rows as one random sample: one row worse is not enough evidence.
    assert race.verdict(score_rows(worse, seen, race), seen, ref) is None
    # A tie on every contested row and the settled rows seen goes on with "any", and with "row" is dropped
    # only once every contested row is seen.
    tie = score_rows(best, seen, race)
    assert race.verdict(tie, seen, ref, contested) is None
    row_gain = racing.plan_race(OBJECTIVE, DEV, fraction=0.25, confidence=0.95, seed=42, gain="row", neighbours=4)
    assert row_gain.verdict(tie, seen, ref, contested) == ref["utility"]
    slice_only = plan[0]
    assert (contested & ~np.isin(np.arange(ROWS), slice_only)).any()  # (contested rows left after the slice)
    assert row_gain.verdict(score_rows(best, slice_only, race), slice_only, ref, contested) is None


# ------------------------------------------------------------------ the search


class RowEvaluator:
    """Scores positions on rows from :func:`row_values`; counts calls; can fail after ``fail_after``."""

    def __init__(self, race, fail_after=None):
        self.race, self.calls, self.fail_after = race, 0, fail_after
        self.staged = []  # the position of each stage scored, in order

    def tick(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise EvaluationError("killed")

    def full(self, x):
        self.tick()
        return aggregate(row_values(x), [1.0] * ROWS, DEV)

    def rows(self, x, idx):
        self.tick()
        self.staged.append(search.position_key(x))
        return score_rows(row_values(x), idx, self.race)


def swarm_settings(**update):
    return SwarmSettings(size=7, max_iterations=8, **update)


def run(tmp_path, name, settings, race, evaluator, resume=False, rows_layout=None, ranks=None):
    return search.run_search(settings, num_experts=3, num_groups=1, evaluate=evaluator.full,
                             checkpoint=tmp_path / f"{name}.json", fingerprint="t", progress=False, resume=resume,
                             race=race, evaluate_rows=evaluator.rows if race else None, rows_layout=rows_layout,
                             ranks=ranks)


def until_done(tmp_path, name, settings, race, evaluator, ranks=lambda attempt: None):
    """The run killed wherever ``evaluator()`` fails (a fresh one per attempt), resumed each time until it ends."""
    for attempt in range(60):
        try:
            return run(tmp_path, name, settings, race, evaluator(), resume=attempt > 0, ranks=ranks(attempt))
        except EvaluationError:
            continue
    raise AssertionError("the run never ended")


class TwoRanks(distributed.Ranks):
    """Two processes played by one: ``map`` runs rank 0's share then rank 1's (round-robin, as the ranks split
    it), then ``on_done`` for every item in order, as every rank does after the gather."""

    def __init__(self):
        super().__init__()
        self.world = 2

    def map(self, fn, items, on_done=None):
        order = list(range(0, len(items), 2)) + list(range(1, len(items), 2))
        got = {i: fn(items[i]) for i in order}
        out = [got[i] for i in range(len(items))]
        for i, r in enumerate(out):
            if on_done is not None:
                on_done(i, r)
        return out


def test_racing_spends_fewer_rows_and_its_winner_is_scored_on_every_row(tmp_path):
    settings = swarm_settings()
    race = racing.race_of(settings, OBJECTIVE, DEV)
    plain = run(tmp_path, "plain", settings, None, RowEvaluator(None))
    raced = run(tmp_path, "raced", settings, race, RowEvaluator(race))
    assert plain.items == ROWS * len(plain.memo) and plain.raced is None
    assert raced.state.evaluations == plain.state.evaluations == 7 * 9  # the same positions budget
    assert raced.raced["dropped"] > 0 and raced.items < plain.items
    # Every row counted once: the positions scored on every row, plus the dropped ones' stages.
    dropped = json.loads((tmp_path / "raced.json").read_text())["partial"]
    assert raced.raced["dropped"] == len(dropped)
    assert raced.items == ROWS * len(raced.memo) + sum(len(p["rows"]) for e in dropped.values() for p in e["parts"])
    # The winner (the global best) was scored on every row, and its score is the whole set's.
    assert raced.best_score.n == ROWS
    assert raced.best_score.utility == aggregate(row_values(raced.best), [1.0] * ROWS, DEV).utility
    assert raced.history[-1]["items"] + ROWS == raced.items  # (and the average of the top five, scored after)


@pytest.mark.parametrize("calls,neighbours", [(7, 4), (23, 4), (40, 4), (23, 0)])
def test_same_seed_same_winner_and_resume_equals_an_uninterrupted_run(tmp_path, calls, neighbours, monkeypatch):
    settings = swarm_settings(race_neighbours=neighbours)
    race = racing.race_of(settings, OBJECTIVE, DEV)
    explored, propose = [], swarm.propose

    def spy(*args):
        proposal = propose(*args)
        explored.append(proposal.explorer)
        return proposal

    monkeypatch.setattr(swarm, "propose", spy)
    whole = run(tmp_path, "whole", settings, race, RowEvaluator(race))
    assert max(explored) >= 0  # the defaults' explorer moved (its draw is part of what a resume must replay)
    again = run(tmp_path, "again", settings, race, RowEvaluator(race))
    assert np.array_equal(whole.best, again.best) and whole.items == again.items
    # Killed every `calls` evaluations (in the middle of races, after drops were decided and saved),
    # resumed each time until done.
    resumed = until_done(tmp_path, "killed", settings, race, lambda: RowEvaluator(race, fail_after=calls))
    assert resumed.resumed
    assert np.array_equal(resumed.best, whole.best) and resumed.best_score.utility == whole.best_score.utility
    assert resumed.items == whole.items and resumed.raced == whole.raced
    assert resumed.memo == whole.memo


def test_several_processes_race_each_position_whole_and_book_the_same_run(tmp_path):
    """With several ranks each position is raced through all its stages on the rank that owns it (one build
    there), then every rank books it: the same run as one process's, each stage scored once, and a run killed
    in the middle resumes (with one process or two) to the same result."""
    settings = swarm_settings()
    race = racing.race_of(settings, OBJECTIVE, DEV)
    one_eval, two_eval = RowEvaluator(race), RowEvaluator(race)
    one = run(tmp_path, "one", settings, race, one_eval)
    two = run(tmp_path, "two", settings, race, two_eval, ranks=TwoRanks())
    assert one.raced["dropped"] > 0 and one.raced["finished"] > 0
    assert np.array_equal(one.best, two.best) and one.items == two.items and one.raced == two.raced
    assert list(one.memo) == list(two.memo)  # (the same order: every rank books every race, in order)
    assert one.memo == two.memo and one.history == [{**h, "seconds": o["seconds"]} for h, o in
                                                   zip(two.history, one.history)]
    assert two_eval.calls == one_eval.calls  # (booking a gathered race scores nothing again)
    # each position's stages one after the other (its weights built once), not interleaved with another's
    runs = [k for i, k in enumerate(two_eval.staged) if i == 0 or two_eval.staged[i - 1] != k]
    assert len(runs) == len(set(runs)) and len(runs) < len(two_eval.staged)
    partial = [list(json.loads((tmp_path / f"{n}.json").read_text())["partial"].items()) for n in ("one", "two")]
    assert partial[0] == partial[1]
    for first in (None, TwoRanks()):  # (then one process and two in turn)
        resumed = until_done(tmp_path, f"killed-{first is None}", settings, race,
                             lambda: RowEvaluator(race, fail_after=23),
                             ranks=lambda attempt, first=first: TwoRanks() if attempt % 2 else first)
        assert resumed.resumed
        assert np.array_equal(resumed.best, one.best) and resumed.items == one.items and resumed.memo == one.memo


class FailingEvaluator(RowEvaluator):
    """Scores NaN (no rows: a build with NaN weights) for positions whose first coefficient is above 0.5."""

    def rows(self, x, idx):
        got = super().rows(x, idx)
        return Score(float("nan"), {}, len(idx)) if np.asarray(x)[0, 0] > 0.5 else got

    def full(self, x):
        got = super().full(x)
        return Score(float("nan"), {}, ROWS) if np.asarray(x)[0, 0] > 0.5 else got


def test_a_failed_stage_is_dropped_and_a_checkpoint_holding_it_resumes(tmp_path):
    settings = swarm_settings()
    race = racing.race_of(settings, OBJECTIVE, DEV)
    whole = run(tmp_path, "whole", settings, race, FailingEvaluator(race))
    failed = [e for e in json.loads((tmp_path / "whole.json").read_text())["partial"].values()
              if e["parts"][-1]["utility"] is None]
    assert failed and all("rows" not in e["parts"][-1] for e in failed)
    resumed = until_done(tmp_path, "killed", settings, race, lambda: FailingEvaluator(race, fail_after=11))
    assert resumed.resumed
    assert np.array_equal(resumed.best, whole.best) and resumed.items == whole.items and resumed.memo == whole.memo


def _stage(entry):
    entry["stage"] = 7


def _contested(entry):
    entry["contested"] = [10 ** 6]


def _rows(entry):
    entry["parts"][0]["rows"] = entry["parts"][0]["rows"][:-1]
    entry["parts"][0]["weights"] = entry["parts"][0]["weights"][:-1]


@pytest.mark.parametrize("damage", [_stage, _contested, _rows])
def test_a_damaged_raced_entry_in_a_checkpoint_is_refused(tmp_path, damage):
    settings = swarm_settings()
    race = racing.race_of(settings, OBJECTIVE, DEV)
    with pytest.raises(EvaluationError):
        run(tmp_path, "cp", settings, race, RowEvaluator(race, fail_after=30))
    path = tmp_path / "cp.json"
    data = json.loads(path.read_text())
    assert data["partial"], "the kill should leave a raced position mid-race"
    key = next(iter(data["partial"]))
    damage(data["partial"][key])
    path.write_text(json.dumps(data))
    from swarm_merge.errors import OutputError

    with pytest.raises(OutputError, match="damaged"):
        run(tmp_path, "cp", settings, race, RowEvaluator(race), resume=True)


# ------------------------------------------------------------------ the command


def test_the_run_reports_its_rows_and_the_plan_says_how_it_races(tiny_recipe, capsys):
    recipe = tiny_recipe(objective="exact_match")
    assert cli.main([str(recipe), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    # the default: a slice of 1/8, then the rows the 4 nearest scored positions contest
    assert "racing: " in plan and "by a whole row" not in plan
    assert "the rows where one of the 4 scored positions nearest it differs from the global best" in plan
    assert cli.main([str(recipe), "--set", "swarm.race_neighbours=0", "--dry-run"]) == 0
    assert "nearest it" not in capsys.readouterr().out
    assert cli.main([str(recipe), "--set", "swarm.race_gain=row", "--dry-run"]) == 0
    assert "cannot beat the global best by a whole row" in capsys.readouterr().out
    assert cli.main([str(recipe), "--set", "swarm.racing=false", "--dry-run"]) == 0
    assert "racing: " not in capsys.readouterr().out


# ------------------------------------------------------------------ the winner: the average of the top positions


class Rigged(RowEvaluator):
    """Scores one position (``at``) on ``value`` rows (all 0 or all 1), every other one as RowEvaluator does."""

    def __init__(self, race, at, value):
        super().__init__(race)
        self.at, self.value = search.position_key(at), value

    def full(self, x):
        if search.position_key(x) == self.at:
            self.tick()
            return aggregate([self.value] * ROWS, [1.0] * ROWS, DEV)
        return super().full(x)


def scored_positions(result):
    """The distinct positions scored on every row, in the archive's order, and their memo entries."""
    seen, xs, entries = set(), [], []
    for x in result.state.archive_x:
        key = search.position_key(x)
        if key in result.memo and key not in seen:
            seen.add(key)
            xs.append(x)
            entries.append(result.memo[key])
    return np.asarray(xs), entries


def top_five(result):
    """The average of the five best distinct positions scored on every row, from the archive and the memo."""
    xs, entries = scored_positions(result)
    order = sorted(range(len(xs)), key=lambda i: (-entries[i]["utility"], i))
    return xs[order[:5]].mean(axis=0)


@pytest.mark.parametrize("raced", [True, False])
def test_the_winner_is_the_bagged_average_unless_the_global_best_beats_it(tmp_path, raced):
    settings = swarm_settings()
    assert settings.average_top == "bag"  # the default
    race = racing.race_of(settings, OBJECTIVE, DEV) if raced else None
    plain = run(tmp_path, "best", settings.model_copy(update={"average_top": 1}), race, RowEvaluator(race))
    assert plain.pick is None and np.array_equal(plain.best, plain.state.g)  # 1: the global best (the paper)
    if raced:  # each position weighted by how often it is the best on bootstrap draws of the rows
        xs, entries = scored_positions(plain)
        weights = race.bagged(entries, swarm.BAG_DRAWS, settings.seed)
        average, averaged = np.tensordot(weights, xs, axes=1), int((weights > 0).sum())
    else:  # no per-row scores: the top five
        average, averaged = top_five(plain), 5
    assert np.allclose(average.sum(axis=1), 1.0)  # a merge like any other
    # The average is scored once the search is over: the same search, one position more.
    result = run(tmp_path, "avg", settings, race, RowEvaluator(race))
    assert np.array_equal(result.state.g, plain.state.g) and len(result.memo) == len(plain.memo) + 1
    assert result.items == plain.items + ROWS
    assert result.pick["positions"] == len(plain.memo) and result.pick["top"] == averaged  # chosen from, averaged
    assert result.pick["rule"] == ("bag" if raced else "top") and averaged >= 2
    if raced:  # average_top K: the top K, raced or not
        five = run(tmp_path, "five", settings.model_copy(update={"average_top": 5}), race, RowEvaluator(race))
        assert five.pick["rule"] == "top" and five.pick["top"] == 5
        assert np.array_equal(five.memo[search.position_key(top_five(plain))]["rows"], row_values(top_five(plain)))
    else:  # unraced with the rows' layout (racing off, or streaming): the memo keeps the rows, and the bag works
        layout = racing.layout_of(settings, OBJECTIVE, DEV)
        bare = run(tmp_path, "bare", settings.model_copy(update={"average_top": 1}), None, RowEvaluator(None),
                   rows_layout=layout)
        xs, entries = scored_positions(bare)
        weights = layout.bagged(entries, swarm.BAG_DRAWS, settings.seed)
        bagged = run(tmp_path, "bagged", settings, None, RowEvaluator(None), rows_layout=layout)
        assert bagged.pick["rule"] == "bag" and bagged.pick["top"] == int((weights > 0).sum())
        assert bagged.pick["standard_error"] is not None and bagged.items == bare.items + ROWS
        assert bagged.memo[search.position_key(np.tensordot(weights, xs, axes=1))]["rows"] is not None
    chosen = result.pick["chosen"]
    assert np.array_equal(result.best, average if chosen == "average" else result.state.g)
    assert result.best_score.n == ROWS
    assert result.best_score.utility == aggregate(row_values(result.best), [1.0] * ROWS, DEV).utility
    if raced:  # the standard error of the paired row differences: their sample deviation over sqrt(rows)
        d = row_values(average) - row_values(result.state.g)
        assert result.pick["standard_error"] == pytest.approx(d.std(ddof=1) / math.sqrt(ROWS))
    else:
        assert result.pick["standard_error"] is None
    # An average that scores no row loses to the global best; one that scores every row wins.
    low = run(tmp_path, "low", settings, race, Rigged(race, average, 0.0))
    assert low.pick["chosen"] == "global best" and np.array_equal(low.best, low.state.g)
    assert low.best_score.utility == plain.best_score.utility and low.pick["average"] == 0.0
    high = run(tmp_path, "high", settings, race, Rigged(race, average, 1.0))
    assert high.pick["chosen"] == "average" and np.array_equal(high.best, average) and high.best_score.utility == 1.0
    # Killed while the average is scored (the run's last evaluation), --resume ends as the uninterrupted run.
    counted = RowEvaluator(race)
    run(tmp_path, "count", settings, race, counted)
    with pytest.raises(EvaluationError):
        run(tmp_path, "killed", settings, race, RowEvaluator(race, fail_after=counted.calls - 1))
    resumed = run(tmp_path, "killed", settings, race, RowEvaluator(race), resume=True)
    assert resumed.resumed and resumed.pick == result.pick and np.array_equal(resumed.best, result.best)
    assert resumed.memo == result.memo and resumed.items == result.items


def test_paired_error_is_the_deviation_of_the_row_differences_over_root_rows():
    race = race_of()
    a, b = np.zeros(ROWS), np.zeros(ROWS)
    a[:30], b[10:40] = 1.0, 1.0  # a wins rows 0-9, b rows 30-39
    entry = {k: aggregate(v, [1.0] * ROWS, DEV).to_dict(rows=True) for k, v in (("a", a), ("b", b))}
    assert race.paired_error(entry["a"], entry["b"]) == pytest.approx((a - b).std(ddof=1) / math.sqrt(ROWS))
    assert race.paired_error(entry["a"], entry["a"]) == 0.0
    assert race.paired_error({"utility": 0.3}, entry["b"]) is None  # no rows: nothing to pair


@pytest.mark.parametrize("combine", [None, "mean", "harmonic"])
def test_bagged_weights_count_the_bootstrap_wins_as_a_loop_does(combine):
    rng = np.random.default_rng(3)
    rows = (rng.random((6, ROWS)) < np.linspace(0.4, 0.7, 6)[:, None]).astype(float)
    rows[5] = rows[4]  # a tie: every draw that one wins, the other wins too, and they share it
    parts = (SimpleNamespace(type="exact_match", name="a", weight=1.0),
             SimpleNamespace(type="exact_match", name="b", weight=3.0))
    objective = OBJECTIVE if combine is None else Suite(parts, combine)
    data = DEV if combine is None else [DEV[:40], DEV[40:]]
    race = racing.plan_race(objective, data, fraction=0.25, confidence=0.95, seed=42)
    entries = [{"utility": float(r.mean()), "rows": r.tolist(), "weights": [1.0] * ROWS} for r in rows]
    got = race.bagged(entries, 200, seed=7)
    # The same draws (multinomial row counts per component, in order), scored one by one as the objective would.
    draw, want = np.random.default_rng(7), np.zeros(6)
    sizes = [ROWS] if combine is None else [40, ROWS - 40]
    counts = [draw.multinomial(n, np.full(n, 1.0 / n), size=200) for n in sizes]
    for d in range(200):
        means = [rows[:, s:s + n] @ c[d] / n for c, n, s in zip(counts, sizes, np.cumsum([0] + sizes))]
        if combine is None:
            u = means[0]
        elif combine == "mean":
            u = (means[0] + 3 * means[1]) / 4
        else:
            u = np.array([0.0 if min(a, b) <= 0 else 4 / (1 / a + 3 / b) for a, b in zip(*means)])
        best = u >= u.max()
        want += best / best.sum()
    assert got == pytest.approx(want / 200)
    assert got.sum() == pytest.approx(1.0) and got[4] == got[5]
    # A position better on every row takes every draw; one with no rows: no bagging.
    clear = [dict(e) for e in entries]
    clear[2] = {"utility": 1.0, "rows": [1.0] * ROWS, "weights": [1.0] * ROWS}
    assert race.bagged(clear, 50, seed=7).tolist() == [0, 0, 1, 0, 0, 0]
    assert race.bagged([{"utility": 0.5}] + entries, 50, seed=7) is None


def test_the_bagged_average_skips_failed_positions_and_a_clear_best_is_no_average():
    race = race_of()
    rng = np.random.default_rng(1)
    xs = [np.array([[a, 1.0 - a]]) for a in (0.1, 0.2, 0.3, 0.4)]
    tied = (rng.random(ROWS) < 0.6).astype(float)
    entries = [aggregate(tied, [1.0] * ROWS, DEV).to_dict(rows=True) for _ in range(3)]  # three positions tied
    memo = {search.position_key(x): e for x, e in zip(xs, entries)}
    memo[search.position_key(xs[3])] = {"utility": None}  # failed: no rows
    state = SimpleNamespace(archive_x=np.array(xs))
    average, averaged, rule = search._top_average(state, memo, "bag", race, 42)
    assert (averaged, rule) == (3, "bag") and np.allclose(average, np.mean(xs[:3], axis=0))  # ties share every draw
    better = np.ones(ROWS)  # better than the others on every row: it wins every draw, so nothing is averaged
    memo[search.position_key(xs[0])] = aggregate(better, [1.0] * ROWS, DEV).to_dict(rows=True)
    assert search._top_average(state, memo, "bag", race, 42) == (None, 0, "bag")
    # Without a race (no per-row scores): the top five (here the three finite ones); an integer K: the top K.
    average, averaged, rule = search._top_average(state, memo, "bag", None, 42)
    assert (averaged, rule) == (3, "top") and np.allclose(average, np.mean(xs[:3], axis=0))
    assert search._top_average(state, memo, 2, race, 42)[1:] == (2, "top")


def test_racing_off_still_bags_the_winner(tiny_recipe):
    from swarm_merge.report import read

    recipe = tiny_recipe(objective="exact_match")
    assert cli.main([str(recipe), "--set", "swarm.racing=false", "--no-progress"]) == 0
    s = read(recipe.parent / "out" / "swarm.json").search
    assert s.racing is None and s.items == s.distinct_positions_scored * 12  # every position on every row
    assert s.average.rule == "bag" and s.average.standard_error is not None and s.average.top >= 2
