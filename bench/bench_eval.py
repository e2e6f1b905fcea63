"""Benchmark: what one particle evaluation costs, in seconds and memory.

Strategies, each in its own process so peak RSS is its own:
  naive      write the merge to disk with mergekit, load it with transformers,
             evaluate (what mergekit-evolve does per evaluation)
  floor      one already-loaded model evaluated on the same dev set (no merging)
  in-memory  swarm_merge: experts in memory, weights rebuilt in place
  one-model  swarm_merge: one model held; each expert tensor read from its
             file once per evaluation and combined into it
  streaming  swarm_merge: meta skeleton, each module built from the experts'
             files per forward through accelerate hooks
  lora       swarm_merge on the same skills as LoRA adapters (--lora-recipe):
             the base held once, per particle only the A and B factors change
  lora-streaming  the same with the base streamed from its files
Then, per objective, the paired timing the speed goals are read from: floor,
in-memory, one-model and streaming in one process, --rounds rounds, each
scoring one particle with every strategy in a shuffled order; ratios to the
floor are taken within a round (same particle, hence the same generated
lengths, and the same minute of machine load) and summarised by median, IQR
and range. On a 2-core machine the floor alone spreads by +-20% from one
evaluation to the next (the particle changes how long generation runs), more
than the gaps the goals ask to resolve; pairing cancels most of it.
Then peak RSS of a swarm's initial evaluation at two swarm sizes per mode.

Prints tables; asserts nothing. Usage (after `make setup demo-models`):

    .venv/bin/python bench/bench_eval.py                       # the demo's experts
    .venv/bin/python bench/bench_eval.py --objectives loglik --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "demo.yml"
DEFAULT_LORA_RECIPE = REPO / "recipes" / "demo-lora.yml"


# ------------------------------------------------------------------ worker side


class AnonPeak:
    """Samples RssAnon (heap, not file-backed pages) every 10 ms; keeps the max."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(0.01)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._read())


def _objective_data(recipe, kind: str, tmp: Path):
    """The demo's dev rows as the asked objective (multiple choice: distractors from other rows)."""
    from swarm_merge import objectives

    rows = [json.loads(line) for line in Path(recipe.objective.dev).read_text().splitlines() if line.strip()]
    if kind == "multiple_choice":
        rng = random.Random(0)
        mc = []
        for r in rows:
            others = [o["answer"] for o in rows if o.get("task") == r.get("task") and o["answer"] != r["answer"]]
            choices = [" " + r["answer"]] + [" " + a for a in rng.sample(others, 3)]
            rng.shuffle(choices)
            mc.append({"prompt": r["prompt"], "choices": choices, "answer": choices.index(" " + r["answer"]),
                       "task": r.get("task")})
        rows = mc
    elif kind == "loglik":
        rows = [{"prompt": r["prompt"], "answer": " " + r["answer"], "task": r.get("task")} for r in rows]
    path = tmp / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    objective = recipe.objective.model_copy(update={"type": kind, "dev": str(path)})
    return objectives.load_examples(str(path), kind), objective


def _particles(k: int, n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.normal(0.0, 0.4, size=k) + 1.0 / k
        a[-1] = 1.0 - a[:-1].sum()  # affine, like a swarm particle
        out.append(a[None, :])
    return out


def _prepared(recipe_path, device: str):
    """The run's own reading of the recipe (experts, their kind, the space, the device), as
    ``mergekit-swarm`` builds it; the output folder is never written."""
    from swarm_merge import pipeline
    from swarm_merge.options import RunOptions
    from swarm_merge.recipe import load_recipe

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        return pipeline.prepare(load_recipe(recipe_path), RunOptions(out_dir=str(Path(tmp) / "out"), device=device))


def worker(args) -> dict:
    import numpy as np
    import torch

    from swarm_merge import evaluate, objectives, weights

    anon = AnonPeak()
    torch.manual_seed(0)
    if args.strategy.startswith("lora"):
        return lora_worker(args, anon)
    plan = _prepared(args.recipe, args.device)
    recipe, experts, groups, cpu = plan.recipe, plan.experts, plan.groups, plan.device
    k = len(experts)
    tmp_dir = tempfile.TemporaryDirectory(prefix="swarm-bench-")  # removed when the worker exits
    tmp = Path(tmp_dir.name)
    rows, objective = _objective_data(recipe, args.objective, tmp)
    if args.rows:
        rows = rows[: args.rows]
    times, utilities = [], []
    particles = _particles(k, args.repeats + 1)

    if args.strategy in ("in-memory", "one-model", "streaming"):
        ev = plan.kind.evaluator(args.strategy, groups, cpu)
        if args.swarm_size:  # the initial swarm of a search: peak RSS vs swarm size
            from swarm_merge import swarm

            x0 = swarm.initial_positions(k, args.swarm_size, seed_soup=True, rng=np.random.default_rng(0))
            start = time.perf_counter()
            for x in x0:
                utilities.append(ev.evaluate(x, rows, objective).utility)
            times.append((time.perf_counter() - start) / len(x0))
        else:
            ev.evaluate(particles[0], rows, objective)  # warm-up
            for c in particles[1:]:
                start = time.perf_counter()
                utilities.append(ev.evaluate(c, rows, objective).utility)
                times.append(time.perf_counter() - start)
    elif args.strategy == "floor":
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        # The same particles as the other strategies, their weights put in place
        # before the clock starts: what scoring alone costs for these models.
        model = AutoModelForCausalLM.from_pretrained(str(experts[0].path), dtype=weights.torch_dtype(recipe.dtype)).eval()
        tok = evaluate.load_tokenizer(experts[0].path)
        files = [safe_open(str(e.path / "model.safetensors"), framework="pt") for e in experts]
        state = model.state_dict()

        def put(c):
            with torch.no_grad():
                for name, param in state.items():
                    if name in experts[0].tensors:
                        param.copy_(sum(float(a) * f.get_tensor(name) for a, f in zip(c[0], files)))

        put(particles[0])
        objectives.score(model, tok, rows, objective, cpu)  # warm-up
        for c in particles[1:]:
            put(c)
            start = time.perf_counter()
            utilities.append(objectives.score(model, tok, rows, objective, cpu).utility)
            times.append(time.perf_counter() - start)
    elif args.strategy == "naive":
        from transformers import AutoModelForCausalLM

        from swarm_merge.publish import merge

        tok = evaluate.load_tokenizer(experts[0].path)
        for i, c in enumerate(particles[1:]):
            start = time.perf_counter()
            out = tmp / f"merged{i}"  # write_merge writes into a new (or empty) folder
            merge.write_merge(merge.mergekit_config(experts, c, groups, dtype=recipe.dtype, portable=False), out)
            model = AutoModelForCausalLM.from_pretrained(str(out), dtype=weights.torch_dtype(recipe.dtype)).eval()
            utilities.append(objectives.score(model, tok, rows, objective, cpu).utility)
            times.append(time.perf_counter() - start)
            del model
    else:
        raise SystemExit(f"unknown strategy {args.strategy}")
    result = {
        "strategy": args.strategy,
        "objective": args.objective,
        "swarm_size": args.swarm_size,
        "seconds": times,
        "median_seconds": statistics.median(times),
        "utility": float(np.nanmean(utilities)),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon": anon.stop(),
        "rows": len(rows),
    }
    tmp_dir.cleanup()
    return result


def lora_worker(args, anon: AnonPeak) -> dict:
    """The same evaluation over the skills' LoRA adapters on their base."""
    import numpy as np

    plan = _prepared(args.lora_recipe, args.device)
    recipe, experts = plan.recipe, plan.experts
    tmp_dir = tempfile.TemporaryDirectory(prefix="swarm-bench-")
    rows, objective = _objective_data(recipe, args.objective, Path(tmp_dir.name))
    if args.rows:
        rows = rows[: args.rows]
    ev = plan.kind.evaluator("streaming" if args.strategy == "lora-streaming" else "in-memory", plan.groups,
                             plan.device)
    particles = _particles(len(experts), args.repeats + 1)
    times, utilities = [], []
    ev.evaluate(particles[0], rows, objective)  # warm-up
    for c in particles[1:]:
        start = time.perf_counter()
        utilities.append(ev.evaluate(c, rows, objective).utility)
        times.append(time.perf_counter() - start)
    tmp_dir.cleanup()
    return {"strategy": args.strategy, "objective": args.objective, "swarm_size": 0, "seconds": times,
            "median_seconds": statistics.median(times), "utility": float(np.nanmean(utilities)),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_anon": anon.stop(),
            "rows": len(rows)}


def paired_worker(args) -> dict:
    """Every strategy in one process, interleaved: round r scores particle r with each
    strategy in a shuffled order. Ratios are taken within a round (same particle, so the
    same generated lengths; same minute of machine load), so drift and the particle's own
    cost cancel. In-memory and one-model are timed as build + score; "floor" scores a
    separately loaded model whose weights were put in place before the clock."""
    import torch

    from transformers import AutoModelForCausalLM

    from swarm_merge import evaluate, objectives, weights

    torch.manual_seed(0)
    plan = _prepared(args.recipe, args.device)
    recipe, experts, groups, device = plan.recipe, plan.experts, plan.groups, plan.device
    tmp_dir = tempfile.TemporaryDirectory(prefix="swarm-bench-")
    rows, objective = _objective_data(recipe, args.objective, Path(tmp_dir.name))
    modes = [s for s in args.strategies.split(",") if s in ("in-memory", "one-model", "streaming")]
    evs = {m: plan.kind.evaluator(m, plan.groups, device) for m in modes}
    reference = evs.get("in-memory") or plan.kind.evaluator("in-memory", plan.groups, device)
    floor = AutoModelForCausalLM.from_pretrained(str(experts[0].path), dtype=weights.torch_dtype(recipe.dtype))
    floor = floor.to(device).eval()
    floor_targets = {n: t for n, t in floor.state_dict(keep_vars=True).items() if n in reference.targets}
    tok = evaluate.load_tokenizer(experts[0].path)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(strategy, c):
        """(build s, score s) of one evaluation of particle c."""
        if strategy == "floor":
            with torch.no_grad():  # the weights put in place before the clock
                coeffs = weights.coefficient_rows(c, device)
                for name, target in floor_targets.items():
                    weights.combine(reference.expert_rows(name), coeffs[groups[name]], out=target.data.view(-1))
            sync()
            start = time.perf_counter()
            objectives.score(floor, tok, rows, objective, device)
            sync()
            return 0.0, time.perf_counter() - start
        ev = evs[strategy]
        if strategy == "streaming":
            start = time.perf_counter()
            ev.evaluate(c, rows, objective)
            sync()
            return 0.0, time.perf_counter() - start
        start = time.perf_counter()
        ev.build(c)
        sync()
        built = time.perf_counter()
        objectives.score(ev.model, ev.tokenizer, rows, objective, device, batch_size=ev.batch_size,
                         share_prefix=ev.share_prefix)
        sync()
        return built - start, time.perf_counter() - built

    def read_all():  # the least any rebuild costs: the K experts read once from memory
        for stacked in reference.stacked.values():
            stacked.sum()
        sync()

    reads = []
    for _ in range(5):
        start = time.perf_counter()
        read_all()
        reads.append(time.perf_counter() - start)
    strategies = ["floor"] + modes
    particles = _particles(len(experts), args.rounds + 1)
    for s in strategies:  # warm-up
        run(s, particles[0])
    order = random.Random(0)
    rounds = []
    for c in particles[1:]:
        todo = strategies[:]
        order.shuffle(todo)
        rounds.append({s: run(s, c) for s in todo})
    tmp_dir.cleanup()
    return {"objective": args.objective, "rows": len(rows), "rounds": rounds, "read_experts_s": statistics.median(reads),
            "expert_bytes": reference.expert_bytes}


def quantiles(values):
    """(median, 25th, 75th percentile, min, max)."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[1], q[0], q[2], min(values), max(values)


def print_paired(result: dict) -> None:
    rounds = result["rounds"]
    print(f"### {result['objective']}: paired, one process, {len(rounds)} interleaved rounds\n")
    print("Each round scores one particle with every strategy in a shuffled order; ratios are "
          "taken within the round, then summarised over rounds. build / floor is what the mode adds; "
          "score / floor shows whether scoring after a build is any slower (noise: a few %).\n")
    print("| strategy | x floor median (IQR) [min - max] | build s median | score s median | "
          "build / floor median | score / floor median |")
    print("|---|---|---|---|---|---|")
    for s in [s for s in ("floor", "in-memory", "one-model", "streaming") if s in rounds[0]]:
        total = [sum(r[s]) / r["floor"][1] for r in rounds]
        score = [r[s][1] / r["floor"][1] for r in rounds]
        med, q1, q3, lo, hi = quantiles(total)
        print(f"| {s} | {med:.3f} ({q1:.3f} - {q3:.3f}) [{lo:.3f} - {hi:.3f}] | "
              f"{statistics.median(r[s][0] for r in rounds):.3f} | {statistics.median(r[s][1] for r in rounds):.3f} | "
              f"{statistics.median(r[s][0] / r['floor'][1] for r in rounds):.3f} | {statistics.median(score):.3f} |")
    floor = statistics.median(r["floor"][1] for r in rounds)
    print(f"\nThe least a rebuild can cost here, reading the experts' {result['expert_bytes'] / 2**30:.2f} GiB once "
          f"from memory: {result['read_experts_s']:.3f} s = {result['read_experts_s'] / floor:.3f} x the floor's "
          f"median {floor:.3f} s.\n")


# ------------------------------------------------------------------ driver side


def run_worker(args, **over) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--recipe", str(args.recipe), "--repeats", str(args.repeats),
           "--device", args.device, "--lora-recipe", str(args.lora_recipe)]
    for key, value in over.items():
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"worker {over} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    p.add_argument("--objectives", default="exact_match,loglik,multiple_choice")
    p.add_argument("--strategies", default="floor,in-memory,one-model,streaming,naive,lora,lora-streaming")
    p.add_argument("--lora-recipe", type=Path, default=DEFAULT_LORA_RECIPE,
                   help="the same skills as LoRA adapters (strategies lora, lora-streaming)")
    p.add_argument("--repeats", type=int, default=5, help="evaluations per strategy (median reported)")
    p.add_argument("--sizes", default="10,40", help="swarm sizes for the peak-RSS runs ('' to skip)")
    p.add_argument("--size-rows", type=int, default=24, help="dev rows in the swarm-size runs (RSS does not depend on it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write all figures here")
    # worker options
    p.add_argument("--rounds", type=int, default=10,
                   help="rounds of the paired timing (floor, in-memory, one-model, streaming in one process); 0 skips it")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--objective", default="exact_match", help=argparse.SUPPRESS)
    p.add_argument("--swarm-size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(paired_worker(args) if args.paired else worker(args)))
        return
    if not args.recipe.is_file():
        raise SystemExit(f"{args.recipe} not found; build the demo first: make demo-models")

    import platform
    import torch

    print(f"# bench_eval: {args.recipe.relative_to(REPO) if args.recipe.is_relative_to(REPO) else args.recipe}, "
          f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}, "
          f"{args.repeats} evaluations per strategy\n")
    results = []
    for objective in args.objectives.split(","):
        rows = {}
        for strategy in args.strategies.split(","):
            rows[strategy] = run_worker(args, strategy=strategy, objective=objective)
            results.append(rows[strategy])
        floor = rows.get("floor", {}).get("median_seconds")
        print(f"## {objective} ({rows[next(iter(rows))]['rows']} dev rows)\n")
        print("| strategy | s / evaluation (median) | min - max s | x floor (min - max) | merge overhead s | "
              "peak RSS MiB | peak anon RSS MiB | dev utility |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            s = r["median_seconds"]
            lo, hi = min(r["seconds"]), max(r["seconds"])
            # the spread: this strategy's fastest and slowest evaluation against the floor's median
            ratio = f"{s / floor:.2f} ({lo / floor:.2f} - {hi / floor:.2f})" if floor else "-"
            over = f"{s - floor:.3f}" if floor else "-"
            print(f"| {name} | {s:.3f} | {lo:.3f} - {hi:.3f} | {ratio} | {over} | {mib(r['peak_rss'])} | "
                  f"{mib(r['peak_anon'])} | {r['utility']:.4f} |")
        paired = None
        timed = [s for s in ("in-memory", "one-model", "streaming") if s in args.strategies.split(",")]
        if args.rounds and timed:
            paired = run_worker(args, paired=True, objective=objective, strategies=",".join(timed), rounds=args.rounds)
            results.append(paired)
        if floor and "naive" in rows and "in-memory" in rows:
            naive_over = rows["naive"]["median_seconds"] - floor
            if paired:  # the in-memory rebuild as timed in the paired run (steadier than a difference of medians)
                mem_over = statistics.median(r["in-memory"][0] for r in paired["rounds"])
                what = "naive's overhead (own process) / the in-memory rebuild (paired run)"
            else:
                mem_over = rows["in-memory"]["median_seconds"] - floor
                what = "merge overhead naive / in-memory"
            ratio = f"{naive_over / mem_over:.1f}" if mem_over > 0 else "inf (in-memory overhead within noise)"
            print(f"\n{what}: {ratio}")
        if "lora" in rows and "in-memory" in rows:
            print(f"adapters / full models (in-memory): s per evaluation "
                  f"{rows['lora']['median_seconds'] / rows['in-memory']['median_seconds']:.2f}, peak RSS "
                  f"{rows['lora']['peak_rss'] / rows['in-memory']['peak_rss']:.2f}")
        if "streaming" in rows and "in-memory" in rows:
            print(f"streaming / in-memory peak RSS: {rows['streaming']['peak_rss'] / rows['in-memory']['peak_rss']:.2f}"
                  f" (anon: {rows['streaming']['peak_anon'] / rows['in-memory']['peak_anon']:.2f})")
        print()
        if paired:
            print_paired(paired)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        print(f"## peak RSS vs swarm size (initial swarm evaluated, loglik on {args.size_rows} dev rows)\n")
        print("| mode | " + " | ".join(f"size {s} MiB" for s in sizes) + f" | size {sizes[-1]} / size {sizes[0]} |")
        print("|---|" + "---|" * (len(sizes) + 1))
        for mode in ("in-memory", "one-model", "streaming"):
            got = [run_worker(args, strategy=mode, objective="loglik", swarm_size=s, rows=args.size_rows) for s in sizes]
            results += got
            print(f"| {mode} | " + " | ".join(mib(g["peak_rss"]) for g in got)
                  + f" | {got[-1]['peak_rss'] / got[0]['peak_rss']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
