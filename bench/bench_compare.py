"""Reproduction: does the swarm beat the simple alternatives at equal budget?

On the demo's real experts (four SmolLM2-135M skill experts, `make demo-models`),
runs `mergekit-swarm compare` (the swarm, random search and CMA-ES, each with
the swarm's number of distinct dev evaluations, every one at several seeds) in
two settings:

  single task  one skill's rows (default: add), dev 18 rows, test 50 rows
  multi-task   the demo's mixed dev set (72 rows) and test set (200 rows)

and prints, per setting, mean and spread of each method's dev and test
utility, its evaluations and seconds, next to the experts and their uniform
average. Everything printed comes from the runs' swarm.json; asserts nothing.

    .venv/bin/python bench/bench_compare.py                    # 3 seeds, 4 iterations
    .venv/bin/python bench/bench_compare.py --max-iterations 8 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo.yml"


def subset(path: Path, task: str, dest: Path) -> Path:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("task") == task))
    return dest


def run_setting(name: str, recipe: dict, args, tmp: Path) -> dict:
    from swarm_merge import cli
    from swarm_merge.report import read

    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp / f"out-{name}"
    start = time.monotonic()
    code = cli.main(["compare", str(path), "--seeds", str(args.seeds), "--out", str(out), "--no-progress",
                     "--set", f"swarm.max_iterations={args.max_iterations}"])
    if code != 0:
        raise SystemExit(f"{name}: mergekit-swarm compare exited {code}")
    return {"report": read(out / "swarm.json"), "seconds": time.monotonic() - start}


def fmt(mean, std=None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def table(name: str, got: dict) -> None:
    report = got["report"]
    c = report.comparison
    rows = report.scores.rows
    experts = [r for r in rows if r.kind == "expert"]
    best = max(experts, key=lambda r: r.dev.utility if r.dev.utility is not None else -1)
    uniform = report.scores.uniform
    print(f"## {name}: {report.data.dev_rows} dev rows, {report.data.test_rows} test rows, budget {c.budget} distinct "
          f"dev evaluations per method and seed, seeds {', '.join(map(str, c.seeds))}; "
          f"whole command {got['seconds']:.0f} s\n")
    print("| method | dev | test | dev evaluations | seconds per seed |")
    print("|---|---|---|---|---|")
    print(f"| best expert by dev ({best.name}) | {fmt(best.dev.utility)} | {fmt(best.test.utility)} | - | - |")
    print(f"| uniform average | {fmt(uniform.dev.utility)} | {fmt(uniform.test.utility)} | - | - |")
    for m in c.summary:
        print(f"| {m.method} | {fmt(m.dev_mean, m.dev_std)} | {fmt(m.test_mean, m.test_std)} | {m.evaluations} "
              f"| {m.seconds_mean:.0f} |")
    per_seed = {}
    for r in c.runs:
        per_seed.setdefault(r.method, []).append(f"{r.test.utility:.3f}" if r.test and r.test.utility is not None
                                                 else "-")
    print("\ntest utility per seed: " + "; ".join(f"{m} {' / '.join(v)}" for m, v in per_seed.items()))
    a = report.analysis
    w = a.weak_to_strong
    if w.start_rank is not None:
        print(f"weak-to-strong (seed {c.seeds[0]}): the winner's particle started as {w.started_as}, rank "
              f"{w.start_rank} of {w.size}")
    if a.emergence is not None:
        print(f"emergence (seed {c.seeds[0]}, test): {a.emergence.gained} items gained, {a.emergence.lost} lost "
              f"of {a.emergence.items}")
    swarm_test = [r.test.utility for r in c.runs if r.method == "swarm" and r.test and r.test.utility is not None]
    if swarm_test and uniform.test and uniform.test.utility is not None:
        below = sum(t < uniform.test.utility for t in swarm_test)
        print(f"swarm seeds below the uniform average on test: {below} of {len(swarm_test)}; "
              f"mean margin {statistics.fmean(swarm_test) - uniform.test.utility:+.3f}")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-iterations", type=int, default=4)
    p.add_argument("--task", default="add", help="the single-task setting's skill")
    p.add_argument("--settings", default="single,multi")
    args = p.parse_args()
    base = yaml.safe_load(RECIPE.read_text())
    # Paths in the recipe are relative to recipes/: make them absolute for the temp recipes.
    base["experts"] = [str((RECIPE.parent / e.split("#")[0].strip()).resolve()) for e in base["experts"]]
    base["base_model"] = str((RECIPE.parent / base["base_model"]).resolve())
    dev, test = (RECIPE.parent / base["objective"][k] for k in ("dev", "test"))
    base.pop("output", None)
    import platform

    import torch

    print(f"# bench_compare: the demo's experts, {platform.machine()} {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; swarm as recipes/demo.yml but max_iterations {args.max_iterations}\n")
    with tempfile.TemporaryDirectory(prefix="swarm-compare-") as tmp:
        tmp = Path(tmp)
        if "single" in args.settings:
            single = json.loads(json.dumps(base))
            single["name"] = f"single-{args.task}"
            single["objective"]["dev"] = str(subset(dev, args.task, tmp / "dev.jsonl"))
            single["objective"]["test"] = str(subset(test, args.task, tmp / "test.jsonl"))
            table(f"single task ({args.task})", run_setting("single", single, args, tmp))
        if "multi" in args.settings:
            multi = json.loads(json.dumps(base))
            multi["name"] = "multi-task"
            multi["objective"]["dev"], multi["objective"]["test"] = str(dev), str(test)
            table("multi-task (the four skills mixed)", run_setting("multi", multi, args, tmp))


if __name__ == "__main__":
    main()
