"""``--baselines`` (``mergekit-swarm compare``): the other optimisers at the swarm's item budget.

Random search, CMA-ES, a GP (Optuna) and NGOpt (Nevergrad) (:mod:`swarm_merge.baselines`), the swarm at
other seeds, and mergekit's task arithmetic, TIES and DARE where the recipe names a base: every method
through the run's evaluator and one memo shared with the swarm's, each winner scored on test.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from pathlib import Path

import numpy as np

from swarm_merge import baselines, distributed, evaluate, experts as experts_mod, objectives, racing
from swarm_merge import report as report_mod, search, weights
from swarm_merge.publish import merge

__all__ = ["compare"]

LOG = logging.getLogger(__name__)


def compare(plan, result, evaluator, race) -> report_mod.Comparison:
    """Random search, CMA-ES, a GP and NGOpt (and the swarm at other seeds) at the swarm's item budget (the
    dev rows it scored), through the run's evaluator and one memo shared with the swarm's (baselines.py);
    task arithmetic, TIES and DARE on their grids. ``plan``: the run's :class:`swarm_merge.pipeline.Plan`;
    ``race``: the search's racing (None: off)."""
    # At each seed the swarm's cost in dev rows buys each baseline this many whole-dev-set evaluations
    # (without racing: exactly the distinct positions the swarm scored), so every seed pairs equal budgets.
    rows = result.best_score.n or objectives.row_count(plan.dev)
    seeds = [plan.recipe.swarm.seed + i for i in range(plan.options.seeds)]
    memo = dict(result.memo)
    swarms = _other_seeds(plan, result, evaluator, race, seeds, memo)
    budgets = {r.seed: max(1, r.items // rows) for r in swarms}
    budget = budgets[seeds[0]]
    runs = swarms + _optimisers(plan, evaluator, seeds, memo, budgets)
    for r in runs:
        if r.items is None:
            r.items = r.evaluations * rows
    # The mergekit baselines read the base's tensors until their winners are scored on test.
    with contextlib.closing(weights.TensorReader()) as reader:
        mergekit_runs = [] if plan.kind.adapters else _mergekit_baselines(plan, evaluator, seeds, reader)
        records = _records(plan, evaluator, runs, mergekit_runs, rows)
    return report_mod.Comparison(budget=budget, items=result.items, seeds=seeds, runs=records,
                                 summary=_summary(records))


def _distinct(r) -> int:
    return len(r.memo) + (r.raced["dropped"] if r.raced else 0)


def _other_seeds(plan, result, evaluator, race, seeds, memo) -> list:
    """The swarm at this run's seed (its result) and at each other seed, each raced as the run was."""
    import tempfile

    objective, dev = plan.objective, plan.dev
    runs = [baselines.MethodRun("swarm", seeds[0], result.best, result.best_score, _distinct(result), result.seconds,
                                items=result.items)]
    with tempfile.TemporaryDirectory(prefix="swarm-merge-seeds-") as tmp:
        for seed in seeds[1:]:
            LOG.info("comparison: the swarm at seed %d", seed)
            settings = plan.recipe.swarm.model_copy(update={"seed": seed})
            other_race = racing.race_of(settings, objective, dev) if race is not None else None
            start = time.monotonic()
            other = search.run_search(
                settings, num_experts=len(plan.experts), num_groups=len(plan.group_labels),
                evaluate=baselines.Budgeted(lambda x: evaluator.evaluate(x, dev, objective), memo),
                checkpoint=Path(tmp) / f"seed-{seed}.json", fingerprint="comparison", progress=plan.options.progress,
                ranks=plan.ranks, race=other_race, evaluate_rows=racing.rows_scorer(evaluator, other_race, objective),
                rows_layout=racing.layout_of(settings, objective, dev))
            runs.append(baselines.MethodRun("swarm", seed, other.best, other.best_score, _distinct(other),
                                            time.monotonic() - start, items=other.items))
    return runs


def _optimisers(plan, evaluator, seeds, memo, budgets: dict) -> list:
    """Random search around the soup, CMA-ES, the GP and NGOpt at ``budgets[seed]`` dev evaluations per seed."""
    import importlib.util

    k, g, swarm = len(plan.experts), len(plan.group_labels), plan.recipe.swarm
    optimisers = [baselines.cmaes_search, baselines.gp_search, baselines.ngopt_search]
    missing = [name for name in ("optuna", "nevergrad") if importlib.util.find_spec(name) is None]
    if missing:  # an optional extra: the table goes on without them, and says so on the terminal
        LOG.warning("compare: the GP and NGOpt baselines are skipped (%s not installed; pip install "
                    "'swarm-merge[search]')", " and ".join(missing))
        optimisers = optimisers[:1]

    def scorer():
        return baselines.Budgeted(lambda x: evaluator.evaluate(x, plan.dev, plan.objective), memo, plan.ranks)

    runs = []
    for seed in seeds:
        budget = budgets[seed]
        LOG.info("comparison: random search, CMA-ES, GP and NGOpt at seed %d (%d dev evaluations each)", seed, budget)
        runs.append(baselines.random_search(scorer(), num_experts=k, num_groups=g, budget=budget, seed=seed,
                                            seed_soup=swarm.seed_soup, init=swarm.init, spread=swarm.init_spread))
        runs += [optimiser(scorer(), num_experts=k, num_groups=g, budget=budget, seed=seed) for optimiser in optimisers]
    return runs


def _records(plan, evaluator, runs, mergekit_runs, rows: int) -> list:
    """Every method's winner as swarm.json records it, scored on test (each distinct position once)."""
    objective, test = plan.objective, plan.test
    tests = {}
    if test is not None:
        distinct = {search.position_key(r.best): r.best for r in runs}
        tests = dict(zip(distinct, evaluate.score_all(evaluator, objective, [(x, test) for x in distinct.values()],
                                                      plan.ranks)))
    records = []
    for r in runs:
        key = search.position_key(r.best)
        records.append(report_mod.MethodResult(
            method=r.method, seed=r.seed, coefficients=np.asarray(r.best, dtype=float).tolist(),
            dev=report_mod.Split.of(r.dev), test=report_mod.Split.of(tests[key]) if test is not None else None,
            evaluations=r.evaluations, items=r.items, seconds=round(r.seconds, 3)))
    for name, seed, _point, config, dev_score, tensor_of, seconds in mergekit_runs:
        test_score = evaluator.evaluate_weights(tensor_of, test, objective) if test is not None else None
        records.append(report_mod.MethodResult(
            method=name, seed=seed, config=config, dev=report_mod.Split.of(dev_score),
            test=report_mod.Split.of(test_score) if test_score else None,
            evaluations=len(baselines.MERGEKIT_GRID[name][1]), items=len(baselines.MERGEKIT_GRID[name][1]) * rows,
            seconds=round(seconds, 3)))
    return records


def _gap(swarm: dict, mine: dict):
    """The swarm's utility minus a method's (``{seed: utility}`` each), paired by seed; None without a shared
    finite one."""
    from scipy import stats

    d = np.array([swarm[s] - mine[s] for s in sorted(swarm.keys() & mine.keys())
                  if swarm[s] is not None and mine[s] is not None])
    if not len(d):
        return None
    half = (float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None)
    return report_mod.Gap(seeds=len(d), mean=float(d.mean()), half_width=half, above=int((d > 0).sum()),
                          below=int((d < 0).sum()))


def _summary(records) -> list:
    """Mean and deviation over seeds per method, in the table's order, and each method's gap to the swarm."""
    def by_seed(method, split):
        return {r.seed: getattr(getattr(r, split), "utility", None) for r in records if r.method == method}

    summary = []
    for method in ("swarm", "random search", "CMA-ES", "GP (Optuna)", "NGOpt (Nevergrad)", "task arithmetic", "TIES",
                   "DARE"):
        mine = [r for r in records if r.method == method]
        if not mine:
            continue
        dev_s = baselines.summarize([r.dev.utility for r in mine])
        test_s = baselines.summarize([r.test.utility if r.test else None for r in mine])
        summary.append(report_mod.MethodSummary(
            method=method, seeds=len(mine), dev_mean=dev_s["mean"], dev_std=dev_s["std"], test_mean=test_s["mean"],
            test_std=test_s["std"], evaluations=max(r.evaluations for r in mine), items=max(r.items for r in mine),
            seconds_mean=round(float(np.mean([r.seconds for r in mine])), 3),
            dev_gap=None if method == "swarm" else _gap(by_seed("swarm", "dev"), by_seed(method, "dev")),
            test_gap=None if method == "swarm" else _gap(by_seed("swarm", "test"), by_seed(method, "test"))))
    return summary


def _mergekit_baselines(plan, evaluator, seeds, reader) -> list:
    """Task arithmetic, TIES and DARE against the recipe's base_model, each at the small grid of
    baselines.MERGEKIT_GRID, through mergekit's own kernels on tensors in memory, put into the
    run's model and scored on dev; the best grid point is the method's winner.

    Returns (method, seed, point, mergekit config, dev score, tensor_of, seconds) per method and seed.
    """
    import torch

    recipe, objective, dev, experts, ranks = plan.recipe, plan.objective, plan.dev, plan.experts, plan.ranks
    if recipe.base_model is None:
        LOG.info("comparison: no base_model in the recipe, so no task arithmetic / TIES / DARE baselines")
        return []
    if not hasattr(evaluator, "expert_rows"):
        LOG.warning("comparison: the mergekit baselines need --eval-mode in-memory or one-model; skipped")
        return []
    from swarm_merge.errors import SwarmMergeError

    try:  # after the search, a base that cannot be pulled or merged costs these rows, not the run
        base = experts_mod.pull_expert(recipe.base_model, cache_dir=plan.options.cache_dir, what="base_model")
        experts_mod.check_compatible([base] + list(experts))
    except SwarmMergeError as exc:
        LOG.warning("comparison: no task arithmetic / TIES / DARE baselines (%s)", exc)
        return []
    dtype = evaluate.torch_dtype(recipe.dtype)
    # As swarm.json publishes them: Hub models pinned to their commit, local folders relative to the recipe's.
    paths = [merge.model_ref(e, portable=True, relative_to=recipe.base_dir) for e in experts]
    found = []
    for name, (method, grid) in baselines.MERGEKIT_GRID.items():
        for seed in (seeds if method.startswith("dare") else [None]):
            start = time.monotonic()
            best = None

            def maker(point, method=method, seed=seed):
                def tensor_of(tensor):
                    if seed is not None:  # DARE drops at random: the same draw for every tensor of a seed
                        torch.manual_seed(seed + zlib.crc32(tensor.encode()))
                    info = base.tensors[tensor]
                    b = weights.read_stacked(reader, [base], tensor, dtype)[0].view(info.shape)
                    rows = evaluator.expert_rows(tensor).to("cpu")
                    return baselines.mergekit_tensor(method, point, b, [r.view(info.shape) for r in rows])
                return tensor_of

            def score(point, name=name, seed=seed):
                LOG.info("comparison: %s %s%s", name, point, f" seed {seed}" if seed is not None else "")
                return evaluator.evaluate_weights(maker(point), dev, objective)

            # The grid points spread over the ranks; the best is picked in grid order, as one process would.
            for point, got in zip(grid, (ranks or distributed.Ranks()).map(score, grid)):
                if best is None or (got.utility == got.utility and not best[1].utility >= got.utility):
                    best = (point, got, maker(point))
            config = baselines.mergekit_config(method, best[0], merge.model_ref(base, portable=True,
                                                                                relative_to=recipe.base_dir),
                                               paths, recipe.dtype)
            found.append((name, seed, best[0], config, best[1], best[2], time.monotonic() - start))
    return found
