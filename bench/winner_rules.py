"""Benchmark: which of the positions a swarm run scored should be the winner? (issue 22, `swarm.average_top`)

Replays the swarm's runs (the recipe's settings with ``average_top: 1``, so the search itself is the default's;
the score cache of bench/bench_selection.py makes this cheap) and, per seed, takes the winner by each rule below
from the positions scored on every dev row, then scores it on dev and test (a new position, such as an average,
is scored and cached):

  best        the global best (the paper's winner; ``average_top: 1``)
  gp          the best posterior mean of a GP fitted to those positions (the surrogate's kernel, noise 0.3)
  tied        among the positions tied with the best dev score, the one nearest the top five's average
  soup        among the positions tied with the best dev score, the one nearest the uniform soup (1/K each:
              the least extrapolation from the experts' mean); "soup 1se": among those within one standard
              error of the best's paired row differences
  topK        the average of the K best positions (K = 3, 5, 8), always
  topK z=Z    the average of the K best, unless the best beats it by more than Z standard errors of their paired
              row differences (z=1 is the default, ``average_top: 5``; racing's paired_error)
  bag         bagging the argmax (Race.bagged, ``average_top: bag``): the positions averaged with weights = how
              often each is the best (ties share) on 1000 bootstrap draws of the dev rows; "bag z=1" with topK's
              fallback (the default)

Asserts nothing; prints one Markdown table (mean dev / test per rule, and against the global best, how many seeds
gain or lose on test).

    .venv/bin/python bench/winner_rules.py [--recipe recipes/demo.yml] [--seeds 42,43,44] [--set swarm.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_selection  # noqa: E402
from swarm_merge import racing, search, swarm  # noqa: E402


def gp_mean(xs: np.ndarray, ys: np.ndarray, noise: float = 0.3) -> np.ndarray:
    """The surrogate's GP (swarm.gp_fit), its posterior mean at its own data."""
    length = swarm.median_distance(xs)
    _, _, weights = swarm.gp_fit(xs, ys, noise, length)
    return np.exp(-swarm._sq_dist(xs, xs) / (2 * length**2)) @ weights


def entry(rows) -> dict:
    """A memo entry of a position scored on every dev row (the benches' rows weigh alike)."""
    return {"utility": float(np.mean(rows)), "rows": list(rows), "weights": [1.0] * len(rows)}


def unless_best_leads(race, average, best, bench, z: float = swarm.AVERAGE_Z):
    """The product's fallback (search.run_search): ``best`` if it beats ``average`` on dev by more than ``z``
    standard errors of their paired row differences, else ``average``."""
    a, b = entry(bench.rows(average)[0]), entry(bench.rows(best)[0])
    return best if b["utility"] - a["utility"] > z * (race.paired_error(a, b) or 0.0) else average


def replaying(description: str):
    """The command line both replays take (--recipe, --seeds, --set, --threads), the bench on that recipe, its race,
    and a dict whose "result" is the last SearchResult a ``bench.run`` made."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yml")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--set", action="append", default=[], metavar="swarm.KEY=VALUE")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = bench_selection.Bench(args.recipe, args.set)
    captured = {}
    run_search = search.run_search

    def capture(*a, **k):
        captured["result"] = run_search(*a, **k)
        return captured["result"]

    bench_selection.search.run_search = capture
    return args, bench, racing.race_of(bench.recipe.swarm, bench.objective, bench.dev), captured


def main() -> None:
    args, bench, race, captured = replaying(__doc__.splitlines()[0])

    def scored(x):
        return float(np.mean(bench.rows(x)[0])), bench.test_utility(x)

    table = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        bench.run("average_top=1", seed)
        result = captured["result"]
        seen, xs, ys = set(), [], []
        for x in result.state.archive_x:  # the positions scored on every row, in the order scored
            key = search.position_key(x)
            if key in result.memo and key not in seen:
                seen.add(key)
                xs.append(np.asarray(x, dtype=float))
                ys.append(result.memo[key]["utility"])
        xs, ys = np.array(xs), np.array(ys, dtype=float)
        order = np.argsort(-ys, kind="stable")
        flat = xs.reshape(len(xs), -1)
        best = xs[order[0]]
        picks = {"best": best, "gp": xs[int(np.argmax(gp_mean(flat, ys)))]}
        tied = np.flatnonzero(ys >= ys[order[0]] - 1e-12)
        centre = xs[order[:5]].mean(axis=0)
        picks["tied"] = xs[tied[int(np.argmin(((xs[tied] - centre) ** 2).sum(axis=(1, 2))))]]
        soup_distance = ((xs - 1.0 / xs.shape[-1]) ** 2).sum(axis=(1, 2))
        picks["soup"] = xs[tied[int(np.argmin(soup_distance[tied]))]]
        if race is not None:
            near = [i for i in range(len(xs)) if ys[order[0]] - ys[i] <= (race.paired_error(
                entry(bench.rows(xs[i])[0]), entry(bench.rows(best)[0])) or 0.0)]
            picks["soup 1se"] = xs[near[int(np.argmin(soup_distance[near]))]]
        for k in (3, 5, 8):
            average = xs[order[:k]].mean(axis=0)
            picks[f"top{k}"] = average
            if k in (3, 5) and race is not None:
                for z in (0.0, 1.0, 1.645):
                    picks[f"top{k} z={z:g}"] = unless_best_leads(race, average, best, bench, z)
        # bagging the argmax, as the product draws it (Race.bagged, swarm.BAG_DRAWS draws seeded by the run's seed):
        # the positions weighted by how often each is the best on bootstrap draws of the dev rows; the same
        # fallback as topK z=Z
        if race is not None:
            bag = np.tensordot(race.bagged([entry(bench.rows(x)[0]) for x in xs], swarm.BAG_DRAWS, seed), xs, axes=1)
            picks["bag"] = bag
            picks["bag z=1"] = unless_best_leads(race, bag, best, bench)
        for rule, x in picks.items():
            table.setdefault(rule, []).append(scored(x))
        print(f"seed {seed}: " + ", ".join(f"{r} {d:.3f}/{t:.3f}" for r, (d, t) in ((r, v[-1]) for r, v in table.items())),
              file=sys.stderr, flush=True)
    base = np.array(table["best"])
    print(f"# winner_rules: {args.recipe.name}, {len(bench.dev)} dev rows, {len(bench.test)} test rows, seeds {args.seeds}\n")
    print("| rule | dev | test | test above the global best's at | below at |\n|---|---|---|---|---|")
    for rule, values in table.items():
        v = np.array(values)
        print(f"| {rule} | {v[:, 0].mean():.3f} | {v[:, 1].mean():.3f} | {(v[:, 1] > base[:, 1]).sum()} | "
              f"{(v[:, 1] < base[:, 1]).sum()} |")


if __name__ == "__main__":
    main()
