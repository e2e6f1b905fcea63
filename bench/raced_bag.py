"""Benchmark: which positions should a raced run's bag (``average_top: bag``) weigh? (issue 22, racing)

A raced run finishes only the positions that may still beat the global best; the ones dropped on a share of the
dev rows are left out of the bag, though an unraced run would weigh the near-ties among them. Replays the raced
default's runs (the search is the default's; the score cache of bench/bench_selection.py holds every position's
every row) and, per seed, bags:

  finished    the positions scored on every row (the product until now)
  imputed     those and the dropped ones, a dropped position's unseen rows taken as the global best's
              (``g``'s value: late in a run most particles give its answers on most rows)
  oracle      every position on all its true rows (what no raced run knows; the ceiling)

each with the product's fallback (the global best stays if it beats the average by more than one standard error),
and scores the pick on dev and test. Asserts nothing; prints one Markdown table.

    .venv/bin/python bench/raced_bag.py [--recipe recipes/demo.yml] [--seeds 42,43,44] [--set swarm.KEY=VALUE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import winner_rules  # noqa: E402
from swarm_merge import search, swarm  # noqa: E402


def replay(bench, race, result, seed):
    """One run's picks ({rule: (position, positions averaged)}), its share of the rows scored, and how many
    positions it finished and dropped (``bench.trace``: what the search scored)."""
    n = len(bench.dev)

    seen: dict = {}  # position key -> (x, the row indices the search scored)
    for which, x in bench.trace:
        key = search.position_key(x)
        _, idx = seen.setdefault(key, (np.asarray(x, dtype=float), set()))
        idx.update(range(n) if which is None else (int(i) for i in which))
    g = np.asarray(result.state.g, dtype=float)
    g_rows = np.asarray(bench.rows(g)[0], dtype=float)
    finished = [k for k in seen if k in result.memo]
    dropped = [k for k in seen if k not in result.memo]
    share = sum(len(i) for _, i in seen.values()) / (len(seen) * n)

    def bag(keys, rows_of):
        xs = np.array([seen[k][0] for k in keys])
        weights = race.bagged([winner_rules.entry(rows_of(k)) for k in keys], swarm.BAG_DRAWS, seed)
        if weights is None or (weights > 0).sum() < 2:
            return g, 0
        return winner_rules.unless_best_leads(race, np.tensordot(weights, xs, axes=1), g, bench), int((weights > 0).sum())

    def true_rows(k):
        return bench.rows(seen[k][0])[0]

    def imputed_rows(k):
        if k in result.memo:
            return true_rows(k)
        rows = np.array(g_rows)
        idx = sorted(seen[k][1])
        rows[idx] = np.asarray(true_rows(k), dtype=float)[idx]
        return rows

    picks = {"global best": (g, 0), "finished": bag(finished, true_rows),
             "imputed": bag(finished + dropped, imputed_rows), "oracle": bag(finished + dropped, true_rows)}
    return picks, share, (len(finished), len(dropped))


def main() -> None:
    args, bench, race, captured = winner_rules.replaying(__doc__.splitlines()[0])
    n = len(bench.dev)
    table, rows_share = {}, []
    for seed in (int(s) for s in args.seeds.split(",")):
        bench.trace = []
        bench.run("average_top=1", seed)
        picks, share, counts = replay(bench, race, captured["result"], seed)
        rows_share.append(share)
        for rule, (x, size) in picks.items():
            table.setdefault(rule, []).append((float(np.mean(bench.rows(x)[0])), bench.test_utility(x), size))
        print(f"seed {seed}: {counts[0]} finished, {counts[1]} dropped; " + ", ".join(
            f"{r} {d:.3f}/{t:.3f} ({s})" for r, (d, t, s) in ((r, v[-1]) for r, v in table.items())),
            file=sys.stderr, flush=True)
    base = np.array(table["finished"])
    print(f"# raced_bag: {args.recipe.name}, {n} dev rows, seeds {args.seeds} {' '.join(args.set)}, "
          f"{100 * np.mean(rows_share):.0f} % of the rows scored\n")
    print("| bag of | dev | test | positions averaged (mean) | test above 'finished' at | below at | per seed (test) |")
    print("|---|---|---|---|---|---|---|")
    for rule, values in table.items():
        v = np.array(values)
        print(f"| {rule} | {v[:, 0].mean():.3f} | {v[:, 1].mean():.3f} | {v[:, 2].mean():.1f} | "
              f"{(v[:, 1] > base[:, 1]).sum()} | {(v[:, 1] < base[:, 1]).sum()} | "
              f"{' / '.join(f'{t:.3f}' for t in v[:, 1])} |")


if __name__ == "__main__":
    main()
