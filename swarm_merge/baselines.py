"""Was the swarm worth it? Other searches over the same coefficients, at the
same budget, scored by the same evaluator, and the paper's analyses of a run.

Every method searches the swarm's space (affine coefficient arrays ``(G, K)``,
the recipe's granularity) and gets **the swarm's budget**: as many distinct
positions scored on dev as the swarm scored. Scores come through one shared
memo (:class:`Budgeted`), so a position two methods both ask for (the experts,
the uniform soup) is computed once; each method still counts it against its own
budget, once.

- ``random search``: the best of ``budget`` positions drawn the way the swarm
  draws its initial particles (the experts, the soup, then children
  ``w P1 + (1 - w) P2`` with ``w ~ U[0, 2)``): the swarm without its moves.
- ``CMA-ES`` (the ``cmaes`` package): over the free coefficients (each group's
  last one is ``1 - sum`` of the others), started at the soup with step 0.3,
  default population; the last generation is cut at the budget.
- ``GP (Optuna)`` (the ``search`` extra): Bayesian optimisation with Optuna's
  ``GPSampler`` over the same free coefficients, in the box ``1/k +- 3 * 0.3``
  around the soup (a GP needs a bounded box), its first trial at the soup.
- ``NGOpt (Nevergrad)`` (the ``search`` extra): Nevergrad's NGOpt, the
  optimiser LoraHub uses, over the same free coefficients and box, from the soup.
- ``swarm`` with other seeds (``--seeds N``).

Analyses (:func:`weak_to_strong`, :func:`emergence`) follow the paper's:
where the winning particle started, and which test items only the winner gets.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from swarm_merge import swarm
from swarm_merge.errors import InputError
from swarm_merge.objectives import Score
from swarm_merge.search import position_key

__all__ = ["Budgeted", "MethodRun", "random_search", "cmaes_search", "gp_search", "ngopt_search", "weak_to_strong",
           "emergence", "summarize", "CMAES_SIGMA", "GP_STARTUP", "SEARCH_EXTRA"]

LOG = logging.getLogger(__name__)
CMAES_SIGMA = 0.3  # initial step of CMA-ES around the soup, in coefficient units
# GP and NGOpt give up after MAX_ASKS * budget asks (a converged optimiser proposes the same position
# again and again: each repeat costs no evaluation but a GP fit).
MAX_ASKS = 3
GP_STARTUP = 10  # GPSampler's random trials (the soup first) before its GP proposes: Optuna's default


class Budgeted:
    """Scores positions through a memo shared by every method, and counts the
    distinct positions each method asked for (its budget use)."""

    def __init__(self, evaluate: Callable[[np.ndarray], Score], memo: Dict[str, dict], ranks=None):
        self.evaluate = evaluate
        self.memo = memo  # position key -> Score.to_dict(), shared (the swarm's memo seeds it)
        self.asked: set = set()
        self.fresh = 0  # positions this method had to compute (not in the memo)
        self.ranks = ranks  # distributed.Ranks: prefetch() spreads its positions over them

    def prefetch(self, xs: Sequence[np.ndarray], budget: int) -> None:
        """Score at once (spread over the ranks) the positions of ``xs`` that asking them in
        order, one by one, would compute before this method's budget runs out; asking them
        afterwards finds them in the memo. Changes no result, only where the work runs."""
        from swarm_merge import distributed

        asked, todo = set(self.asked), {}
        for x in xs:
            if len(asked) >= budget:
                break
            key = position_key(x)
            asked.add(key)
            if key not in self.memo and key not in todo:
                todo[key] = x
        found = (self.ranks or distributed.Ranks()).map(self.evaluate, list(todo.values()))
        for key, score in zip(todo, found):
            self.memo[key] = score.to_dict(rows=True)
        self.fresh += len(todo)

    def __call__(self, x: np.ndarray) -> Score:
        key = position_key(x)
        self.asked.add(key)
        if key not in self.memo:
            # With each row's value: the swarm at another seed (compare) races against, and bags, the
            # positions it finds here, as the run does with its own memo.
            self.memo[key] = self.evaluate(x).to_dict(rows=True)
            self.fresh += 1
        return Score.from_dict(self.memo[key])

    @property
    def used(self) -> int:
        return len(self.asked)


@dataclass
class MethodRun:
    """One method at one seed: its winner (best dev utility among what it scored)."""

    method: str
    seed: Optional[int]
    best: np.ndarray
    dev: Score
    evaluations: int  # distinct positions scored on dev
    seconds: float  # wall time this method spent (memo hits cost nothing)
    items: Optional[int] = None  # dev rows scored (None: evaluations times the dev rows)


def _utility(score: Score) -> float:
    u = score.utility
    return u if u is not None and math.isfinite(u) else -math.inf


def random_search(score: Budgeted, *, num_experts: int, num_groups: int, budget: int, seed: int,
                  seed_soup: bool = True, init: str = "paper", spread: float = 0.3) -> MethodRun:
    """The best of ``budget`` distinct positions from the swarm's initial-particle distribution
    (``init``, ``spread``: the recipe's ``swarm.init`` and ``swarm.init_spread``)."""
    start = time.monotonic()
    rng = np.random.default_rng(seed)
    # Drawn in one go, as the swarm draws its initial swarm; extra draws cover duplicates.
    draw = dict(groups=num_groups, seed_soup=seed_soup, rng=rng, init=init, spread=spread)
    pool = swarm.initial_positions(num_experts, budget + 8 + num_experts, **draw)
    best, best_score, seen = None, None, set()
    score.prefetch(pool, budget)
    i = 0
    while score.used < budget:
        if i >= len(pool):  # (almost never) more duplicates than spare draws
            pool = np.concatenate([pool, swarm.initial_positions(num_experts, len(pool) + budget, **draw)[len(pool):]])
        x = pool[i]
        i += 1
        key = position_key(x)
        if key in seen:
            continue
        seen.add(key)
        s = score(x)
        if best is None or _utility(s) > _utility(best_score):
            best, best_score = x.copy(), s
    return MethodRun("random search", seed, best, best_score, score.used, time.monotonic() - start)


def cmaes_search(score: Budgeted, *, num_experts: int, num_groups: int, budget: int, seed: int) -> MethodRun:
    """CMA-ES over the free coefficients, from the soup, for exactly ``budget`` distinct positions."""
    from cmaes import CMA

    start = time.monotonic()
    k, g = num_experts, num_groups

    def position(z: np.ndarray) -> np.ndarray:
        return _affine(z, g, k)

    optimizer = CMA(mean=np.full(g * (k - 1), 1.0 / k), sigma=CMAES_SIGMA, seed=seed)
    best, best_score = None, None
    while score.used < budget:
        told = []
        asked = [optimizer.ask() for _ in range(optimizer.population_size)]
        score.prefetch([position(z) for z in asked], budget)  # one generation at once, over the ranks
        for z in asked:
            if score.used >= budget:
                break
            s = score(position(z))
            told.append((z, -_utility(s) if math.isfinite(_utility(s)) else 1e9))
            if best is None or _utility(s) > _utility(best_score):
                best, best_score = position(z), s
        if len(told) < optimizer.population_size:
            break  # the budget ends inside a generation: its last members are not told
        optimizer.tell(told)
    return MethodRun("CMA-ES", seed, best, best_score, score.used, time.monotonic() - start)


SEARCH_EXTRA = "compare's GP and NGOpt baselines need optuna and nevergrad: pip install 'swarm-merge[search]'"


def _import_search(name: str):
    """``optuna`` or ``nevergrad``, or the one-line InputError that says how to install them."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise InputError(SEARCH_EXTRA) from None


def _free_box(num_experts: int) -> tuple:
    """The box the GP and NGOpt search the free coefficients in: the soup ``1/k`` plus or minus
    three CMA-ES steps (``3 * CMAES_SIGMA``), the region CMA-ES explores from the soup."""
    centre = 1.0 / num_experts
    return centre - 3 * CMAES_SIGMA, centre + 3 * CMAES_SIGMA


def _affine(z: Sequence[float], num_groups: int, num_experts: int) -> np.ndarray:
    """The position ``(G, K)`` of free coefficients ``z`` (``G * (K - 1)``): each group's last
    coefficient is 1 minus the sum of the others, so every row sums to 1."""
    free = np.asarray(z, dtype=float).reshape(num_groups, num_experts - 1)
    return np.concatenate([free, 1.0 - free.sum(axis=1, keepdims=True)], axis=1)


def gp_search(score: Budgeted, *, num_experts: int, num_groups: int, budget: int, seed: int) -> MethodRun:
    """Bayesian optimisation (Optuna's ``GPSampler``) over the free coefficients, for exactly
    ``budget`` distinct positions.

    A GP needs a bounded box: each free coefficient lies in ``1/k +- 3 * CMAES_SIGMA``, centred on
    the soup, the region CMA-ES explores from it. The first trial is the soup (where CMA-ES
    starts), then the sampler's random startup trials (scored at once, over the ranks), then one
    GP-chosen position at a time. A non-finite utility is told as ``-inf``, which the sampler
    clips to the worst finite value seen before fitting: the point counts as the worst yet,
    without a huge constant (say -1e9) flattening the standardised values the GP is fitted to,
    and without a failed trial that the GP ignores and may propose again."""
    optuna = _import_search("optuna")
    start = time.monotonic()
    k, g = num_experts, num_groups
    lo, hi = _free_box(k)
    names = [f"z{i}" for i in range(g * (k - 1))]
    space = {n: optuna.distributions.FloatDistribution(lo, hi) for n in names}
    best, best_score = None, None
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # (not its one-off note that greenlet would be faster)
    try:
        with warnings.catch_warnings():
            # GPSampler was experimental before Optuna 5; a -inf value warns that it is clipped.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Clip non-finite values")
            sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=GP_STARTUP)
            study = optuna.create_study(direction="maximize", sampler=sampler)
            study.enqueue_trial({n: 1.0 / k for n in names})
            # The startup trials (the soup, then random ones) do not depend on what is told: ask
            # them together and score them at once (the same positions, in the same order).
            startup = max(1, min(budget, GP_STARTUP))
            pending = [study.ask(space) for _ in range(startup)]
            score.prefetch([_affine([t.params[n] for n in names], g, k) for t in pending], budget)
            asks = len(pending)
            while score.used < budget:
                if not pending:
                    if asks >= MAX_ASKS * budget:  # only duplicates for a long time: give up
                        LOG.warning("GP (Optuna): %d asks found only %d distinct positions", asks, score.used)
                        break
                    pending.append(study.ask(space))
                    asks += 1
                trial = pending.pop(0)
                x = _affine([trial.params[n] for n in names], g, k)
                s = score(x)
                study.tell(trial, _utility(s))  # -inf when not finite (see above)
                if best is None or _utility(s) > _utility(best_score):
                    best, best_score = x, s
            for trial in pending:  # asked but beyond the budget
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return MethodRun("GP (Optuna)", seed, best, best_score, score.used, time.monotonic() - start)


def _stop_recast_threads(optimizer, optimizer_class, timeout: float = 10.0) -> None:
    """Stop the threads of Nevergrad's recast optimizers (Cobyla, ...) inside ``optimizer``, and wait
    for them to end. Each runs scipy in a non-daemon thread that waits for its next value: left
    alone it keeps the interpreter from exiting until the optimizer is garbage-collected, and it
    may still warn after the search returns."""
    threads, seen, todo = [], set(), [optimizer]
    while todo:
        opt = todo.pop()
        if id(opt) in seen:
            continue
        seen.add(id(opt))
        thread = getattr(opt, "_messaging_thread", None)
        if thread is not None:
            thread.stop()
            threads.append(thread)
        for value in vars(opt).values():
            todo.extend(v for v in (value if isinstance(value, (list, tuple)) else [value])
                        if isinstance(v, optimizer_class))
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.001)


def ngopt_search(score: Budgeted, *, num_experts: int, num_groups: int, budget: int, seed: int) -> MethodRun:
    """Nevergrad's NGOpt (what LoraHub uses) over the free coefficients, from the soup, in the
    GP's box (``1/k +- 3 * CMAES_SIGMA``) with CMA-ES's step (mutation sigma ``CMAES_SIGMA``),
    for exactly ``budget`` distinct positions. A non-finite utility is told as a loss of 1e9, as to CMA-ES.

    At compare's sizes (Nevergrad 1.0: up to a few hundred positions, or 8+ free coefficients)
    NGOpt picks Cobyla, a deterministic local search from the soup: the seed then changes nothing
    (every seed repeats the same run, which the shared memo makes free)."""
    ng = _import_search("nevergrad")
    start = time.monotonic()
    k, g = num_experts, num_groups
    lo, hi = _free_box(k)
    # sigma before the bounds: the box is then 6 sigma wide (Nevergrad warns below 3)
    parametrization = ng.p.Array(init=np.full(g * (k - 1), 1.0 / k)).set_mutation(sigma=CMAES_SIGMA)
    parametrization.set_bounds(lo, hi)
    parametrization.random_state = np.random.RandomState(seed)  # else seeded from np.random's global state
    best, best_score = None, None
    optimizer = None
    with warnings.catch_warnings():
        # NGOpt and its choice (Cobyla at small budgets) warn about settings, and when Cobyla
        # converges before the budget (NGOpt then returns random points); not the evaluator's.
        warnings.filterwarnings("ignore", category=ng.errors.NevergradWarning)
        warnings.filterwarnings("ignore", module=r"nevergrad(\.|$)")
        warnings.filterwarnings("ignore", message=r"COBYLA:")
        try:
            optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget, num_workers=1)
            asks = 0
            while score.used < budget:
                if asks >= MAX_ASKS * budget:  # only duplicates for a long time: give up
                    LOG.warning("NGOpt (Nevergrad): %d asks found only %d distinct positions", asks, score.used)
                    break
                candidate = optimizer.ask()
                asks += 1
                x = _affine(candidate.value, g, k)
                s = score(x)
                u = _utility(s)
                optimizer.tell(candidate, -u if math.isfinite(u) else 1e9)
                if best is None or u > _utility(best_score):
                    best, best_score = x, s
        finally:
            if optimizer is not None:  # (inside catch_warnings: the thread's last warnings too)
                _stop_recast_threads(optimizer, ng.optimization.base.Optimizer)
    return MethodRun("NGOpt (Nevergrad)", seed, best, best_score, score.used, time.monotonic() - start)


def weak_to_strong(state: swarm.SwarmState, initial_scores: Sequence[float], names: Sequence[str], *,
                   seed_soup: bool) -> dict:
    """Where the particle that found the global best started: its rank among the
    initial swarm's dev utilities (1 = best), and what it started as; ``surrogate``: the winning
    position was the surrogate's proposal for that particle (``swarm.surrogate``), not its own move.
    ``initial_scores``: the initial swarm's, then the scouts' (``swarm.scouts``; a scout is no particle)."""
    size = len(state.p_score)
    match = [i for i in range(size) if state.p_score[i] == state.g_score and np.array_equal(state.p[i], state.g)]
    surrogate = bool(state.g_by_surrogate)
    if not match:  # a scout, or a particle that later restarted elsewhere (unknown)
        scout = state.archive_x is not None and any(
            np.array_equal(x, state.g) for x in state.archive_x[size:len(initial_scores)])
        return {"particle": None, "start_rank": None, "started_as": "scout" if scout else None, "size": size,
                "surrogate": surrogate}
    i = match[0]
    scores = np.asarray(initial_scores[:size], dtype=float)
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    rank = int(1 + np.sum(scores > scores[i]))
    k = len(names)
    started = names[i] if i < k else ("uniform soup" if i == k and seed_soup else "child")
    return {"particle": int(i), "start_rank": rank, "started_as": started, "size": size,
            "surrogate": surrogate}


def emergence(expert_rows: Sequence[Optional[Sequence[float]]], winner_rows: Optional[Sequence[float]],
              groups: Sequence[Optional[str]]) -> Optional[dict]:
    """Test items the winner solves that no expert does (gained) and items some
    expert solves that the winner does not (lost), overall and per group.

    For accuracy utilities only (per-row values 0 or 1); None otherwise."""
    if winner_rows is None or any(r is None for r in expert_rows):
        return None
    n = len(winner_rows)
    any_expert = [max(r[j] for r in expert_rows) for j in range(n)]
    gained = [j for j in range(n) if winner_rows[j] >= 1 and any_expert[j] < 1]
    lost = [j for j in range(n) if winner_rows[j] < 1 and any_expert[j] >= 1]
    per_group: Dict[str, Dict[str, int]] = {}
    for label, items in (("gained", gained), ("lost", lost)):
        for j in items:
            if groups[j] is not None:
                per_group.setdefault(groups[j], {"gained": 0, "lost": 0})[label] += 1
    return {"items": n, "gained": len(gained), "lost": len(lost),
            "solved_by_some_expert": int(sum(a >= 1 for a in any_expert)),
            "solved_by_winner": int(sum(w >= 1 for w in winner_rows)), "groups": per_group}


def summarize(values: List[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean and spread (sample standard deviation; 0 for one seed) of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}


# ------------------------------------------------- mergekit's methods (needs a base)

# The small grid each mergekit baseline is tried at; the best point on dev is its winner.
# task arithmetic: base + w * sum_k (E_k - base), the same w for every expert;
# TIES: trim to `density`, elect signs, disjoint mean (weights 1, mergekit's normalize);
# DARE (dare_ties): drop to `density` at random and rescale, elect signs, weight 0.5 each.
MERGEKIT_GRID = {
    "task arithmetic": ("task_arithmetic", [{"weight": w} for w in (0.25, 0.5, 0.75, 1.0)]),
    "TIES": ("ties", [{"weight": 1.0, "density": d} for d in (0.2, 0.5, 0.8)]),
    "DARE": ("dare_ties", [{"weight": 0.5, "density": d} for d in (0.3, 0.5, 0.7)]),
}


def mergekit_tensor(method_name: str, point: dict, base, experts):
    """One output tensor of mergekit's ``method_name`` at a grid point, computed by
    mergekit's own kernel (``merge_group``) on tensors in memory: the same arithmetic
    ``mergekit-yaml`` runs on a config with ``base_model`` and these parameters."""
    import torch
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    method = registry.get(method_name)
    tensors = [base] + list(experts)
    group = TensorGroup.from_tensors([t.to(torch.float32) for t in tensors], base_index=0)
    defaults = {p.name: p.default for p in method.spec.parameters if not p.required}
    shared = {k: v for k, v in defaults.items() if k not in ("weight", "density", "gamma", "epsilon")}
    per_input = {}
    for key in ("weight", "density", "gamma", "epsilon"):
        if key in defaults or key in point or key == "weight":
            value = point.get(key, defaults.get(key))
            per_input[key] = {i: value for i in range(1, len(tensors))}
    return method.merge_group(group, **shared, **per_input)


def mergekit_config(method_name: str, point: dict, base_path: str, expert_paths, dtype: str = "float32") -> dict:
    """The mergekit config of a grid point (for the record, and to rebuild the weights with mergekit-yaml)."""
    return {"merge_method": method_name, "base_model": str(base_path),
            "models": [{"model": str(p), "parameters": dict(point)} for p in expert_paths],
            "dtype": "float32", "out_dtype": dtype}
