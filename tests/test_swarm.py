"""The pure optimiser: exact equivalence with a weight-space run, invariants,
restart, patience, Drop-K/N and determinism."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from swarm_merge import racing, swarm
from swarm_merge.recipe import SwarmSettings


# The paper's values of the levers beyond the paper: the tests below that predate them test the paper's
# update, stop rule and moving experts whatever the product defaults are.
PAPER_LEVERS = {"anchors": False, "update": "paper", "stop": "patience", "surrogate": "off", "explore_after": 0,
                "scouts": 0, "average_top": 1}


def settings(**kw):
    return SwarmSettings(**{"size": 8, "max_iterations": 12, "patience": 4, **PAPER_LEVERS, **kw})


def utility(weights: np.ndarray) -> float:
    # A smooth, non-trivial objective on weight space.
    return float(-np.sum((weights - 0.3) ** 2) + 0.1 * np.sin(weights.sum()))


def run_coefficients(experts, s, steps, rng):
    k = len(experts)
    x0 = swarm.initial_positions(k, s.size, seed_soup=s.seed_soup, rng=rng, init=s.init, spread=s.init_spread)
    score = lambda a: utility(np.tensordot(a[0], experts, axes=1))  # noqa: E731
    state = swarm.init_state(x0, np.array([score(x) for x in x0]), s, rng)
    for _ in range(steps):
        prop = swarm.propose(state, s, rng)
        scores = np.array([score(x) if e else np.nan for x, e in zip(prop.x, prop.evaluate)])
        state = swarm.update(state, prop, scores, s)
    return state


def run_weight_space(experts, s, steps, rng):
    """The paper's algorithm on weights, consuming the same random draws."""
    k, n = len(experts), s.size
    pos = [experts[i].copy() for i in range(k)]
    if s.seed_soup:
        pos.append(experts.mean(0))
    while len(pos) < n:
        if s.init == "soup":  # the soup plus a zero-sum mix of the experts
            z = rng.normal(0.0, s.init_spread, size=(1, k))[0]
            pos.append(experts.mean(0) + np.tensordot(z - z.mean(), experts, axes=1))
            continue
        a, b = rng.choice(len(pos), 2, replace=False)
        w = rng.uniform(0.0, 2.0, size=1)[0]
        pos.append(w * pos[a] + (1 - w) * pos[b])
    pos = np.array(pos)
    vel = np.empty_like(pos)
    for i in range(n):
        j = int(rng.integers(n - 1))
        j += j >= i
        vel[i] = pos[j] - pos[i]
    score = np.array([utility(p) for p in pos])
    pb, pbs = pos.copy(), score.copy()
    g, gs = pos[score.argmax()].copy(), score.max()
    gw, gws = pos[score.argmin()].copy(), score.min()
    stale = np.zeros(n, int)
    lam = s.step_length
    phi = [s.inertia, s.cognitive, s.social, s.repel]
    for _ in range(steps):
        restart = stale >= s.restart_patience * s.patience
        pos[restart] = pb[restart]
        vel[restart] = 0
        stale[restart] = 0
        r = rng.random((n, 1, 4))
        for i in range(n):
            rv, rp, rg, rw = (r[i, 0, t] * phi[t] for t in range(4))
            vel[i] = (rv * vel[i] + rp * (pb[i] - pos[i]) + rg * (g - pos[i]) + rw * (pos[i] - gw)) / (rv + rp + rg + rw)
            pos[i] = pos[i] + lam * vel[i]
        skip_all = rng.random() < s.drop_k
        skip = rng.random(n) < s.drop_n
        new_g = new_gw = None
        for i in range(n):
            if skip_all or skip[i]:
                continue
            score[i] = utility(pos[i])
            if score[i] > pbs[i]:
                pb[i], pbs[i], stale[i] = pos[i].copy(), score[i], 0
            else:
                stale[i] += 1
            if score[i] > gs and (new_g is None or score[i] > score[new_g]):
                new_g = i
            if score[i] < gws and (new_gw is None or score[i] < score[new_gw]):
                new_gw = i
        if new_g is not None:
            g, gs = pos[new_g].copy(), score[new_g]
        if new_gw is not None:
            gw, gws = pos[new_gw].copy(), score[new_gw]
        lam = max(lam * s.step_length_decay, s.min_step_length)
    return pos, vel, g, gs


@pytest.mark.parametrize("kw", [{}, {"seed_soup": False, "init": "paper"}, {"init": "paper"},
                                {"drop_n": 0.3, "drop_k": 0.2}, {"restart_patience": 0.25},
                                {"seed_soup": False, "init_spread": 0.1}])
def test_coefficient_run_equals_weight_space_run(kw):
    s = settings(**kw)
    experts = np.random.default_rng(7).normal(size=(4, 50))
    state = run_coefficients(experts, s, 15, np.random.default_rng(s.seed))
    pos, vel, g, gs = run_weight_space(experts, s, 15, np.random.default_rng(s.seed))
    built = np.tensordot(state.x[:, 0], experts, axes=1)
    assert np.max(np.abs(built - pos)) < 1e-6
    assert np.max(np.abs(np.tensordot(state.v[:, 0], experts, axes=1) - vel)) < 1e-6
    assert np.max(np.abs(np.tensordot(state.g[0], experts, axes=1) - g)) < 1e-6
    assert state.g_score == pytest.approx(gs, abs=1e-9)


def test_positions_are_affine_and_velocities_sum_to_zero():
    s = settings(size=12)
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(5, s.size, groups=3, seed_soup=True, rng=rng)
    assert np.allclose(x0.sum(-1), 1.0)
    assert (x0 < 0).any(), "extrapolated children make some coefficients negative"
    state = swarm.init_state(x0, rng.normal(size=s.size), s, rng)
    assert np.allclose(state.v.sum(-1), 0.0)
    for _ in range(20):
        prop = swarm.propose(state, s, rng)
        state = swarm.update(state, prop, rng.normal(size=s.size), s)
        assert np.allclose(state.x.sum(-1), 1.0, atol=1e-9)
        assert np.allclose(state.v.sum(-1), 0.0, atol=1e-9)
        assert np.allclose(state.p.sum(-1), 1.0, atol=1e-9)


def test_initial_swarm_holds_experts_soup_and_children():
    x = swarm.initial_positions(3, 7, seed_soup=True, rng=np.random.default_rng(1))
    assert np.allclose(x[:3, 0], np.eye(3))
    assert np.allclose(x[3, 0], 1 / 3)
    assert x.shape == (7, 1, 3)
    x = swarm.initial_positions(3, 3, seed_soup=False, rng=np.random.default_rng(1))
    assert np.allclose(x[:, 0], np.eye(3))


def test_soup_init_draws_children_around_the_soup():
    rng = np.random.default_rng(5)
    x = swarm.initial_positions(4, 400, groups=2, seed_soup=True, rng=rng, init="soup", spread=0.2)
    assert np.allclose(x[:4, 0], np.eye(4)) and np.allclose(x[4], 0.25)
    children = x[5:]
    assert np.allclose(children.sum(-1), 1.0)
    # centred on the soup; spread of each coefficient: 0.2 * sqrt(1 - 1/K) after re-centring
    assert np.abs(children.mean(axis=0) - 0.25).max() < 0.03
    assert children.std(axis=0) == pytest.approx(np.full((2, 4), 0.2 * np.sqrt(0.75)), rel=0.12)
    again = swarm.initial_positions(4, 400, groups=2, seed_soup=True, rng=np.random.default_rng(5), init="soup",
                                    spread=0.2)
    assert np.array_equal(x, again)
    paper = swarm.initial_positions(4, 400, groups=2, seed_soup=True, rng=np.random.default_rng(5))
    assert np.abs(paper[5:] - 0.25).max() > np.abs(children - 0.25).max()


def test_layer_groups_are_drawn_independently():
    rng = np.random.default_rng(3)
    x0 = swarm.initial_positions(2, 6, groups=4, seed_soup=False, rng=rng)
    assert not np.allclose(x0[2:, 0], x0[2:, 1])


def test_restart_sends_a_stale_particle_back_to_its_best_at_rest():
    s = settings(patience=2, restart_patience=1.0, inertia=0.0, cognitive=1.0, social=0.0, repel=0.0)
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(3, 4, seed_soup=True, rng=rng)
    state = swarm.init_state(x0, np.array([1.0, 0.0, 0.0, 0.0]), s, rng)
    state.stale[:] = [0, 2, 1, 2]
    prop = swarm.propose(state, s, rng)
    assert list(prop.restarted) == [False, True, False, True]
    # At rest on its personal best with only the cognitive pull, it stays put.
    assert np.allclose(prop.x[1], state.p[1]) and np.allclose(prop.v[1], 0)
    new = swarm.update(state, prop, np.zeros(4), s)
    assert new.stale[1] == 1  # reset by the restart, then one evaluation without improvement


def test_patience_and_max_iterations_stop_the_search():
    s = settings(patience=3, max_iterations=50)
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(3, 8, seed_soup=True, rng=rng)
    state = swarm.init_state(x0, np.arange(8.0), s, rng)
    iterations = 0
    while not swarm.finished(state, s):
        prop = swarm.propose(state, s, rng)
        state = swarm.update(state, prop, np.full(8, -1.0), s)  # never better than g
        iterations += 1
    assert iterations == 3 and state.since_global == 3
    s2 = settings(patience=100, max_iterations=5)
    state = swarm.init_state(x0, np.arange(8.0), s2, rng)
    value = 10.0
    while not swarm.finished(state, s2):
        value += 1  # always a new global best: only max_iterations stops it
        state = swarm.update(state, swarm.propose(state, s2, rng), np.full(8, value), s2)
    assert state.iteration == 5


def test_step_length_decays_to_its_floor():
    s = settings(step_length=1.0, step_length_decay=0.5, min_step_length=0.2)
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(2, 4, seed_soup=True, rng=rng)
    state = swarm.init_state(x0, np.zeros(4), s, rng)
    lengths = []
    for _ in range(4):
        state = swarm.update(state, swarm.propose(state, s, rng), np.zeros(4), s)
        lengths.append(state.step_length)
    assert lengths == [0.5, 0.25, 0.2, 0.2]


def test_drop_k_and_drop_n_skip_evaluations_but_positions_move():
    s = settings(drop_k=0.5, drop_n=0.5)
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(3, 8, seed_soup=True, rng=rng)
    state = swarm.init_state(x0, np.arange(8.0), s, rng)
    whole_skips = partial = 0
    for _ in range(200):
        prop = swarm.propose(state, s, rng)
        assert not np.allclose(prop.x, state.x)
        n_eval = int(prop.evaluate.sum())
        whole_skips += n_eval == 0
        partial += 0 < n_eval < 8
        before = state.score.copy()
        state = swarm.update(state, prop, np.where(prop.evaluate, 0.5, np.nan), s)
        # a skipped particle keeps its previous score
        assert np.array_equal(state.score[~prop.evaluate], before[~prop.evaluate])
    assert 70 < whole_skips < 130 and partial > 50
    assert swarm.budget(settings()) == 8 * 13


def test_nan_utility_ranks_worst():
    s = settings()
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(3, 4, seed_soup=True, rng=rng)
    state = swarm.init_state(x0, np.array([np.nan, 1.0, 2.0, 0.5]), s, rng)
    assert state.g_score == 2.0 and state.gw_score == -np.inf
    assert np.allclose(state.gw, x0[0])


def test_same_seed_same_search_and_state_round_trips():
    experts = np.random.default_rng(1).normal(size=(3, 20))
    a = run_coefficients(experts, settings(), 10, np.random.default_rng(5))
    b = run_coefficients(experts, settings(), 10, np.random.default_rng(5))
    c = run_coefficients(experts, settings(), 10, np.random.default_rng(6))
    assert np.array_equal(a.x, b.x) and a.g_score == b.g_score
    assert not np.array_equal(a.x, c.x)
    again = swarm.SwarmState.from_dict(a.to_dict())
    assert np.array_equal(again.x, a.x) and again.stale.dtype.kind == "i"


def test_settings_object_is_duck_typed():
    # The optimiser reads plain attributes: it has no dependency on pydantic.
    s = SimpleNamespace(**settings().model_dump())
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(2, 3, seed_soup=True, rng=rng)
    state = swarm.init_state(x0, np.zeros(3), s, rng)
    state = swarm.update(state, swarm.propose(state, s, rng), np.ones(3), s)
    assert state.iteration == 1 and state.g_score == 1.0


# ----------------------------------------------------------------- levers beyond the paper


def drive(s, experts, rng, *, steps=None, state=None):
    """Run the pure optimiser against ``utility`` until finished (or ``steps`` iterations);
    returns the state and the number of positions scored."""
    k = len(experts)
    score = lambda a: utility(np.tensordot(a[0], experts, axes=1))  # noqa: E731
    scored = 0
    if state is None:
        # (the initial swarm, then the scouts, as search.run_search draws them)
        x0 = swarm.initial_positions(k, s.size + swarm.scouts(s, 1), seed_soup=s.seed_soup, rng=rng, init=s.init,
                                     spread=s.init_spread)
        state = swarm.init_state(x0, np.array([score(x) for x in x0]), s, rng)
        scored = len(x0)
    done = 0
    while not swarm.finished(state, s) and (steps is None or done < steps):
        prop = swarm.propose(state, s, rng)
        scores = np.array([score(x) if e else np.nan for x, e in zip(prop.x, prop.evaluate)])
        scored += int(prop.evaluate.sum())
        state = swarm.update(state, prop, scores, s)
        done += 1
    return state, scored


NEW = {"anchors": True, "update": "spso", "stop": "budget"}


def test_product_defaults_are_the_new_levers_and_paper_values_select_the_paper():
    # The product's defaults (bench/RESULTS.md, "Swarm against CMA-ES"); init: paper, seed_soup: false and
    # the levers at their paper values is the paper's algorithm (the weight-space reference test runs it).
    d = SwarmSettings()
    assert (d.anchors, d.update, d.stop, d.anchor_velocity, d.surrogate, d.explore_after, d.scouts, d.average_top) == (
        True, "spso", "budget", 0.3, "gp", "auto", "auto", "bag")
    assert (d.racing, d.race_confidence, d.race_gain, d.race_neighbours, d.race_slice) == (
        "auto", 0.95, "any", "auto", "auto")  # "Racing at 0.8", "Contested rows after a slice of 1/8"
    # auto: the slice of 1/8 and 4 neighbours with granularity model, the plain stages from 1/4 with layer groups
    assert (racing.slice_of(d), racing.neighbours_of(d)) == (0.125, 4)
    layer = SwarmSettings(granularity="layer")
    assert (racing.slice_of(layer), racing.neighbours_of(layer)) == (0.25, 0)
    assert (racing.slice_of(SwarmSettings(race_slice=0.5)), racing.neighbours_of(SwarmSettings(race_neighbours=0))) == (0.5, 0)
    s = SwarmSettings(init="paper", seed_soup=False, **PAPER_LEVERS)
    assert (s.anchors, s.update, s.stop, s.surrogate, s.explore_after, s.scouts, s.average_top) == (
        False, "paper", "patience", "off", 0, 0, 1)


def test_anchors_stay_put_and_are_scored_once():
    s = settings(**NEW)
    experts = np.random.default_rng(7).normal(size=(4, 30))
    rng = np.random.default_rng(3)
    x0 = swarm.initial_positions(4, s.size, seed_soup=True, rng=rng, init=s.init, spread=s.init_spread)
    scores = np.array([utility(np.tensordot(x[0], experts, axes=1)) for x in x0])
    scores[2] = 10.0  # an expert is the best: it stays the global best until beaten
    state = swarm.init_state(x0, scores, s, rng)
    assert np.allclose(state.v[:4], 0) and not np.allclose(state.v[4:], 0)
    assert np.allclose(state.g, x0[2])
    for _ in range(5):
        prop = swarm.propose(state, s, rng)
        assert not prop.evaluate[:4].any() and prop.evaluate[4:].all()
        assert np.array_equal(prop.x[:4], x0[:4]) and np.allclose(prop.v[:4], 0)
        state = swarm.update(state, prop, np.where(prop.evaluate, 0.0, np.nan), s)
    assert np.allclose(state.g, x0[2]) and state.g_score == 10.0
    assert np.array_equal(state.score[:4], scores[:4])


def test_spso_update_keeps_positions_affine_and_moves():
    s = settings(**NEW, size=10)
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(5, s.size, groups=3, seed_soup=True, rng=rng, init=s.init, spread=s.init_spread)
    state = swarm.init_state(x0, rng.normal(size=s.size), s, rng)
    for _ in range(20):
        prop = swarm.propose(state, s, rng)
        assert np.allclose(prop.x.sum(-1), 1.0, atol=1e-9) and np.allclose(prop.v.sum(-1), 0.0, atol=1e-9)
        state = swarm.update(state, prop, np.where(prop.evaluate, rng.normal(size=s.size), np.nan), s)
    assert np.allclose(state.p.sum(-1), 1.0, atol=1e-9)


def test_spso_velocity_is_not_normalised():
    # One moving particle at rest on its personal best, g elsewhere: v = c * r (g - x), projected; with the
    # paper's normaliser the step could never pass g, here it can (c > 1).
    s = settings(**NEW, size=5, anchor_velocity=0)  # (the experts' push off: the update alone)
    x0 = swarm.initial_positions(4, 5, seed_soup=True, rng=np.random.default_rng(0), init="soup")
    state = swarm.init_state(x0, np.array([1.0, 0, 0, 0, 0.5]), s, np.random.default_rng(0))
    assert np.allclose(state.v, 0)  # one moving particle: nothing to draw its velocity from
    overshoot = 0
    for seed in range(50):
        prop = swarm.propose(state, s, np.random.default_rng(seed))
        d = prop.x[4, 0] - x0[4, 0]
        overshoot += np.linalg.norm(d) > np.linalg.norm(x0[0, 0] - x0[4, 0])
    assert overshoot > 0


def test_the_experts_scores_give_the_moving_particles_a_first_velocity():
    # anchor_velocity: each moving particle's initial velocity gains push * d, d_k = (s_k - mean s) / range,
    # the range over every initial score; the anchors stay at rest; the same velocities as without it otherwise.
    x0 = swarm.initial_positions(4, 8, seed_soup=True, rng=np.random.default_rng(0), init="soup")
    scores = np.array([0.15, 0.47, 0.40, 0.07, 0.43, 0.55, 0.30, 0.20])  # one weak expert (the fourth)
    on = swarm.init_state(x0, scores, settings(**NEW, anchor_velocity=0.3), np.random.default_rng(1))
    off = swarm.init_state(x0, scores, settings(**NEW, anchor_velocity=0), np.random.default_rng(1))
    d = (scores[:4] - scores[:4].mean()) / (0.55 - 0.07)
    assert np.allclose(on.v[4:] - off.v[4:], 0.3 * d) and np.allclose(on.v[:4], 0)
    assert np.allclose(on.v.sum(axis=-1), 0)  # still a velocity: positions stay affine
    assert np.argmin(d) == 3 and d[3] < 0 < d[1] and np.argmax(d) == 1  # away from the weak expert, to the strong
    # A failed expert counts as the lowest score; experts that score alike push (almost) nothing.
    failed = scores.copy()
    failed[3] = np.nan
    lowest = np.where(np.isnan(failed), np.nanmin(failed), failed)  # (0.15: the lowest finite score)
    assert np.allclose(swarm.anchor_push(failed, 4, 0.3), swarm.anchor_push(lowest, 4, 0.3))
    alike = np.array([0.25, 0.25, 0.25, 0.25, 0.40, 0.50, 0.30, 0.20])
    assert np.allclose(swarm.anchor_push(alike, 4, 0.3), 0)
    # No anchors (the paper's update): nothing to push with.
    paper = swarm.init_state(x0, scores, settings(anchor_velocity=0.3), np.random.default_rng(1))
    plain = swarm.init_state(x0, scores, settings(anchor_velocity=0), np.random.default_rng(1))
    assert np.array_equal(paper.v, plain.v)


def test_budget_stop_spends_exactly_the_budget():
    experts = np.random.default_rng(1).normal(size=(4, 20))
    for size, iters in ((8, 8), (7, 3), (5, 2)):
        s = settings(**NEW, size=size, max_iterations=iters, patience=1)
        state, scored = drive(s, experts, np.random.default_rng(2))
        assert scored == state.evaluations == swarm.budget(s) == size * (1 + iters)
    # without anchors too, and the patience stop is off
    s = settings(stop="budget", size=8, max_iterations=4, patience=1)
    state, scored = drive(s, experts, np.random.default_rng(2))
    assert scored == swarm.budget(s) and state.iteration == 4


def test_new_levers_deterministic_per_seed_and_resume_exact():
    experts = np.random.default_rng(1).normal(size=(4, 20))
    s = settings(**NEW)
    a, _ = drive(s, experts, np.random.default_rng(5))
    b, _ = drive(s, experts, np.random.default_rng(5))
    c, _ = drive(s, experts, np.random.default_rng(6))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.g, b.g) and a.g_score == b.g_score
    assert not np.array_equal(a.x, c.x)
    # Stop after 3 iterations, checkpoint the state and the generator as JSON, resume: same end.
    rng = np.random.default_rng(5)
    half, _ = drive(s, experts, rng, steps=3)
    saved = json.dumps({"state": half.to_dict(), "rng": rng.bit_generator.state})
    data = json.loads(saved)
    rng2 = np.random.default_rng(0)
    rng2.bit_generator.state = data["rng"]
    end, _ = drive(s, experts, rng2, state=swarm.SwarmState.from_dict(data["state"]))
    assert np.array_equal(end.x, a.x) and np.array_equal(end.p, a.p) and end.g_score == a.g_score
    assert end.evaluations == a.evaluations == swarm.budget(s)
    from swarm_merge import search

    search._check_state(swarm.SwarmState.from_dict(search._unstrict(json.loads(json.dumps(search._strict(
        half.to_dict()))))), "c.json", n=s.size, groups=1, experts=4, limit=swarm.budget(s))  # what search.py checkpoints passes its check



def test_local_search_samples_around_the_global_best_and_adapts_its_radius():
    # GCPSO: the moving particle with the best personal best goes to g + w v + rho (1 - 2 r), projected to
    # sum 0; rho starts at init_spread, widens by 1.5 after a move that improved g, narrows after one that did not.
    s = settings(**NEW, size=7, local_search="best")
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(4, s.size, seed_soup=True, rng=rng, init=s.init, spread=s.init_spread)
    scores = np.array([0.0, 0.0, 5.0, 0.0, 1.0, 3.0, 2.0])  # an anchor (expert 2) holds g; particle 5 is next
    state = swarm.init_state(x0, scores, s, rng)
    prop = swarm.propose(state, s, rng)
    assert prop.searcher == 5
    jump = prop.x[5] - (state.g + swarm.SPSO_INERTIA * state.v[5])
    assert np.allclose(jump.sum(-1), 0) and np.abs(jump).max() <= 2 * s.init_spread
    assert np.allclose(prop.x.sum(-1), 1.0)
    better = swarm.update(state, prop, np.where(np.arange(7) == 5, 9.0, np.where(prop.evaluate, 0.0, np.nan)), s)
    assert better.rho == pytest.approx(s.init_spread * swarm.LOCAL_UP) and better.g_score == 9.0
    worse = swarm.update(state, prop, np.where(prop.evaluate, 0.0, np.nan), s)
    assert worse.rho == pytest.approx(s.init_spread * swarm.LOCAL_DOWN)
    # the radius survives a checkpoint; a state saved before the radius existed resumes at init_spread
    assert swarm.SwarmState.from_dict(json.loads(json.dumps(better.to_dict()))).rho == better.rho
    old = better.to_dict()
    del old["rho"]
    assert swarm.SwarmState.from_dict(old).rho == 0.0 and swarm._rho(swarm.SwarmState.from_dict(old), s) == s.init_spread
    del old["evaluations"]  # every other field stays required: such a state is refused, never resumed at 0
    with pytest.raises(KeyError):
        swarm.SwarmState.from_dict(old)
    # "holder": none while an expert (an anchor) holds g; the moving particle that holds it once one does
    holder = settings(**NEW, size=7, local_search="holder")
    assert swarm.propose(state, holder, np.random.default_rng(1)).searcher == -1
    assert swarm.propose(better, holder, np.random.default_rng(1)).searcher == 5


def test_local_search_is_off_in_the_paper_update_and_by_default():
    assert SwarmSettings().local_search == "off"  # (bench/RESULTS.md: measured as a lever)
    s = settings(local_search="best")  # the paper's update: no local searcher
    state, _ = drive(s, np.random.default_rng(1).normal(size=(4, 20)), np.random.default_rng(2), steps=3)
    assert state.rho == 0.0


def test_the_surrogate_proposes_where_a_gp_of_the_scored_positions_is_highest():
    # surrogate_point: a GP over every scored position; its pick among candidates around g scores better
    # than any position scored so far on a smooth objective, each row still sums to 1, and it is exact
    # for a seed. Fewer than 4 finite scores: no proposal (the draw is made all the same).
    target = np.array([[0.6, 0.5, 0.2, -0.3]])
    f = lambda a: -float(((a - target) ** 2).sum())  # noqa: E731
    rng = np.random.default_rng(0)
    xs = swarm.initial_positions(4, 12, seed_soup=True, rng=rng, init="soup", spread=0.3)
    ys = np.array([f(x) for x in xs])
    g = xs[int(np.argmax(ys))]
    point = swarm.surrogate_point(xs, ys, g, np.random.default_rng(1))
    assert point.shape == g.shape and np.allclose(point.sum(-1), 1.0)
    assert f(point) > ys.max()
    assert np.array_equal(point, swarm.surrogate_point(xs, ys, g, np.random.default_rng(1)))
    few = np.where(np.arange(12) < 3, ys, np.nan)
    r = np.random.default_rng(1)
    assert swarm.surrogate_point(xs, few, g, r) is None
    drawn = np.random.default_rng(1)
    drawn.normal(size=(swarm.SURROGATE_CANDIDATES, *g.shape))
    assert r.random() == drawn.random()


def test_the_surrogates_length_scales_follow_the_coefficients_that_matter(monkeypatch):
    # gp_lengths: with one group and enough positions, a coefficient the score does not depend on gets the
    # longest length on the grid, one it depends on sharply a short one; exact (the same lengths again). With
    # too few positions per coefficient, or with layer groups, every length is the median distance.
    rng = np.random.default_rng(3)
    xs = rng.normal(0.25, 0.3, size=(40, 4))
    ys = np.sin(6 * xs[:, 0]) - 0.2 * xs[:, 1]  # coefficient 0 sharply, 1 gently, 2 and 3 not at all
    base = swarm.median_distance(xs)
    lengths = swarm.gp_lengths(xs, ys, swarm.SURROGATE_NOISE, 1)
    scale = lengths / base
    assert set(scale) <= set(swarm.SURROGATE_LENGTHS)
    assert scale[0] < 1.0 and scale[2] == scale[3] == max(swarm.SURROGATE_LENGTHS)
    fitted = swarm.gp_fit(xs, ys, swarm.SURROGATE_NOISE, lengths)[0]
    assert fitted > swarm.gp_fit(xs, ys, swarm.SURROGATE_NOISE, base)[0]  # the likelihood rose from the start
    assert np.array_equal(lengths, swarm.gp_lengths(xs, ys, swarm.SURROGATE_NOISE, 1))
    few = swarm.SURROGATE_ARD_POINTS * 4 - 1
    assert np.array_equal(swarm.gp_lengths(xs[:few], ys[:few], swarm.SURROGATE_NOISE, 1),
                          np.full(4, swarm.median_distance(xs[:few])))
    assert np.array_equal(swarm.gp_lengths(xs, ys, swarm.SURROGATE_NOISE, 2), np.full(4, base))
    # surrogate_point uses them: the same data and draws with one length for all propose elsewhere
    g = xs[None, int(np.argmax(ys))]
    point = swarm.surrogate_point(xs[:, None], ys, g, np.random.default_rng(1))
    monkeypatch.setattr(swarm, "gp_lengths", lambda xs, ys, noise, groups: np.full(xs.shape[1], swarm.median_distance(xs)))
    assert not np.allclose(point, swarm.surrogate_point(xs[:, None], ys, g, np.random.default_rng(1)))


def test_the_surrogate_moves_the_particle_with_the_worst_personal_best_and_is_kept_in_the_checkpoint():
    s = settings(**NEW, size=8, surrogate="gp")
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(4, s.size, seed_soup=True, rng=rng, init=s.init, spread=s.init_spread)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.05, 0.6])  # moving particle 6 has the worst
    state = swarm.init_state(x0, scores, s, rng)
    assert state.archive_x.shape == (8, 1, 4) and np.array_equal(state.archive_s, scores)
    after = np.random.default_rng(5)
    prop = swarm.propose(state, s, after)
    assert prop.surrogate == 6 and np.allclose(prop.x.sum(-1), 1.0)
    assert np.array_equal(prop.x[:4], x0[:4])  # the anchors stay
    # the same draws without the surrogate move particle 6 by SPSO; the surrogate's candidates come last
    plain = swarm.propose(state, settings(**NEW, size=8, surrogate="off"), np.random.default_rng(5))
    assert np.array_equal(np.delete(prop.x, 6, 0), np.delete(plain.x, 6, 0))
    check = np.random.default_rng(5)
    swarm.propose(state, settings(**NEW, size=8, surrogate="off"), check)
    assert np.array_equal(prop.x[6], swarm.surrogate_point(state.archive_x, state.archive_s, state.g, check))
    new = swarm.update(state, prop, np.where(prop.evaluate, 0.3, np.nan), s)
    assert not new.g_by_surrogate  # g (0.7) stays
    win = swarm.update(state, prop, np.where(np.arange(8) == 6, 9.0, np.where(prop.evaluate, 0.3, np.nan)), s)
    assert win.g_score == 9.0 and win.g_by_surrogate  # the weak-to-strong analysis says so (report, card)
    from swarm_merge import baselines

    w2s = baselines.weak_to_strong(win, scores, ["a", "b", "c", "d"], seed_soup=True)
    assert (w2s["particle"], w2s["started_as"], w2s["start_rank"], w2s["surrogate"]) == (6, "child", 8, True)
    assert len(new.archive_s) == 8 + int(prop.evaluate.sum())
    assert np.array_equal(new.archive_x[8:], prop.x[prop.evaluate])
    back = swarm.SwarmState.from_dict(json.loads(json.dumps(new.to_dict())))
    assert np.array_equal(back.archive_x, new.archive_x) and np.array_equal(back.archive_s, new.archive_s)
    old = new.to_dict()  # a state from before the archive is refused (search.py: its checkpoint's version too)
    del old["archive_x"], old["archive_s"]
    with pytest.raises(KeyError):
        swarm.SwarmState.from_dict(old)
    assert swarm.propose(state, settings(**NEW, size=8, surrogate="off"), rng).surrogate == -1


def test_after_explore_after_iterations_without_a_new_global_best_one_particle_explores():
    # explore_after N: once g has not moved for N iterations, the moving particle with the worst personal best
    # that the surrogate did not take goes to a fresh draw of the initial swarm's children (the soup plus
    # N(0, init_spread), re-centred; one draw after the surrogate's); the others move as before.
    s = settings(**NEW, size=8, surrogate="gp", explore_after=3, init_spread=0.4)
    rng = np.random.default_rng(0)
    x0 = swarm.initial_positions(4, s.size, seed_soup=True, rng=rng, init=s.init, spread=s.init_spread)
    state = swarm.init_state(x0, np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.05, 0.6]), s, rng)
    plain = settings(**NEW, size=8, surrogate="gp", explore_after=0)
    for since in (0, 2):  # g moved lately: no explorer, the draws of a run without the setting
        moved = swarm.SwarmState(**{**vars(state), "since_global": since})
        a, b = np.random.default_rng(5), np.random.default_rng(5)
        prop = swarm.propose(moved, s, a)
        assert prop.explorer == -1 and np.array_equal(prop.x, swarm.propose(moved, plain, b).x)
        assert a.random() == b.random()
    stalled = swarm.SwarmState(**{**vars(state), "since_global": 3})
    after, check = np.random.default_rng(5), np.random.default_rng(5)
    prop = swarm.propose(stalled, s, after)
    base = swarm.propose(stalled, plain, check)
    step = check.normal(0.0, 0.4, size=(1, 4))
    # particle 6 (worst, 0.05) is the surrogate's; particle 4 (0.5, the next worst moving one) explores
    assert (prop.surrogate, prop.explorer) == (6, 4)
    assert np.allclose(prop.x[4], 0.25 + step - step.mean()) and np.allclose(prop.v[4], prop.x[4] - x0[4])
    assert np.array_equal(np.delete(prop.x, 4, 0), np.delete(base.x, 4, 0))
    assert np.allclose(prop.x.sum(-1), 1.0) and after.random() == check.random()
    # without the surrogate the worst one explores
    alone = swarm.propose(stalled, settings(**NEW, size=8, surrogate="off", explore_after=3), np.random.default_rng(5))
    assert (alone.surrogate, alone.explorer) == (-1, 6)
    # "auto" (the default): 3 with one coefficient group, off with layer groups (fresh draws lose there)
    auto = settings(**NEW, size=8, surrogate="gp", explore_after="auto", init_spread=0.4)
    assert swarm.explore_after(auto, 1) == 3 and swarm.explore_after(auto, 6) == 0
    assert swarm.propose(stalled, auto, np.random.default_rng(5)).explorer == 4
    layered = swarm.init_state(np.repeat(x0, 6, axis=1), np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.05, 0.6]), auto,
                               np.random.default_rng(0))
    layered = swarm.SwarmState(**{**vars(layered), "since_global": 9})
    assert swarm.propose(layered, auto, np.random.default_rng(5)).explorer == -1


def test_scouts_set_the_global_best_and_the_surrogates_data_but_never_move():
    s = settings(**NEW, size=8, max_iterations=8, surrogate="gp", scouts=4)
    draw = dict(seed_soup=True, init=s.init, spread=s.init_spread)
    x0 = swarm.initial_positions(4, s.size + swarm.scouts(s, 1), rng=np.random.default_rng(3), **draw)
    # The scouts' draws come after the initial swarm's, which stays what it is without them.
    assert np.array_equal(x0[:8], swarm.initial_positions(4, 8, rng=np.random.default_rng(3), **draw))
    scores = np.linspace(0.0, 0.5, 12)
    scores[10] = 1.0  # a scout is the best position scored
    state = swarm.init_state(x0, scores, s, np.random.default_rng(4))
    assert state.x.shape == (8, 1, 4) and np.array_equal(state.x, x0[:8]) and np.array_equal(state.p, x0[:8])
    assert np.array_equal(state.g, x0[10]) and state.g_score == 1.0
    assert np.array_equal(state.gw, x0[0]) and state.gw_score == 0.0
    assert state.evaluations == 12 and np.array_equal(state.archive_x, x0) and np.array_equal(state.archive_s, scores)
    # Only the particles move, towards the scout: the SPSO pull to g is the only term that reaches x0[10].
    prop = swarm.propose(state, s, np.random.default_rng(5))
    assert prop.x.shape == (8, 1, 4) and prop.evaluate.sum() == 4
    # A whole run spends the budget, the scouts included; "auto": a ninth of the budget with one group, none
    # with layer groups (where random draws are far worse than the swarm's moves).
    experts = np.random.default_rng(1).normal(size=(4, 20))
    end, scored = drive(s, experts, np.random.default_rng(2))
    assert scored == end.evaluations == swarm.budget(s) and len(end.archive_x) == swarm.budget(s)
    auto = SwarmSettings(size=8, max_iterations=8)
    assert swarm.scouts(auto, 1) == 8 and swarm.scouts(auto, 6) == 0 and swarm.scouts(settings(), 1) == 0


def test_a_scout_as_the_global_best_is_named_in_weak_to_strong():
    from swarm_merge import baselines

    s = settings(**NEW, size=8, max_iterations=8, scouts=4)
    x0 = swarm.initial_positions(4, 12, seed_soup=True, rng=np.random.default_rng(3), init="soup", spread=0.3)
    scores = np.linspace(0.0, 0.5, 12)
    scores[8:] = 0.1  # the scouts
    scores[10] = 1.0
    state = swarm.init_state(x0, scores, s, np.random.default_rng(4))
    found = baselines.weak_to_strong(state, list(scores), ["a", "b", "c", "d"], seed_soup=True)
    assert found == {"particle": None, "start_rank": None, "started_as": "scout", "size": 8, "surrogate": False}
    scores[10] = 0.2  # now a particle (the last child) holds it: ranked among the particles only
    found = baselines.weak_to_strong(swarm.init_state(x0, scores, s, np.random.default_rng(4)), list(scores),
                                     ["a", "b", "c", "d"], seed_soup=True)
    assert (found["particle"], found["start_rank"], found["started_as"], found["size"]) == (7, 1, "child", 8)


def test_top_average_is_the_mean_of_the_best_k_positions():
    xs = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]], [[2.0, -1.0]], [[0.2, 0.8]]])
    scores = np.array([0.4, 0.9, np.nan, 0.9, 0.7])  # a failed one is left out; ties: the earlier first
    assert np.allclose(swarm.top_average(xs, scores, 2), (xs[1] + xs[3]) / 2)
    assert np.allclose(swarm.top_average(xs, scores, 3), (xs[1] + xs[3] + xs[4]) / 3)
    assert np.allclose(swarm.top_average(xs, scores, 10), xs[[0, 1, 3, 4]].mean(axis=0))  # k past the positions
    assert np.allclose(swarm.top_average(xs, scores, 3).sum(axis=-1), 1.0)  # affine, like every position
    assert swarm.top_average(xs, scores, 1) is None  # 1: the global best is the winner
    assert swarm.top_average(xs[:3], np.array([0.1, np.nan, np.nan]), 5) is None  # one finite: nothing to average
