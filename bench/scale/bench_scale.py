"""Benchmark: memory and seconds per evaluation at scale, per eval mode, and the cost model's check.

Builds (once, cached in bench/scale/cache/) Llama-shaped random experts of each size
(build_experts.py) and, for each size and number of experts K:

1. one worker process per strategy, on the recipe's dev rows: ``floor`` (one model loaded
   once, scored: what an evaluation cannot go below), then ``in-memory`` (only where the
   machine holds K + 1 models), ``one-model`` and ``streaming``: seconds per evaluation
   (build and score apart where the mode builds before it scores), expert bytes read per
   evaluation, the worker's peak RSS (anonymous and file-backed);
2. whole runs of ``mergekit-swarm`` on the size's recipe: ``--eval-mode auto`` under
   ``--max-memory`` (below what in-memory needs), then each other mode the machine holds
   (no budget): wall time, peak RssAnon / RssFile per stage (search, baselines, write),
   and the write's seconds. A run whose anonymous peak passes the budget is flagged;
3. the bandwidths behind the cost model (cost_model.py): the experts read cold (evicted
   from the page cache with posix_fadvise) and hot.

Then prints the tables, the cost model's predictions against every measurement, and its
extrapolation to 7B and 70B. Writes every figure to ``--json`` (default
bench/scale/cache/results.json). Asserts nothing.

    .venv/bin/python bench/scale/bench_scale.py                      # 135m and 1b, K = 4 and 8 (~40 min here)
    .venv/bin/python bench/scale/bench_scale.py --sizes 1b --experts 4 --max-memory 6GB
    python bench/scale/bench_scale.py --device cuda --sizes 1b --experts 4,8   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "bench")]

import build_experts  # noqa: E402
import cost_model  # noqa: E402
from whole_run_memory import measure  # noqa: E402

GIB = 2**30
MIB = 2**20
BUDGET = {"tiny": "40MB", "135m": "1.5GB", "1b": "6GB", "3b": "16GB"}  # below in-memory's need at K = 4


# ------------------------------------------------------------------ worker side


def _rss() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Peak:
    """Samples RssAnon and RssFile every 10 ms in a thread; keeps the maxima."""

    def __init__(self) -> None:
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in _rss().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.01)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peak


def _particles(k: int, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        a = rng.normal(0.0, 0.3, size=k) + 1.0 / k
        a[-1] = 1.0 - a[:-1].sum()
        out.append(a[None, :])
    return out


def worker(strategy: str, recipe_path: Path, repeats: int, device_name: str = "cpu") -> dict:
    import torch

    from swarm_merge import evaluate, objectives, pipeline
    from swarm_merge.options import RunOptions
    from swarm_merge.recipe import load_recipe

    peak = Peak()
    recipe = load_recipe(recipe_path)
    # The run's own reading of the recipe (experts, space, objective, rows); the output folder is never written.
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        plan = pipeline.prepare(recipe, RunOptions(out_dir=str(Path(tmp) / "out"), device=device_name))
    experts, rows, objective, device = plan.experts, plan.dev, plan.objective, plan.device

    def sync() -> None:  # the clock reads a GPU's work done, not queued
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tokenizer = evaluate.load_tokenizer(experts[0].path)
    tokens = sum(len(tokenizer(e.prompt + e.answer).input_ids) for e in rows)
    particles = _particles(len(experts), repeats + 1)
    times, builds, read = [], [], []
    base_anon = _rss()["RssAnon"]  # torch, transformers and the tokenizer loaded; no model yet
    start = time.perf_counter()
    if strategy == "floor":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(experts[0].path), dtype=evaluate.torch_dtype(recipe.dtype))
        model = model.to(device).eval()
        load_s = time.perf_counter() - start
        objectives.score(model, tokenizer, rows, objective, device)  # warm-up
        for _ in particles[1:]:
            t = time.perf_counter()
            objectives.score(model, tokenizer, rows, objective, device)
            sync()
            times.append(time.perf_counter() - t)
    else:
        ev = plan.kind.evaluator(strategy, plan.groups, device)
        load_s = time.perf_counter() - start
        counter = getattr(ev, "combiner", None) or getattr(getattr(ev, "weights", None), "combiner", None)
        ev.evaluate(particles[0], rows, objective)  # warm-up
        for c in particles[1:]:
            before = counter.bytes_read if counter else 0
            t = time.perf_counter()
            if strategy == "streaming":
                ev.evaluate(c, rows, objective)
                builds.append(float("nan"))
            else:
                ev.build(c)
                sync()
                builds.append(time.perf_counter() - t)
                objectives.score(ev.model, ev.tokenizer, rows, objective, device, batch_size=ev.batch_size,
                                 share_prefix=ev.share_prefix)
            sync()
            times.append(time.perf_counter() - t)
            read.append((counter.bytes_read if counter else 0) - before)
        ev.close()
    return {"strategy": strategy, "seconds": times, "median_s": statistics.median(times),
            "build_s": statistics.median(builds) if builds else 0.0, "bytes_read": statistics.median(read) if read else 0,
            "load_s": load_s, "base_anon": base_anon, "tokens": tokens, "rows": len(rows), "peak": peak.stop(),
            "gpu_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def bandwidth_worker(recipe_path: Path) -> dict:
    """Expert bytes per second read into a reused buffer (pread, as the one-model and streaming
    builds read), cold (the files evicted from the page cache first) and hot (just read)."""
    import torch

    from swarm_merge import experts as experts_mod, weights
    from swarm_merge.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    experts = experts_mod.pull_experts(recipe.experts)
    files = sorted({info.file for e in experts for info in e.tensors.values()})
    total = sum(os.path.getsize(f) for f in files)

    def evict() -> None:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def read_all() -> float:
        reader = weights.TensorReader()
        buffers: dict = {}
        start = time.perf_counter()
        for e in experts:
            for name, info in e.tensors.items():
                dtype = reader.stored_dtype(info.file, name)
                buf = buffers.setdefault(dtype, torch.empty(weights.CHUNK, dtype=dtype))
                for off in range(0, info.numel, weights.CHUNK):
                    reader.read_into(info.file, name, buf[: min(weights.CHUNK, info.numel - off)], start=off)
        reader.close()
        return time.perf_counter() - start

    evict()
    cold = read_all()
    hot = statistics.median(read_all() for _ in range(2))
    return {"bytes": total, "cold_Bps": total / cold, "hot_Bps": total / hot}


# ------------------------------------------------------------------ driver side


def run_worker(*args: str) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"worker {args} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def bench_one(size: str, k: int, recipe: Path, args) -> dict:
    from swarm_merge import evaluate, experts as experts_mod
    from swarm_merge.recipe import load_recipe

    r = load_recipe(recipe)
    experts = experts_mod.pull_experts(r.experts)
    estimate = evaluate.memory_estimate(experts, r.dtype)
    out = {"size": size, "k": k, "params": experts[0].num_parameters, "dtype": r.dtype, "estimate": estimate,
           "largest": max(t.numel for t in experts[0].tensors.values()), "workers": {}, "runs": []}
    out["device"] = args.device
    fits = estimate["in-memory"] < (_gpu_memory() * 0.8 if args.device.startswith("cuda") else
                                    0.6 * _machine_memory())
    strategies = [s for s in args.strategies.split(",") if s != "in-memory" or fits]
    for s in strategies:
        out["workers"][s] = run_worker(s, str(recipe), "--repeats", str(args.repeats), "--device", args.device)
        w = out["workers"][s]
        print(f"  {size} K={k} {s}: {w['median_s']:.3f} s/eval, build {w['build_s']:.3f} s, "
              f"{w['bytes_read'] / GIB:.2f} GiB read, peak anon {w['peak']['RssAnon'] / MIB:,.0f} MiB", flush=True)
    out["bandwidth"] = run_worker("bandwidth", str(recipe))
    # On CPU auto runs under a host budget below in-memory's need; on a GPU it decides from the GPU's
    # free memory (as a user's run does) unless --max-memory is given.
    budget = args.max_memory or (None if args.device.startswith("cuda") else BUDGET[size])
    with tempfile.TemporaryDirectory(prefix="swarm-scale-") as tmp:
        if args.runs == "none":
            return out
        device = ["--device", args.device]
        auto = measure("auto", args.set, Path(tmp) / "auto", recipe=recipe,
                       extra=[*(["--max-memory", budget] if budget else []), *device])
        auto["budget"] = evaluate.parse_bytes(budget) if budget else None
        out["runs"].append(auto)
        print(f"  {size} K={k} auto under {budget or 'the GPU free memory'}: ran {auto['ran']}, "
              f"{auto['wall']:.0f} s", flush=True)
        for mode in ("in-memory", "one-model", "streaming") if args.runs == "all" else ():
            if mode == auto["ran"] or (mode == "in-memory" and not fits):
                continue
            run = measure(mode, args.set, Path(tmp) / mode, recipe=recipe, extra=device)
            out["runs"].append(run)
            print(f"  {size} K={k} {mode}: {run['wall']:.0f} s", flush=True)
    for run in out["runs"]:
        run.pop("log", None)
    return out


def print_tables(results) -> None:
    for res in results:
        w = res["workers"]
        floor = w["floor"]["median_s"]
        print(f"\n## {res['size']} ({res['params'] / 1e9:.2f}e9 parameters, {res['dtype']}), K = {res['k']}: "
              f"{w['floor']['rows']} dev rows, {w['floor']['tokens']} tokens per evaluation\n")
        gpu = res.get("device", "cpu") != "cpu"
        print("| strategy | s / eval (median) | x floor | build s | expert GiB read / eval | worker peak anon / file MiB |"
              + (" GPU peak MiB |" if gpu else ""))
        print("|---|---|---|---|---|---|" + ("---|" if gpu else ""))
        for s, v in w.items():
            print(f"| {s} | {v['median_s']:.3f} | {v['median_s'] / floor:.2f} | {v['build_s']:.3f} | "
                  f"{v['bytes_read'] / GIB:.2f} | {v['peak']['RssAnon'] / MIB:,.0f} / {v['peak']['RssFile'] / MIB:,.0f} |"
                  + (f" {v.get('gpu_peak', 0) / MIB:,.0f} |" if gpu else ""))
        if "in-memory" not in w:
            print(f"| in-memory | not run: needs {res['estimate']['in-memory'] / GIB:.1f} GiB of weights | | | | |")
        bw = res["bandwidth"]
        print(f"\nExpert files read with pread: cold {bw['cold_Bps'] / 1e9:.2f} GB/s, hot (page cache) "
              f"{bw['hot_Bps'] / 1e9:.2f} GB/s ({bw['bytes'] / GIB:.1f} GiB).\n")
        print("| whole run | mode | wall s | search anon / file MiB | baselines anon / file MiB | write anon / file MiB "
              "| write s | peak anon MiB | within budget |")
        print("|---|---|---|---|---|---|---|---|---|")
        for run in res["runs"]:
            cells = []
            for st in ("search", "baselines", "write"):
                v = run["peaks"].get(st)
                cells.append(f"{v['RssAnon'] / MIB:,.0f} / {v['RssFile'] / MIB:,.0f}" if v else "-")
            anon = max(v["RssAnon"] for v in run["peaks"].values())
            budget = run.get("budget")
            label = (f"auto, --max-memory {budget / GIB:.2f} GiB" if budget else
                     "auto (GPU free memory)" if run["mode"] == "auto" else run["mode"])
            within = ("yes" if anon <= budget else f"NO ({anon / budget:.2f} x)") if budget else "-"
            print(f"| {label} | {run['ran']} | {run['wall']:.0f} | " + " | ".join(cells)
                  + f" | {run['seconds'].get('write', float('nan')):.0f} | {anon / MIB:,.0f} | {within} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="135m,1b")
    p.add_argument("--experts", default="4,8", help="values of K")
    p.add_argument("--strategies", default="floor,in-memory,one-model,streaming")
    p.add_argument("--dev-rows", type=int, default=8, help="rows in the dev set scored per evaluation")
    p.add_argument("--repeats", type=int, default=3, help="timed evaluations per strategy (after one warm-up)")
    p.add_argument("--max-memory", help="the auto run's budget (default per size: " + ", ".join(
        f"{k} {v}" for k, v in BUDGET.items()) + ")")
    p.add_argument("--runs", choices=("all", "auto", "none"), default="all",
                   help="whole runs: auto under the budget, then every other mode that fits (all), auto only, or none")
    p.add_argument("--set", action="append", default=[], help="recipe overrides for the whole runs")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (the workers and the whole runs)")
    p.add_argument("--cache", type=Path, default=build_experts.CACHE)
    p.add_argument("--tokenizer", type=Path, default=build_experts.DEFAULT_TOKENIZER)
    p.add_argument("--json", type=Path, help="default: <cache>/results.json")
    p.add_argument("--report", type=Path, help="print the tables and the cost model of a results file; run nothing")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        strategy, recipe = args.worker[0], Path(args.worker[1])
        result = (bandwidth_worker(recipe) if strategy == "bandwidth"
                  else worker(strategy, recipe, args.repeats, args.device))
        print(json.dumps(result))
        return
    import platform

    import torch

    if args.report:  # the tables and the cost model again, from a results file
        results = json.loads(args.report.read_text())
        print_tables(results)
        if all(r.get("device", "cpu") == "cpu" for r in results):
            cost_model.report(results)
        else:  # a GPU run: its own rates
            cost_model.report_gpu(results, build_experts.SIZES[results[0]["size"]].get("num_hidden_layers", 1))
        return
    ks = [int(k) for k in args.experts.split(",")]
    print(f"# bench_scale: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {args.device}; "
          f"sizes {args.sizes}, K {ks}", flush=True)
    results = []
    for size in args.sizes.split(","):
        folder = args.cache / size
        start = time.perf_counter()
        build_experts.build(folder, size, max(ks), args.tokenizer, device="cuda" if args.device.startswith("cuda") else "cpu")
        print(f"  {size}: {max(ks)} experts ready in {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
        for k in ks:
            results.append(bench_one(size, k, build_experts.recipe_with_dev_rows(folder, k, args.dev_rows), args))
    (args.json or args.cache / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    if args.device == "cpu":
        cost_model.report(results)
    elif all({"in-memory", "one-model", "streaming"} <= set(r["workers"]) for r in results):
        cost_model.report_gpu(results, build_experts.SIZES[results[0]["size"]].get("num_hidden_layers", 1))


if __name__ == "__main__":
    main()
