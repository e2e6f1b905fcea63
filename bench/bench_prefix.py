"""Benchmark: scoring a few-shot dev set with and without the shared prompt prefix computed once.

The dev set: every row of recipes/demo/data/dev.jsonl behind the same k-shot
prefix (k solved rows of the demo's test set, mixed skills), scored with the
``loglik`` objective on the first demo expert, in memory. Prints seconds per
evaluation (median of --repeats) both ways, the speedup and the largest
difference in utility. Asserts nothing.

    .venv/bin/python bench/bench_prefix.py [--shots 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from swarm_merge import objectives  # noqa: E402
from swarm_merge.evaluate import load_tokenizer  # noqa: E402
from swarm_merge.recipe import Objective, load_recipe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=36)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(REPO / "recipes" / "demo.yml")
    data = REPO / "recipes" / "demo" / "data"
    test = (data / "test.jsonl").read_text().splitlines()
    shots = [json.loads(test[i * len(test) // args.shots]) for i in range(args.shots)]  # spread over the skills
    prefix = "".join(f"{r['prompt']}{r['answer']}\n" for r in shots)
    dev = [json.loads(line) for line in (data / "dev.jsonl").read_text().splitlines()]
    rows = [objectives.Example(prompt=prefix + r["prompt"], answer=r["answer"], group=r.get("task")) for r in dev]
    expert = Path(recipe.experts[0].model)
    model = AutoModelForCausalLM.from_pretrained(str(expert), dtype=torch.float32).eval()
    tok = load_tokenizer(expert)
    objective = Objective(type="loglik", dev="-", batch_size=args.batch_size)
    cpu = torch.device("cpu")
    prefix_tokens = len(tok(prefix)["input_ids"])
    mean_row = sum(len(tok(r.prompt + r.answer)["input_ids"]) for r in rows) / len(rows)
    print(f"# {len(rows)} rows, {args.shots}-shot prefix of {prefix_tokens} tokens, {mean_row:.0f} tokens a row, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.repeats}")
    results = {False: [], True: []}
    for _ in range(args.repeats):
        for share in (False, True):  # interleaved: drift on a noisy machine hits both alike
            start = time.perf_counter()
            score = objectives.score(model, tok, rows, objective, cpu, share_prefix=share)
            results[share].append((time.perf_counter() - start, score.utility))
    plain = statistics.median(t for t, _ in results[False])
    shared = statistics.median(t for t, _ in results[True])
    diff = max(abs(a - b) for (_, a), (_, b) in zip(results[False], results[True]))
    print("| scoring | s / evaluation | speedup |\n|---|---|---|")
    print(f"| every row in full | {plain:.3f} | 1.00 |")
    print(f"| shared prefix once | {shared:.3f} | {plain / shared:.2f} |")
    print(f"largest utility difference: {diff:.2e}")


if __name__ == "__main__":
    main()
