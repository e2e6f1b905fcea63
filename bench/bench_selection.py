"""Benchmark: does the winner hold up on test rows the search never saw? (issue 12)

Runs the swarm (the library's search loop, the recipe's settings) with each
candidate lever, at several seeds, on a bench (default: the demo's multi-task
recipe) and prints mean, spread and every seed's dev and test utility of the
winner, next to the experts, the uniform average and, optionally, random search
and CMA-ES at the same budget. Every lever gets the same evaluations (each one
scores the whole dev set); only what the search optimises and how the final
winner is chosen differ:

  default    the recipe's settings as the tool runs them (swarm.init: soup, the
             default since issue 12); the winner is the best dev position
  paper      swarm.init: paper: the initial children are the paper's random
             inter/extrapolations of pairs (the default before issue 12)
  holdout    optimise the dev rows outside a held-out quarter (stratified by
             task, drawn from the seed); the winner is the best, on the
             held-out rows, of the top FINALISTS positions by the searched rows
  tiebreak   exact_match: optimise accuracy + exp(mean gold log-likelihood)/(N+1)
             (ties between equal accuracies broken by a smooth signal; never
             reorders different accuracies); winner by that key
  A+B        both (e.g. paper+holdout)
  KEY=VALUE  a swarm setting (e.g. spso+budget+anchors=false); BUNDLES names a few (old: the default
             before the SPSO change, anchors, spso, budget)

--budget N gives the baselines N whole-dev-set evaluations (else, at each seed, the dev rows the first lever's
swarm scored at that seed, over the dev rows: the same item budget); --threads 1 runs
much faster than 2 when other jobs share the two cores. The score cache records each position ("x") and
merges with what another bench process saved.

Asserts nothing; prints Markdown tables.

    .venv/bin/python bench/bench_selection.py [--recipe recipes/demo.yml] [--seeds 42,43,44] [--levers ...]
        [--set swarm.max_iterations=12 ...] [--baselines [--methods random,cmaes,gp,ngopt]] [--budget N] [--threads N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from swarm_merge import baselines, compare, objectives, pipeline, racing, report, search  # noqa: E402
from swarm_merge.options import RunOptions  # noqa: E402
from swarm_merge.objectives import Score  # noqa: E402
from swarm_merge.recipe import load_recipe  # noqa: E402

FINALISTS = 5
# Lever tokens that set several swarm settings (any other token KEY=VALUE sets swarm.KEY).
BUNDLES = {
    "old": {"anchors": False, "update": "paper", "stop": "patience"},  # the default before this change
    "anchors": {"anchors": True},
    "spso": {"update": "spso"},
    "budget": {"stop": "budget"},
}


def holdout_split(examples, seed: int, fraction: float = 0.25):
    """(search indices, held-out indices): ``fraction`` of each group's rows, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    by_group = {}
    for i, ex in enumerate(examples):
        by_group.setdefault(ex.group, []).append(i)
    held = []
    for g in sorted(by_group, key=str):
        idx = by_group[g]
        k = max(1, round(fraction * len(idx)))
        held += sorted(rng.choice(idx, size=k, replace=False).tolist())
    held_set = set(held)
    return [i for i in range(len(examples)) if i not in held_set], sorted(held)


def mean_of(values, idx):
    return float(np.mean([values[i] for i in idx]))


class Bench:
    def __init__(self, recipe_path: Path, overrides=()):
        self.recipe = load_recipe(recipe_path, list(overrides))
        # (in the search's checkpoint name: two benches on one recipe, e.g. --set swarm.granularity=layer beside
        # the plain demo, must not share a checkpoint when they run the same lever and seed side by side)
        self.overrides_tag = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8] if overrides else "plain"
        r = self.recipe
        # The run's own reading of the recipe (experts, space, objective and rows), as mergekit-swarm does it;
        # the output folder is a temporary one the bench never writes.
        self._out = tempfile.TemporaryDirectory(prefix="bench-selection-")
        plan = pipeline.prepare(r, RunOptions(out_dir=str(Path(self._out.name) / "out"), device="cpu"))
        self.experts, self.groups = plan.experts, plan.groups
        self.g = len(plan.group_labels)
        self.k = len(self.experts)
        self.objective, self.dev, self.test = plan.objective, plan.dev, plan.test
        self.ev = plan.kind.evaluator("in-memory", plan.groups, torch.device("cpu"))
        self.loglik = self.objective.model_copy(update={"type": "loglik"})
        # Scores by position, kept on disk (a rerun or another lever reuses them): "dev" per-row values,
        # "ll" the gold answers' mean log-likelihood (computed only when a lever asks), "test" utility.
        tag = hashlib.sha1(str(Path(recipe_path).resolve()).encode()).hexdigest()[:12]
        self.cache_path = Path(f"/tmp/bench-selection-cache-{tag}.json")
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        self.evaluations = 0
        # A list, when set: every scoring the search asks for, in order ((None, x): every row; (rows, x): a raced
        # stage's row indices).
        self.trace = None

    def _entry(self, x) -> dict:
        return self.cache.setdefault(search.position_key(x), {})

    def _save(self) -> None:
        # Merge what another bench process saved meanwhile (same positions, same scores), then write.
        try:
            disk = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        except ValueError:
            disk = {}
        for key, entry in disk.items():
            for field, value in entry.items():
                self.cache.setdefault(key, {}).setdefault(field, value)
        tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.cache))
        tmp.replace(self.cache_path)

    def rows(self, x, need_ll: bool = False):
        e = self._entry(x)
        if "dev" not in e or (need_ll and "ll" not in e and self.objective.type == "exact_match"):
            self.ev.build(x)
            if "dev" not in e:
                e["x"] = np.asarray(x, dtype=float).tolist()  # the position, for offline analysis
                e["dev"] = objectives.score(self.ev.model, self.ev.tokenizer, self.dev, self.objective,
                                            self.ev.device).rows
                self.evaluations += 1
            if need_ll and self.objective.type == "exact_match":
                e["ll"] = objectives.score(self.ev.model, self.ev.tokenizer, self.dev, self.loglik,
                                           self.ev.device).utility
            self._save()
        return e["dev"], e.get("ll")

    def test_utility(self, x):
        e = self._entry(x)
        if "test" not in e:
            e["test"] = self.ev.evaluate(x, self.test, self.objective).utility
            self._save()
        return e["test"]

    def run(self, lever: str, seed: int):
        n = len(self.dev)
        search_idx, held_idx = (holdout_split(self.dev, seed) if "holdout" in lever
                                else (list(range(n)), []))

        def key_of(x):
            values, ll = self.rows(x, need_ll="tiebreak" in lever)
            u = mean_of(values, search_idx)
            if "tiebreak" in lever and ll is not None:
                u += math.exp(ll) / (len(search_idx) + 1)
            return u

        positions = {}  # every position this run scored

        def scored(x):
            positions.setdefault(search.position_key(x), np.array(x))
            if self.trace is not None:
                self.trace.append((None, np.array(x)))
            if search_idx == list(range(n)) and "tiebreak" not in lever:  # with rows and weights (racing's memo)
                return objectives.aggregate(self.rows(x)[0], [1.0] * n, self.dev)
            return Score(key_of(x))

        update = {"seed": seed, **({"init": "paper"} if "paper" in lever.split("+") else {})}
        for token in lever.split("+"):  # swarm settings as key=value, and named bundles
            if "=" in token:
                key, value = token.split("=", 1)
                update[key] = yaml.safe_load(value)
            elif token in BUNDLES:
                update.update(BUNDLES[token])
            elif token not in ("default", "paper", "holdout", "tiebreak"):
                raise SystemExit(f"unknown lever token {token!r}")
        settings = type(self.recipe.swarm).model_validate({**self.recipe.swarm.model_dump(), **update})
        race = None
        if "holdout" not in lever and "tiebreak" not in lever:
            race = racing.race_of(settings, self.objective, self.dev)

        def part(x, which):
            # A raced stage's score (``which``: its row indices), from the position's cached rows (every row is
            # computed once for the cache; the search counts only the rows racing asked for).
            positions.setdefault(search.position_key(x), np.array(x))
            if self.trace is not None:
                self.trace.append((which, np.array(x)))
            values = self.rows(x)[0]
            return objectives.aggregate([values[i] for i in which], [1.0] * len(which), race.subset(which))

        # (per bench: two benches may run side by side)
        memo_path = self.cache_path.with_name(
            f"{self.cache_path.stem}-{self.overrides_tag}-{lever}-{seed}.checkpoint.json")
        memo_path.unlink(missing_ok=True)
        result = search.run_search(settings, num_experts=self.k, num_groups=self.g, evaluate=scored,
                                   checkpoint=memo_path, fingerprint=lever, progress=False, race=race,
                                   evaluate_rows=part if race else None,
                                   rows_layout=None if "holdout" in lever or "tiebreak" in lever else
                                   racing.layout_of(settings, self.objective, self.dev))
        memo_path.unlink(missing_ok=True)
        full = [p for k, p in positions.items() if k in result.memo]  # scored on every row (not raced out)
        ranked = sorted(full, key=lambda p: -key_of(p))
        if "holdout" in lever:
            finalists = ranked[:FINALISTS]
            winner = max(finalists, key=lambda p: (mean_of(self.rows(p)[0], held_idx), key_of(p)))
        else:
            winner = result.best
        dev = float(np.mean(self.rows(winner)[0]))
        return {"dev": dev, "test": self.test_utility(winner), "coefficients": np.round(winner, 3).tolist(),
                "evaluations": len(positions), "items": result.items,
                "dropped": result.raced["dropped"] if result.raced else 0,
                "found": report.FoundRecord.of(result.history)}


def summarize(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yml")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--levers", default="default,paper,holdout")
    ap.add_argument("--set", action="append", default=[], metavar="swarm.KEY=VALUE",
                    help="override a swarm setting (e.g. swarm.max_iterations=12); repeatable")
    ap.add_argument("--baselines", action="store_true",
                    help="also random search, CMA-ES, the GP and NGOpt at the first lever's item budget")
    ap.add_argument("--methods", default="random,cmaes,gp,ngopt",
                    help="the baselines --baselines runs (a comma list of random, cmaes, gp, ngopt)")
    ap.add_argument("--budget", type=int, default=None,
                    help="the baselines' budget (default: the most distinct dev evaluations of the default lever)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (1 is faster when other jobs share the cores: no spinning at barriers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(not o.startswith("swarm.") for o in args.set):
        raise SystemExit("--set takes swarm.* settings only (the score cache is per recipe's data and experts)")
    bench = Bench(args.recipe, args.set)
    start = time.monotonic()
    print(f"# bench_selection: {args.recipe.relative_to(REPO) if args.recipe.is_relative_to(REPO) else args.recipe}, "
          f"{len(bench.dev)} dev rows, {len(bench.test)} test rows, seeds {seeds}, swarm size "
          f"{bench.recipe.swarm.size}, max_iterations {bench.recipe.swarm.max_iterations}, "
          f"patience {bench.recipe.swarm.patience}\n")
    k, g = bench.k, bench.g
    fixed = [(e.name, np.tile(np.eye(k)[i], (g, 1))) for i, e in enumerate(bench.experts)]
    fixed.append(("uniform average", np.full((g, k), 1.0 / k)))
    print("| model | dev | test |\n|---|---|---|")
    for name, x in fixed:
        print(f"| {name} | {np.mean(bench.rows(x)[0]):.3f} | {bench.test_utility(x):.3f} |")
    results = {}
    for lever in filter(None, args.levers.split(",")):
        results[lever] = [bench.run(lever, seed) for seed in seeds]
    # Each baseline at seed i gets the swarm's (first lever's) item budget at seed i: the dev rows it
    # scored buy that many whole-dev-set evaluations.
    first = results.get("default", results[next(iter(results))])
    budgets = [args.budget or max(1, r["items"] // len(bench.dev)) for r in first]
    if args.baselines:
        methods = {"random": ("random search", baselines.random_search), "cmaes": ("CMA-ES", baselines.cmaes_search),
                   "gp": ("GP (Optuna)", baselines.gp_search), "ngopt": ("NGOpt (Nevergrad)", baselines.ngopt_search)}
        chosen = args.methods.split(",")
        if not set(chosen) <= set(methods):
            raise SystemExit(f"--methods takes {', '.join(methods)}, got {args.methods!r}")
        for name, fn in (methods[m] for m in chosen):
            rows = []
            for seed, budget in zip(seeds, budgets):
                memo = {}

                def score_full(x):
                    values, _ = bench.rows(x)
                    return Score(float(np.mean(values)))

                draws = ({"init": bench.recipe.swarm.init, "spread": bench.recipe.swarm.init_spread}
                         if fn is baselines.random_search else {})  # the swarm's initial distribution
                run = fn(baselines.Budgeted(score_full, memo), num_experts=k, num_groups=g, budget=budget, seed=seed,
                         **draws)
                rows.append({"dev": run.dev.utility, "test": bench.test_utility(run.best),
                             "coefficients": np.round(run.best, 3).tolist(), "evaluations": run.evaluations,
                             "items": run.evaluations * len(bench.dev), "dropped": 0})
            results[name] = rows
    uniform_test = bench.test_utility(np.full((g, k), 1.0 / k))
    print("\n| method | dev mean ± std | test mean ± std | dev per seed | test per seed | seeds below uniform test "
          "| evaluations | dev rows scored per seed | dropped by racing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lever, rows in results.items():
        dm, ds = summarize([r["dev"] for r in rows])
        tm, ts = summarize([r["test"] for r in rows])
        below = sum(r["test"] < uniform_test for r in rows)
        per = " / ".join(f"{r['test']:.3f}" for r in rows)
        per_dev = " / ".join(f"{r['dev']:.3f}" for r in rows)
        items = " / ".join(str(r["items"]) for r in rows)
        print(f"| {lever} | {dm:.3f} ± {ds:.3f} | {tm:.3f} ± {ts:.3f} | {per_dev} | {per} | {below} of {len(rows)} | "
              f"{max(r['evaluations'] for r in rows)} | {items} | {sum(r['dropped'] for r in rows)} |")
    swarm_rows = next(iter(results.values()))
    if len(results) > 1:  # each method against the first lever, paired by seed (compare's gap columns)
        print(f"\n{next(iter(results))} minus each method, paired by seed: mean ± the half-width of its 95 % t interval "
              "(seeds above / below)")
        for lever, rows in list(results.items())[1:]:
            gaps = [compare._gap({i: r[split] for i, r in enumerate(swarm_rows)}, {i: r[split] for i, r in enumerate(rows)})
                    for split in ("dev", "test")]
            print(f"  {lever}: " + ", ".join(
                f"{split} {g.mean:+.4f} ± {g.half_width or 0:.4f} ({g.above} / {g.below})"
                for split, g in zip(("dev", "test"), gaps)))
    print("\nwinners' coefficients:")
    for lever, rows in results.items():
        print(f"  {lever}: " + "; ".join(str(r["coefficients"]) for r in rows))
    # (the swarm's levers: the search's history says when its winner became the global best; the rest of the
    # run found nothing better)
    found = {lever: rows for lever, rows in results.items() if all(r.get("found") for r in rows)}
    if found:
        print("\nwhen each winner was found (evaluations and dev rows scored by then, per seed; the share of the run's rows):")
        for lever, rows in found.items():
            share = statistics.mean(r["found"].items / r["items"] for r in rows)
            print(f"  {lever}: " + " / ".join(f"{r['found'].evaluations}, {r['found'].items}" for r in rows)
                  + f" ({share:.0%} of the rows on average)")
    print(f"\n{bench.evaluations} distinct dev evaluations in all, {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
