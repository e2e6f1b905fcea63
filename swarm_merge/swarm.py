"""The Model Swarms optimiser, pure: arrays and a seeded Generator in, arrays out.

Every particle the algorithm ever produces is an affine combination of the
experts, ``sum_k a_k E_k`` with ``sum_k a_k = 1``, and every velocity is a
combination with ``sum_k b_k = 0`` (each update below is linear with weights
summing to 1 or 0). So the search runs exactly on coefficient arrays of shape
``(groups, K)`` instead of on weights: ``groups`` is 1 for the paper's
"model" granularity, or one row per layer group. Weights are built only when a
particle is evaluated (:mod:`swarm_merge.evaluate`).

The coefficients are unbounded (extrapolation makes some negative) and are
never renormalised: the paper neither clips nor rescales.

One iteration is ``propose`` (move every particle, decide which to evaluate),
the caller's evaluation, then ``update`` (personal, global best and worst,
step length). All particles move against the global best and worst of the
previous iteration (synchronous update, as the official code evaluates the
particles of an iteration in parallel).

The random draws, in order, so a weight-space reference can replay them:
``initial_positions`` (``size`` rows, then the scouts'; init "paper"): per child ``rng.choice(n_so_far, 2,
replace=False)`` then ``rng.uniform(0, 2, size=groups)``; ``initial_velocities`` ("random"):
per particle ``rng.integers(n - 1)``; ``propose``: ``rng.random((n, groups, 4))``
(r_v, r_p, r_g, r_w), then ``rng.random()`` (drop-K), then ``rng.random(n)``
(drop-N). With ``update: spso`` ``propose`` draws ``rng.random((n, groups, K, 2))`` (r_p, r_g per
coefficient) in place of the four scalars; with ``anchors`` ``initial_velocities`` draws for the moving
particles only.

Levers beyond the paper (each a SwarmSettings field; their paper values give the paper's algorithm):

- ``anchors``: the experts (the first K rows of the initial swarm) are scored once and then stay put: they
  set the global best and worst but never move and are never scored again; the remaining ``size - K``
  particles (the soup and the children) move.
- ``update: spso``: the SPSO-2011 constants (inertia 1/(2 ln 2), cognitive = social = 0.5 + ln 2), a random
  weight per coefficient, the velocity NOT divided by the sum of the weights, and no step length (x + v);
  the per-coefficient weights would break ``sum b_k = 0``, so the new velocity is projected back onto it
  (its mean over the K coefficients is subtracted: still a linear combination of the experts). No restarts
  (``restart_patience`` applies to the paper's update only).
- ``stop: budget``: no patience stop; the search runs until ``budget(settings)`` evaluations are spent (the
  last iteration scores only the particles that still fit).
- ``anchor_velocity`` (with ``anchors``): the moving particles' initial velocities gain ``anchor_velocity * d``,
  ``d_k`` expert k's score less the experts' mean, over the range of the initial swarm's scores (:func:`anchor_push`):
  the experts' own scores as a first direction. No draw.
- ``local_search`` (``best`` or ``holder``; ``off`` by default, measured in bench/RESULTS.md): under
  ``spso``, one moving particle per iteration goes to ``g + w v + rho (1 - 2 r)`` (GCPSO), projected onto
  sum 0, ``rho`` adapted by the 1/5 success rule and kept in the state; its draw,
  ``rng.random((groups, K))``, comes after SPSO's.
- ``surrogate: gp`` (the default; ``off`` is the paper): each iteration the moving particle with the worst
  personal best (not the local searcher) goes to :func:`surrogate_point`, the upper confidence bound of a
  Gaussian process over every position scored so far (``SwarmState.archive_x``/``archive_s``), among
  candidates around the global best; its velocity becomes the jump. Its draw,
  ``rng.normal(size=(SURROGATE_CANDIDATES, groups, K))``, is the last of ``propose`` (after drop-K/N's)
  but for the explorer's.
- ``scouts`` N ("auto" by default: a ninth of the budget with one group, 0 with layer groups; 0 is the paper):
  N more draws of the initial children (rows ``size`` on of ``initial_positions``), scored with the initial
  swarm. They set the global best and worst and join the surrogate's data, but are no particles: nothing
  moves them. They count in the budget.
- ``explore_after`` N ("auto" by default: 3 with one group, 0 with layer groups; 0 is the paper): once g has
  not moved for N iterations, the moving particle with the worst personal best that neither the local search
  nor the surrogate took goes to a fresh draw of the initial children (init "soup": the soup plus
  ``N(0, init_spread)``, re-centred); its velocity becomes the jump. Its draw,
  ``rng.normal(0, init_spread, size=(groups, K))``, comes last, and only then.

Once the search is over, ``average_top`` (search.py; "bag": racing.Race.bagged, K: :func:`top_average`) may make
an average of the best positions scored the winner instead of g; it draws nothing from ``rng`` (the bootstrap
has its own generator, seeded by ``swarm.seed``) and moves no particle.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = [
    "SwarmState",
    "Proposal",
    "initial_positions",
    "initial_velocities",
    "init_state",
    "propose",
    "update",
    "finished",
    "anchor_push",
]

# The settings this module reads; :class:`swarm_merge.recipe.SwarmSettings` has them all.
# inertia, cognitive, social, repel, step_length, step_length_decay,
# min_step_length, patience, restart_patience, max_iterations, drop_k, drop_n,
# init_velocity, anchors, update, stop, anchor_velocity, local_search, surrogate (the last six read with getattr:
# paper values when absent).

SPSO_INERTIA = 1.0 / (2.0 * math.log(2.0))  # 0.721
SPSO_ACCELERATION = 0.5 + math.log(2.0)  # 1.193, cognitive and social


def _anchors(settings: Any, num_experts: int) -> int:
    """How many leading rows of the swarm are fixed anchors (the experts), not moving particles."""
    return num_experts if getattr(settings, "anchors", False) else 0


def initial_positions(
    num_experts: int,
    size: int,
    *,
    groups: int = 1,
    seed_soup: bool,
    rng: np.random.Generator,
    init: str = "paper",
    spread: float = 0.3,
) -> np.ndarray:
    """The initial swarm: the experts, optionally the uniform soup, then children.

    ``init="paper"``: each child is ``w * P1 + (1 - w) * P2`` of two distinct
    particles made so far (children may be parents), ``w ~ U[0, 2)`` drawn per
    group: half interpolation, half extrapolation, as in the paper.

    ``init="soup"``: each child is the uniform soup plus ``N(0, spread)`` per
    coefficient, re-centred so each row still sums to 1 (draw order: per child
    ``rng.normal(0, spread, (groups, K))``). Where dev accuracy predicts test
    accuracy best (issue 12, bench/bench_selection.py) the paper's children
    start far from it; these start around it and the swarm still moves away
    when the dev signal says so.

    Returns:
        ``(size, groups, num_experts)`` coefficients; each row sums to 1.
    """
    k = num_experts
    base = [np.eye(k)[i] for i in range(k)]
    if seed_soup:
        base.append(np.full(k, 1.0 / k))
    if size < len(base):
        raise ValueError(f"size {size} is smaller than the {len(base)} initial particles")
    if init not in ("paper", "soup"):
        raise ValueError(f"unknown init {init!r}")
    x = np.empty((size, groups, k))
    for i, row in enumerate(base):
        x[i] = row
    for i in range(len(base), size):
        if init == "soup":
            z = rng.normal(0.0, spread, size=(groups, k))
            x[i] = 1.0 / k + z - z.mean(axis=1, keepdims=True)
        else:
            a, b = rng.choice(i, 2, replace=False)
            w = rng.uniform(0.0, 2.0, size=groups)[:, None]
            x[i] = w * x[a] + (1.0 - w) * x[b]
    return x


def initial_velocities(
    x: np.ndarray, mode: str, rng: np.random.Generator, *, best: Optional[np.ndarray] = None
) -> np.ndarray:
    """Initial velocities: ``random`` (x_j - x_i for a random other particle j),
    ``zero``, or ``best`` (g - x_i; needs ``best``). Each sums to 0 per group."""
    if mode == "zero":
        return np.zeros_like(x)
    if mode == "best":
        if best is None:
            raise ValueError("init_velocity 'best' needs the global best")
        return best[None] - x
    if mode != "random":
        raise ValueError(f"unknown init_velocity {mode!r}")
    n = len(x)
    v = np.empty_like(x)
    for i in range(n):
        j = int(rng.integers(n - 1))
        j += j >= i  # any particle but i
        v[i] = x[j] - x[i]
    return v


@dataclass
class SwarmState:
    """Everything the search needs to go on; small enough to checkpoint as JSON."""

    x: np.ndarray  # (n, G, K) positions
    v: np.ndarray  # (n, G, K) velocities
    score: np.ndarray  # (n,) latest utility of each position
    p: np.ndarray  # (n, G, K) personal bests
    p_score: np.ndarray  # (n,)
    g: np.ndarray  # (G, K) global best
    g_score: float
    gw: np.ndarray  # (G, K) global worst (all time, never reset)
    gw_score: float
    stale: np.ndarray  # (n,) evaluations since the personal best last improved
    step_length: float
    iteration: int = 0
    since_global: int = 0  # iterations since g last changed
    evaluations: int = 0
    rho: float = 0.0  # local_search: the search radius around g (coefficient units), 0 before the first move
    # Every position scored so far and its utility (-inf: failed; a raced-out one: its estimate), in order:
    # the surrogate's data (init_state starts it; None only in a state built by hand).
    archive_x: Optional[np.ndarray] = None  # (m, G, K)
    archive_s: Optional[np.ndarray] = None  # (m,)
    g_by_surrogate: bool = False  # g was found by the surrogate's proposal (not by a move of the update)

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SwarmState":
        kwargs = {}
        for f in dataclasses.fields(cls):
            # rho came later: a state saved before it resumes at init_spread; any other field is required
            # (a checkpoint from before the archive is refused by its version, search.CHECKPOINT_VERSION)
            value = data.get(f.name, 0.0) if f.name == "rho" else data[f.name]
            kwargs[f.name] = np.asarray(value, dtype=np.int64 if f.name == "stale" else float) if isinstance(value, list) else value
        return cls(**kwargs)


def _nan_worst(scores: np.ndarray) -> np.ndarray:
    # A NaN utility (failed evaluation) ranks below everything.
    return np.where(np.isnan(scores), -np.inf, scores)


def init_state(x: np.ndarray, scores: np.ndarray, settings: Any, rng: np.random.Generator) -> SwarmState:
    """The state after evaluating the initial swarm ``x`` (scores, NaN = failed). Rows past ``settings.size`` are
    scouts (``swarm.scouts``): they count in the global best and worst and the surrogate's data, and are no
    particle."""
    every_x, every_s = x, _nan_worst(np.asarray(scores, dtype=float))
    best, worst = int(np.argmax(every_s)), int(np.argmin(every_s))
    x, s = every_x[: settings.size], every_s[: settings.size]
    fixed = _anchors(settings, x.shape[-1])
    if fixed:  # the anchors rest; the moving particles draw their velocities among themselves
        v = np.zeros_like(x)
        if len(x) - fixed > 1 or settings.init_velocity != "random":
            v[fixed:] = initial_velocities(x[fixed:], settings.init_velocity, rng, best=every_x[best])
        v[fixed:] += anchor_push(every_s, fixed, float(getattr(settings, "anchor_velocity", 0.0)))
    else:
        v = initial_velocities(x, settings.init_velocity, rng, best=every_x[best])
    return SwarmState(
        x=x.copy(),
        v=v,
        score=s.copy(),
        p=x.copy(),
        p_score=s.copy(),
        g=every_x[best].copy(),
        g_score=float(every_s[best]),
        gw=every_x[worst].copy(),
        gw_score=float(every_s[worst]),
        stale=np.zeros(len(x), dtype=np.int64),
        step_length=float(settings.step_length),
        evaluations=len(every_x),
        archive_x=every_x.copy(),
        archive_s=every_s.copy(),
    )


def anchor_push(scores: np.ndarray, fixed: int, push: float) -> np.ndarray:
    """``anchor_velocity``: ``push * d`` with ``d_k = (s_k - mean_k s) / (max - min)``, ``s_k`` the k-th anchor's
    score (a failed one counts as the lowest), the range over every finite initial score. ``d`` sums to 0 (a
    velocity): towards the experts that score well, away from a weak one; small where the experts score alike."""
    finite = scores[np.isfinite(scores)]
    if push <= 0 or not fixed or len(finite) < 2 or finite.max() <= finite.min():
        return np.zeros(fixed)
    anchor = np.where(np.isfinite(scores[:fixed]), scores[:fixed], finite.min())
    return push * (anchor - anchor.mean()) / (finite.max() - finite.min())


@dataclass
class Proposal:
    x: np.ndarray  # new positions
    v: np.ndarray  # new velocities
    evaluate: np.ndarray  # (n,) bool: which particles get evaluated (Drop-K/N)
    restarted: np.ndarray  # (n,) bool
    searcher: int = -1  # local_search: the particle sent around g this iteration (-1: none)
    surrogate: int = -1  # surrogate: the particle placed at the model's proposal this iteration (-1: none)
    explorer: int = -1  # explore_after: the particle sent to a fresh draw of the initial swarm (-1: none)


def propose(state: SwarmState, settings: Any, rng: np.random.Generator) -> Proposal:
    """Move every particle one step (the paper's velocity and position update, or SPSO's; anchors stay)."""
    x, v = state.x.copy(), state.v.copy()
    n = len(x)
    moving = np.arange(n) >= _anchors(settings, x.shape[-1])
    # Restart: a particle whose personal best has not improved for
    # restart_patience * patience evaluations goes back to it, at rest; the
    # normal update below still runs this iteration.
    spso = getattr(settings, "update", "paper") == "spso"
    # (Not under spso, which has no restarts: the particle holding g would go back to it at rest and stay
    # there, scoring the same position again and again.)
    restarted = moving & (state.stale >= settings.restart_patience * settings.patience) & (not spso)
    x[restarted] = state.p[restarted]
    v[restarted] = 0.0

    searcher = -1
    if spso:
        # SPSO-2011 constants, one random weight per coefficient, no normaliser, no step length.
        r = rng.random((n, x.shape[1], x.shape[2], 2))
        v = (SPSO_INERTIA * v + SPSO_ACCELERATION * r[..., 0] * (state.p - x)
             + SPSO_ACCELERATION * r[..., 1] * (state.g[None] - x))
        v = v - v.mean(axis=-1, keepdims=True)  # back onto sum_k b_k = 0
        searcher = _local_searcher(state, settings, moving)
        if searcher >= 0:
            # GCPSO (van den Bergh and Engelbrecht, 2002): the local searcher samples around g,
            # x = g + w v + rho (1 - 2 r), where SPSO would stall it (its pull towards p and g is zero
            # once it holds g); rho adapts to its success (update).
            step = _rho(state, settings) * (1.0 - 2.0 * rng.random(x.shape[1:]))
            step = step - step.mean(axis=-1, keepdims=True)
            v[searcher] = state.g - x[searcher] + SPSO_INERTIA * state.v[searcher] + step
        x = x + v
    else:
        phi = np.array([settings.inertia, settings.cognitive, settings.social, settings.repel])
        # One scalar per term, per particle (and per group), shared by every tensor.
        r = rng.random((n, x.shape[1], 4))
        rv, rp, rg, rw = (r[..., t : t + 1] * phi[t] for t in range(4))
        # The normaliser makes the new velocity an affine mix of the four terms.
        c = rv + rp + rg + rw
        v = (rv * v + rp * (state.p - x) + rg * (state.g[None] - x) + rw * (x - state.gw[None])) / c
        x = x + state.step_length * v
    # Anchors stay where they are, at rest.
    x[~moving], v[~moving] = state.x[~moving], 0.0

    skip_all = rng.random() < settings.drop_k
    skip_one = rng.random(n) < settings.drop_n
    placed = _surrogate_particle(state, settings, moving, searcher)
    if placed >= 0:
        point = surrogate_point(state.archive_x, state.archive_s, state.g, rng)
        if point is None:
            placed = -1
        else:
            v[placed], x[placed] = point - state.x[placed], point
    explorer = _explorer(state, settings, moving, (searcher, placed))
    if explorer >= 0:
        # a fresh draw of the initial swarm's children (init "soup"): the uniform soup plus N(0, init_spread)
        step = rng.normal(0.0, float(settings.init_spread), size=x.shape[1:])
        point = 1.0 / x.shape[-1] + step - step.mean(axis=-1, keepdims=True)
        v[explorer], x[explorer] = point - state.x[explorer], point
    evaluate = ~skip_one & (not skip_all) & moving
    if getattr(settings, "stop", "patience") == "budget":
        # The last iteration scores only the particles that still fit in the budget.
        left = max(budget(settings) - state.evaluations, 0)
        evaluate &= np.cumsum(evaluate) <= left
    return Proposal(x=x, v=v, evaluate=evaluate, restarted=restarted, searcher=searcher, surrogate=placed,
                    explorer=explorer)


EXPLORE_AFTER = 3  # explore_after "auto" with one coefficient group (granularity model)
SCOUT_SHARE = 9  # scouts "auto" with one coefficient group: one in this many of the budget's evaluations


def scouts(settings: Any, groups: int) -> int:
    """The setting's count of scouts; "auto": a ninth of ``budget(settings)`` (8 of 72) with one group, 0 with
    layer groups."""
    value = getattr(settings, "scouts", 0)
    if value == "auto":
        return budget(settings) // SCOUT_SHARE if groups == 1 else 0
    return int(value)


def explore_after(settings: Any, groups: int) -> int:
    """The setting's iteration count; "auto": EXPLORE_AFTER with one group, 0 (off) with layer groups, where
    fresh draws are far worse than the swarm's moves (bench/RESULTS.md, "Exploring once the global best stalls")."""
    value = getattr(settings, "explore_after", 0)
    return (EXPLORE_AFTER if groups == 1 else 0) if value == "auto" else int(value)


def _explorer(state: SwarmState, settings: Any, moving: np.ndarray, taken) -> int:
    """explore_after N: once g has not moved for N iterations, the moving particle with the worst personal best
    that neither the local search nor the surrogate took explores; -1 for none."""
    after = explore_after(settings, state.x.shape[1])
    if not after or state.since_global < after:
        return -1
    return _worst_moving(state, moving, taken)


def _worst_moving(state: SwarmState, moving: np.ndarray, taken) -> int:
    """The moving particle with the worst personal best, not one of ``taken`` (-1 entries ignored); -1 for none."""
    candidates = moving.copy()
    for i in taken:
        if i >= 0:
            candidates[i] = False
    if not candidates.any():
        return -1
    return int(np.argmin(np.where(candidates, _nan_worst(state.p_score), np.inf)))


def _surrogate_particle(state: SwarmState, settings: Any, moving: np.ndarray, searcher: int) -> int:
    """surrogate: the moving particle with the worst personal best (not the local searcher); -1 for none."""
    if getattr(settings, "surrogate", "off") == "off" or state.archive_x is None:
        return -1
    return _worst_moving(state, moving, (searcher,))


SURROGATE_CANDIDATES = 512
SURROGATE_NOISE = 0.1  # the GP's noise variance, in units of the scores' variance (dev accuracy is noisy)
SURROGATE_KAPPA = 1.0  # upper confidence bound: mean + kappa * standard deviation
SURROGATE_POINTS = 256  # the GP sees at most this many scored positions, those nearest g


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distances between the rows of ``a`` and of ``b`` (no (len(a), len(b), D) temporary)."""
    return np.clip((a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T, 0.0, None)


def gp_fit(xs: np.ndarray, ys: np.ndarray, noise: float, lengths) -> Tuple[float, np.ndarray, np.ndarray]:
    """The surrogate's Gaussian process on positions ``xs`` (rows) and scores ``ys``: an RBF kernel, scores
    standardised, ``noise`` the noise variance in units of their variance. ``lengths``: the length scale, one
    per column of ``xs`` (an array) or one for all (a float). Returns (log marginal
    likelihood, Cholesky factor of the noisy Gram matrix, weights): the posterior mean at ``z`` is
    ``exp(-|(z - xs) / lengths|^2 / 2) @ weights``."""
    y = (ys - ys.mean()) / (ys.std() or 1.0)
    scaled = xs / lengths
    chol = np.linalg.cholesky(np.exp(-_sq_dist(scaled, scaled) / 2) + noise * np.eye(len(xs)))
    weights = np.linalg.solve(chol.T, np.linalg.solve(chol, y))
    return float(-0.5 * y @ weights - np.log(np.diag(chol)).sum()), chol, weights


def median_distance(xs: np.ndarray) -> float:
    """The median distance between the rows of ``xs`` (1.0 where they all coincide): the kernel's base length."""
    d2 = _sq_dist(xs, xs)
    return float(np.sqrt(np.median(d2[np.triu_indices(len(xs), 1)]))) or 1.0


SURROGATE_LENGTHS = (0.5, 1.0, 2.0, 4.0)  # a coefficient's length scale, in units of the median distance
SURROGATE_SWEEPS = 3  # coordinate-ascent sweeps over the coefficients (it stops early once none moves)
SURROGATE_ARD_POINTS = 4  # a length per coefficient only from this many scored positions per coefficient


def gp_lengths(xs: np.ndarray, ys: np.ndarray, noise: float, groups: int) -> np.ndarray:
    """The surrogate's length scales, one per column of ``xs``: with one group, a length per expert coefficient
    ("automatic relevance determination", as Optuna's GP sampler fits), chosen by coordinate ascent on the log
    marginal likelihood over SURROGATE_LENGTHS times the median distance, starting from the median distance
    itself, once there are SURROGATE_ARD_POINTS positions per coefficient (with fewer, the likelihood of a few
    points picks lengths that mislead the proposal); otherwise, and with layer groups, the median distance for
    every column (bench/RESULTS.md, "The surrogate's proposals" and "A length scale per expert, on new seeds").
    Exact: a fixed grid, no random restarts, ties keep the earlier value. Written here, not fitted with scipy or
    a GP library: at most 1 + 3 * 3 * K small Cholesky factorisations (K coefficients) keep it exact and the optimiser free
    of dependencies."""
    base = median_distance(xs)
    scale = np.ones(xs.shape[1])
    if groups != 1 or len(xs) < SURROGATE_ARD_POINTS * xs.shape[1]:
        return base * scale
    best = gp_fit(xs, ys, noise, base * scale)[0]
    for _ in range(SURROGATE_SWEEPS):
        moved = False
        for d in range(len(scale)):
            for value in SURROGATE_LENGTHS:
                if value == scale[d]:
                    continue
                trial = scale.copy()
                trial[d] = value
                fit = gp_fit(xs, ys, noise, base * trial)[0]
                if fit > best + 1e-9:
                    best, scale, moved = fit, trial, True
        if not moved:
            break
    return base * scale


def surrogate_point(archive_x: np.ndarray, archive_s: np.ndarray, g: np.ndarray,
                    rng: np.random.Generator) -> Optional[np.ndarray]:
    """The best of SURROGATE_CANDIDATES positions around ``g`` by a Gaussian process's upper confidence bound,
    fitted to the positions scored so far (the SURROGATE_POINTS nearest ``g`` past that many); None with
    fewer than 4 finite scores. Written here rather than taken from a library (Optuna's GP sampler is one of
    the baselines): a few lines of numpy, exact and seeded, in the optimiser's own coordinates, and the
    optimiser stays free of dependencies.

    The GP: an RBF kernel with the length scales of :func:`gp_lengths` (one per expert coefficient with one
    group), noise SURROGATE_NOISE, scores standardised. The candidates: ``g`` plus ``N(0, l_j / sqrt(D))`` per
    coefficient j (half at ``l_j``, half at ``l_j / 4``, ``D`` coefficients in all), projected onto sum 0 per
    group, so each row still sums to 1. Draw: ``rng.normal(size=(SURROGATE_CANDIDATES, G, K))``, made whatever
    the data."""
    ok = np.isfinite(archive_s)
    z = rng.normal(size=(SURROGATE_CANDIDATES, *g.shape))  # drawn always: the stream does not depend on the data
    if ok.sum() < 4:
        return None
    xs = archive_x[ok].reshape(int(ok.sum()), -1)
    ys = archive_s[ok]
    if len(xs) > SURROGATE_POINTS:  # a local model: the positions nearest g (bounded cost at any budget)
        near = np.argsort(_sq_dist(xs, g.reshape(1, -1))[:, 0], kind="stable")[:SURROGATE_POINTS]
        xs, ys = xs[near], ys[near]
    lengths = gp_lengths(xs, ys, SURROGATE_NOISE, g.shape[0])
    _, chol, alpha = gp_fit(xs, ys, SURROGATE_NOISE, lengths)
    near_g = np.where(np.arange(SURROGATE_CANDIDATES) % 2 == 0, 1.0, 0.25)[:, None, None]
    step = z * near_g * lengths.reshape(g.shape) / np.sqrt(g.size)
    cand = g[None] + step - step.mean(axis=-1, keepdims=True)
    k = np.exp(-_sq_dist(cand.reshape(len(cand), -1) / lengths, xs / lengths) / 2)
    mean = k @ alpha
    w = np.linalg.solve(chol, k.T)
    sd = np.sqrt(np.clip(1.0 + SURROGATE_NOISE - (w**2).sum(0), 0.0, None))
    return cand[int(np.argmax(mean + SURROGATE_KAPPA * sd))]


LOCAL_UP, LOCAL_DOWN = 1.5, 1.5 ** -0.25  # the 1/5 success rule: rho holds when 1 move in 5 improves g


def _local_searcher(state: SwarmState, settings: Any, moving: np.ndarray) -> int:
    """local_search: the moving particle with the best personal best ("best"), or the one whose personal
    best is the global best ("holder", GCPSO's rule: none while an anchor holds it); -1 for none."""
    mode = getattr(settings, "local_search", "off")
    if mode == "off" or not moving.any():
        return -1
    p_score = np.where(moving, _nan_worst(state.p_score), -np.inf)
    i = int(np.argmax(p_score))
    if mode == "holder" and not (p_score[i] >= state.g_score and np.array_equal(state.p[i], state.g)):
        return -1
    return i


def _rho(state: SwarmState, settings: Any) -> float:
    return state.rho if state.rho > 0 else float(settings.init_spread)


def update(state: SwarmState, proposal: Proposal, scores: np.ndarray, settings: Any) -> SwarmState:
    """Take the utilities of the evaluated particles (others keep their last score)."""
    scores = np.asarray(scores, dtype=float)
    ev = proposal.evaluate
    s = np.where(ev, _nan_worst(scores), state.score)
    stale = np.where(proposal.restarted, 0, state.stale)
    improved = ev & (s > state.p_score)
    p = np.where(improved[:, None, None], proposal.x, state.p)
    p_score = np.where(improved, s, state.p_score)
    stale = np.where(improved, 0, np.where(ev, stale + 1, stale))

    g, g_score, gw, gw_score = state.g, state.g_score, state.gw, state.gw_score
    changed, by_surrogate = False, state.g_by_surrogate
    if ev.any():
        idx = np.flatnonzero(ev)
        best = idx[int(np.argmax(s[idx]))]
        worst = idx[int(np.argmin(s[idx]))]
        if s[best] > g_score:  # strict improvement
            g, g_score, changed = proposal.x[best].copy(), float(s[best]), True
            by_surrogate = bool(best == proposal.surrogate)
        if s[worst] < gw_score:
            gw, gw_score = proposal.x[worst].copy(), float(s[worst])
    return SwarmState(
        x=proposal.x,
        v=proposal.v,
        score=s,
        p=p,
        p_score=p_score,
        g=g,
        g_score=g_score,
        gw=gw,
        gw_score=gw_score,
        stale=stale,
        step_length=max(state.step_length * settings.step_length_decay, settings.min_step_length),
        iteration=state.iteration + 1,
        since_global=0 if changed else state.since_global + 1,
        evaluations=state.evaluations + int(ev.sum()),
        rho=_next_rho(state, proposal, s, settings),
        archive_x=None if state.archive_x is None else np.concatenate([state.archive_x, proposal.x[ev]]),
        archive_s=None if state.archive_s is None else np.concatenate([state.archive_s, s[ev]]),
        g_by_surrogate=by_surrogate,
    )


def _next_rho(state: SwarmState, proposal: Proposal, s: np.ndarray, settings: Any) -> float:
    """The 1/5 success rule on the local searcher's move: wider after it improved g, narrower after not."""
    i = proposal.searcher
    if i < 0 or not proposal.evaluate[i]:
        return state.rho
    rho = _rho(state, settings) * (LOCAL_UP if s[i] > state.g_score else LOCAL_DOWN)
    return float(min(max(rho, 1e-4), 100.0))


def finished(state: SwarmState, settings: Any) -> bool:
    """Stop when g has not changed for ``patience`` iterations, or at ``max_iterations``; with
    ``stop: budget``, when ``budget(settings)`` evaluations are spent (or nothing can move)."""
    if getattr(settings, "stop", "patience") == "budget":
        return state.evaluations >= budget(settings) or len(state.x) <= _anchors(settings, state.x.shape[-1])
    return state.iteration >= settings.max_iterations or state.since_global >= settings.patience


AVERAGE_Z = 1.0  # average_top: the global best stays only if it beats the average by more than this many SEs
BAG_DRAWS = 1000  # average_top "bag": bootstrap draws of the dev rows (racing.Race.bagged)
BAG_FALLBACK_TOP = 5  # average_top "bag" without per-row scores: the average of this many best positions


def top_average(xs: np.ndarray, scores: np.ndarray, k: int) -> Optional[np.ndarray]:
    """``average_top``: the mean of the ``k`` best positions of ``xs`` (distinct ones, each scored on every
    dev row) by ``scores`` (NaN: failed, left out; equal scores: the earlier first), or None where fewer than 2
    are left to average. Each row of a position sums to 1, so the mean's rows do too: it is a merge like any
    other. bench/RESULTS.md ("The average of the top five as the winner"): where the global best is a few
    positions tied on the dev rows, their average holds up better on test rows than any one of them."""
    scores = np.asarray(scores, dtype=float)
    ok = np.flatnonzero(np.isfinite(scores))
    if k < 2 or len(ok) < 2:
        return None
    top = ok[np.argsort(-scores[ok], kind="stable")[:k]]
    return np.asarray(xs, dtype=float)[top].mean(axis=0)


def budget(settings: Any) -> int:
    """The most evaluations a run can make: the initial swarm plus ``max_iterations`` iterations of it
    (``stop: budget`` spends exactly this many; with anchors it takes more, smaller iterations)."""
    return settings.size * (1 + settings.max_iterations)

