"""Benchmark: what each racing rule would spend and lose, replayed on the default swarm's own runs (issue 22).

Runs the recipe's default swarm (bench_selection's Bench: the same search, the same score cache) at each seed
and traces every position the race scored and the global best it raced against. Then, on those positions,
with every dev row from the cache, it replays each rule below through the library's own decision
(racing.Race.verdict):

  dev rows           what the runs would score under the rule (the initial swarm's rows included), as a share
                     of scoring every row at every evaluation
  improvers dropped  positions strictly better than the global best they raced (on every row) that the rule
                     drops: each one a move of the global best the run would not make

then where the rows of three rules go (the race before 2026-12-06, the default, and the cheap race measured in
whole runs: 0.8, 4 neighbours, a slice of 1/8): the raced positions by what they are on every row against the
global best they raced (better, its answers on every row, level on utility with other answers, worse), finished or dropped; and, per stage,
what the raced positions showed on the rows seen so far (ahead of the global best, level with identical rows,
level with rows that differ, behind) and how many of each end strictly better on every row:
the share a rule at confidence c must finish is the evidence for what a valid rule can save. Last, where the
raced positions are: what they showed on the slice in the first and second half of each run, and how far from
the global best they sit (the largest coefficient difference), and which move made them: the surrogate's pick
(swarm.surrogate) or the swarm's update, with how many of each were level on the slice and ended strictly better.

A replay keeps the trajectory: under a rule that drops more, a real swarm goes elsewhere from the first
difference on. The replay measures rows and risk; test quality needs real runs (bench_selection --levers).
The first line checks the replay: the default rule's rows must equal what the runs scored.

Asserts nothing; prints Markdown tables.

    .venv/bin/python bench/racing_rules.py [--recipe recipes/demo.yml] [--seeds 42,43,44] [--set swarm.KEY=VALUE ...]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_selection import Bench  # noqa: E402

from swarm_merge import objectives, racing, search, swarm  # noqa: E402

# (label, race_confidence, race_gain, late stages, race_neighbours, race_slice): late False merges the stages after
# half the rows into one (the schedule before the three-quarter stage: slice, half, all). A slice other than the
# run's plans the race again (racing.plan_race, from the same seed).
CHEAP = "0.8, 4 neighbours, slice 1/8"  # the cheap race measured in whole runs (bench/RESULTS.md, 2026-12-06)
DEFAULT = "0.95, 4 neighbours, slice 1/8 (the default with granularity model)"
RULES = [
    ("0.95, no neighbours, slice / half / all (before)", 0.95, "any", False, 0, 0.25),
    ("0.95, no neighbours (the default before 2026-12-06)", 0.95, "any", True, 0, 0.25),
    ("0.95, 4 neighbours", 0.95, "any", True, 4, 0.25),
    ("0.95, 8 neighbours", 0.95, "any", True, 8, 0.25),
    ("0.9, no neighbours", 0.9, "any", True, 0, 0.25),
    ("0.9, 4 neighbours", 0.9, "any", True, 4, 0.25),
    ("0.8, no neighbours", 0.8, "any", True, 0, 0.25),
    ("0.8, 4 neighbours", 0.8, "any", True, 4, 0.25),
    ("0.7, 4 neighbours", 0.7, "any", True, 4, 0.25),
    ("0.95, race_gain: row, no neighbours", 0.95, "row", True, 0, 0.25),
    ("0.95, race_gain: row, 4 neighbours", 0.95, "row", True, 4, 0.25),
    ("0.8, race_gain: row, no neighbours", 0.8, "row", True, 0, 0.25),
    (DEFAULT, 0.95, "any", True, 4, 0.125),
    ("0.9, 4 neighbours, slice 1/8", 0.9, "any", True, 4, 0.125),
    (CHEAP, 0.8, "any", True, 4, 0.125),
    ("0.8, no neighbours, slice 1/8", 0.8, "any", True, 0, 0.125),
    ("0.7, 4 neighbours, slice 1/8", 0.7, "any", True, 4, 0.125),
    ("0.6, 4 neighbours, slice 1/8", 0.6, "any", True, 4, 0.125),
    ("0.8, 8 neighbours, slice 1/8", 0.8, "any", True, 8, 0.125),
]


def trace_runs(bench: Bench, seeds):
    """Per seed: the rows of the initial swarm, every raced position with the global best it raced, and which
    move proposed each position ("surrogate" or "update", by position key)."""
    runs, original = [], swarm.propose
    for seed in seeds:
        bench.trace, made_by = [], {}

        def propose(state, settings, rng, made_by=made_by):
            bench.trace.append(("iteration", None))  # (an iteration begins: its races use what was finished before)
            proposal = original(state, settings, rng)
            for i in np.flatnonzero(proposal.evaluate):
                made_by.setdefault(search.position_key(proposal.x[i]),
                                   "surrogate" if i == proposal.surrogate else "update")
            return proposal

        swarm.propose = propose  # (search.run_search calls swarm.propose: recorded, then put back)
        try:
            result = bench.run("default", seed)
        finally:
            swarm.propose = original
        trace, bench.trace = bench.trace, None
        settings = bench.recipe.swarm.model_copy(update={"seed": seed})
        race = racing.race_of(settings, bench.objective, bench.dev)
        # full: (utility, x) scored on every row, in the order they were; seen: rows scored per raced position
        full, raced, initial, seen, before = [], [], 0, {}, []
        for rows, x in trace:
            if isinstance(rows, str):  # an iteration begins
                before = list(full)
                continue
            key = search.position_key(x)
            if rows is not None and key not in seen:
                # The global best: the first of the best scored on every row before this iteration (a later tie does
                # not move it; one process races each position through its stages, so positions of this iteration
                # finish before the next one starts, but the search races them all against the iteration's global
                # best), and the positions scored on every row in earlier iterations (the neighbours a plan may use).
                g = max(before, key=lambda p: p[0])[1]
                raced.append((x, g, [p[1] for p in before]))
            seen[key] = seen.get(key, 0) + (len(bench.dev) if rows is None else len(rows))
            if seen[key] == len(bench.dev):
                full.append((utility(bench, x), x))
                initial += rows is None
        runs.append({"seed": seed, "items": result["items"], "race": race, "initial": initial, "raced": raced,
                     "made_by": made_by})
    return runs


def utility(bench: Bench, x) -> float:
    return objectives.aggregate(bench.rows(x)[0], [1.0] * len(bench.dev), bench.dev).utility


def late_merged(race: racing.Race) -> racing.Race:
    """The race with the stages after the one that reaches half the rows merged into the last."""
    half = next(j for j in range(len(race.parts)) if 2 * len(race.seen(j)) >= race.total_rows)
    parts = race.parts[: half + 1] + (np.sort(np.concatenate(race.parts[half + 1:])),)
    return dataclasses.replace(race, parts=parts)


def replay(bench: Bench, run, race: racing.Race, where: dict | None = None):
    """(dev rows, improvers dropped, improvers) of one run's raced positions under ``race``'s rule; ``where``
    (given) gathers [positions, rows] by (what a position is on every row against the global best it raced,
    finished or dropped)."""
    n = len(bench.dev)
    rows, dropped, improvers = run["initial"] * n, 0, 0
    for x, g, before in run["raced"]:
        values, ref_values = bench.rows(x)[0], bench.rows(g)[0]
        ref_u = utility(bench, g)
        reference = {"utility": ref_u, "rows": ref_values, "weights": [1.0] * n}
        u = utility(bench, x)
        better = u > ref_u
        improvers += better
        key_g = search.position_key(g)
        contested = race.contested(x, ref_values, [(p, bench.rows(p)[0]) for p in before
                                                   if search.position_key(p) != key_g])
        plan, parts, spent, finished = race.plan(contested), [], 0, True
        for j, idx in enumerate(plan):
            spent += len(idx)
            parts.append(objectives.aggregate([values[i] for i in idx], [1.0] * len(idx), race.subset(idx)))
            seen = np.sort(np.concatenate(plan[: j + 1]))
            if j < len(plan) - 1 and race.verdict(race.combine(parts, plan), seen, reference, contested) is not None:
                dropped += better
                finished = False
                break
        rows += spent
        if where is not None:
            truth = ("better" if better else "the global best's answers on every row" if np.array_equal(values, ref_values)
                     else "level on utility, other answers" if u == ref_u else "worse")
            w = where.setdefault((truth, "finished" if finished else "dropped"), [0, 0])
            w[0] += 1
            w[1] += spent
    return rows, dropped, improvers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yml")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--set", action="append", default=[], metavar="swarm.KEY=VALUE",
                    help="override a swarm setting, as in bench_selection.py (e.g. swarm.granularity=layer)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if any(not o.startswith("swarm.") for o in args.set):
        raise SystemExit("--set takes swarm.* settings only (the score cache is per recipe's data and experts)")
    torch.set_num_threads(args.threads)
    bench = Bench(args.recipe, args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = trace_runs(bench, seeds)
    n, evaluations = len(bench.dev), [r["initial"] + len(r["raced"]) for r in runs]
    default = [replay(bench, r, r["race"])[0] for r in runs]
    print(f"# racing_rules: {args.recipe.name}, {n} dev rows, seeds {seeds}, {sum(evaluations)} evaluations, "
          f"{sum(len(r['raced']) for r in runs)} raced\n")
    print(f"replay check: the default rule's rows {default}, the runs scored {[r['items'] for r in runs]}\n")
    print("| rule | dev rows (of every row) | improvers dropped |\n|---|---|---|")
    wheres = {}
    for label, confidence, gain, late, neighbours, fraction in RULES:
        total, where = [0, 0, 0], wheres.setdefault(label, {})
        for r, seed in zip(runs, seeds):
            race = (r["race"] if fraction == racing.slice_of(bench.recipe.swarm) else
                    racing.plan_race(bench.objective, bench.dev, fraction=fraction, confidence=confidence, seed=seed))
            race = dataclasses.replace(race, z=NormalDist().inv_cdf(confidence), confidence=confidence, gain=gain,
                                       neighbours=neighbours)
            got = replay(bench, r, race if late else late_merged(race), where)
            total = [a + b for a, b in zip(total, got)]
        print(f"| {label} | {total[0] / (sum(evaluations) * n):.0%} | {total[1]} of {total[2]} |")
    # Where two rules' rows go: the positions by what they are on every row against the global best they raced.
    shown = [RULES[1][0], DEFAULT, CHEAP]  # the race before, the default, and the cheap race measured in whole runs
    everything = sum(evaluations) * n
    print(f"\n| positions (rows each) | {' | '.join(shown)} |\n|---|{'---|' * len(shown)}")
    initial = f"{sum(r['initial'] for r in runs) * n / everything:.1%}"
    print(f"| the initial swarm and the bag's average | {' | '.join(initial for _ in shown)} |")
    for key in sorted({k for label in shown for k in wheres[label]}):
        cells = []
        for label in shown:
            m, spent = wheres[label].get(key, [0, 0])
            cells.append(f"{spent / everything:.1%} ({m}, {spent / m:.0f} each)" if m else "")
        print(f"| {key[0]}, {key[1]} | {' | '.join(cells)} |")
    # What the raced positions showed on the rows seen at each stage, and how many end strictly better.
    counts = {}
    for r in runs:
        race = r["race"]
        for x, g, _ in r["raced"]:
            values, ref_values = np.asarray(bench.rows(x)[0]), np.asarray(bench.rows(g)[0])
            better = utility(bench, x) > utility(bench, g)
            for j in range(len(race.parts) - 1):
                d = (values - ref_values)[race.seen(j)]
                shown = ("ahead" if d.sum() > 0 else "behind" if d.sum() < 0 else
                         "level, identical rows" if not d.any() else "level, rows differ")
                c = counts.setdefault((len(race.seen(j)), shown), [0, 0])
                c[0] += 1
                c[1] += better
    print("\n| rows seen | on them | positions | end strictly better |\n|---|---|---|---|")
    for (seen, shown), (m, b) in sorted(counts.items()):
        print(f"| {seen} | {shown} | {m} | {b} ({b / m:.0%}) |")
    # Where the raced positions are: what they showed on the slice, in the first and the second half of each run's
    # raced positions, and how far they sit from the global best (the largest coefficient difference).
    where, made = {}, {}
    for r in runs:
        for k, (x, g, _) in enumerate(r["raced"]):
            d = (np.asarray(bench.rows(x)[0]) - np.asarray(bench.rows(g)[0]))[r["race"].seen(0)]
            shown = ("ahead" if d.sum() > 0 else "behind" if d.sum() < 0 else
                     "level, identical rows" if not d.any() else "level, rows differ")
            half = "first" if 2 * k < len(r["raced"]) else "second"
            where.setdefault((shown, half), []).append(float(np.abs(np.asarray(x) - np.asarray(g)).max()))
            m = made.setdefault((r["made_by"].get(search.position_key(x), "?"), half), [0, 0, 0])
            m[0] += 1
            m[1] += shown == "level, identical rows"
            m[2] += utility(bench, x) > utility(bench, g)
    print("\n| on the slice | half of the run | positions | median max abs(x - g) |\n|---|---|---|---|")
    for (shown, half), dist in sorted(where.items()):
        print(f"| {shown} | {half} | {len(dist)} | {statistics.median(dist):.3f} |")
    print("\n| made by | half of the run | positions | level with identical rows on the slice | end strictly better |"
          "\n|---|---|---|---|---|")
    for (by, half), (m, tied, moved) in sorted(made.items()):
        print(f"| {by} | {half} | {m} | {tied} ({tied / m:.0%}) | {moved} ({moved / m:.0%}) |")
    print(f"\nmean evaluations a seed {statistics.mean(evaluations):.0f}; {bench.evaluations} new dev evaluations")


if __name__ == "__main__":
    main()
