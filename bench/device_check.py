"""The CUDA paths, checked and timed on a lent GPU machine (or any machine with one).

    python bench/device_check.py [--device cuda] [--small]

1. The CLI end to end on tiny experts with ``--device cuda``, in both eval
   modes: exit 0, a model that loads, and the same winner in both modes.
2. Seconds per evaluation on four SmolLM2-135M-shaped experts (random
   weights; 30 layers, hidden 576, vocab 49152, tied embeddings): the floor
   (scoring with the weights already in place), in-memory (rebuild in place),
   one-model (experts read from their files once per evaluation) and streaming
   (accelerate hooks), for loglik and exact_match; median of 5.
3. The paper's other objectives and LoRA experts, the CLI end to end with
   ``--device cuda``: a reward model, an LLM judge, a custom utility, two
   objectives combined by harmonic mean, LoRA adapters (default and streaming),
   and ``compare`` (random search, CMA-ES, task arithmetic / TIES / DARE):
   exit 0, the winner's dev utility equal to the same run on the CPU.

    python bench/device_check.py --parts 3     # only part 3

Needs only torch, transformers, accelerate, mergekit and this repo (tests/tiny.py
builds the models): no Hub, no demo build. Prints plain tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import tiny  # noqa: E402

from swarm_merge import objectives, pipeline  # noqa: E402
from swarm_merge.cli import main  # noqa: E402
from swarm_merge.options import RunOptions  # noqa: E402
from swarm_merge.recipe import Objective, load_recipe  # noqa: E402
from swarm_merge.report import read as read_report  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(root: Path, device: str) -> None:
    experts = tiny.make_experts(root / "experts", 3)
    print(f"== 1. the CLI on tiny experts, --device {device}")
    results = {}
    for objective in ("loglik", "exact_match"):
        for mode in ("in-memory", "one-model", "streaming"):
            work = root / f"{objective}-{mode}"
            recipe = tiny.write_recipe(work, experts, objective=objective)
            start = time.perf_counter()
            code = main([str(recipe), "--device", device, "--eval-mode", mode, "--no-progress"])
            took = time.perf_counter() - start
            report = read_report(work / "out" / "swarm.json")
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(work / "out")
            results[objective, mode] = report
            w = report.scores.winner
            print(f"{objective:12s} {mode:10s} exit {code}  {took:6.1f} s  winner dev {w.dev.utility:.6f} "
                  f"test {w.test.utility:.6f}  coefficients {np.round(report.coefficients.model, 6).tolist()}  "
                  f"hardware {report.hardware}")
            assert code == 0
        a = results[objective, "in-memory"]
        for other in ("one-model", "streaming"):
            b = results[objective, other]
            same = np.allclose(a.coefficients.model, b.coefficients.model, atol=1e-9)
            print(f"{objective}: in-memory and {other} pick the same winner: {same}; dev utilities differ by "
                  f"{abs(a.scores.winner.dev.utility - b.scores.winner.dev.utility):.2e}")


def timings(root: Path, device: torch.device, small: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"\n== 2. seconds per evaluation, 4 SmolLM2-shaped experts, {device}")
    tok = tiny.make_tokenizer()
    if small:
        config = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                             max_position_embeddings=2048)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = []
    for i in range(4):
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = root / f"big{i}"
        base.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    del base
    # The run's own reading of a recipe over them (experts, their kind, the space); nothing is written.
    recipe = load_recipe(tiny.write_recipe(root / "big-recipe", paths, "dtype: float32\n"))
    plan = pipeline.prepare(recipe, RunOptions(out_dir=str(root / "big-recipe" / "out"), device=str(device)))
    groups = plan.groups
    rows = [objectives.Example(prompt=r["prompt"], answer=r["answer"]) for r in tiny.arithmetic_rows(72)]
    rng = np.random.default_rng(0)
    particles = []
    for _ in range(5):
        c = rng.normal(0.25, 0.3, size=4)
        c[-1] = 1 - c[:-1].sum()
        particles.append(c[None])
    print(f"{'objective':12s} {'strategy':10s} {'s/eval':>8s} {'x floor':>8s} {'peak GPU MiB':>13s}")
    for kind in ("loglik", "exact_match"):
        objective = Objective(type=kind, dev="-", batch_size=36, max_new_tokens=8)
        floor = None
        for strategy in ("floor", "in-memory", "one-model", "streaming"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            ev = plan.kind.evaluator("in-memory" if strategy == "floor" else strategy, groups, device)
            ev.evaluate(particles[0], rows, objective)  # warm-up: kernels, allocator, caches
            times = []
            for c in particles:
                if strategy == "floor":
                    ev.build(c)  # weights in place before the clock starts
                    sync(device)
                    start = time.perf_counter()
                    objectives.score(ev.model, ev.tokenizer, rows, objective, device, batch_size=36)
                else:
                    sync(device)
                    start = time.perf_counter()
                    ev.evaluate(c, rows, objective)
                sync(device)
                times.append(time.perf_counter() - start)
            med = statistics.median(times)
            floor = floor or med
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            print(f"{kind:12s} {strategy:10s} {med:8.3f} {med / floor:8.2f} {peak:13.0f}")
            del ev
            if device.type == "cuda":
                torch.cuda.empty_cache()


SCORE_PY = '''
def utility(model, tokenizer, rows, device):
    losses = []
    for row in rows:
        ids = tokenizer(row["prompt"] + row["answer"], return_tensors="pt")["input_ids"].to(device)
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    return -sum(losses) / len(losses)
'''


def other_objectives(root: Path, device: str) -> None:
    """Part 3: each objective type and LoRA experts through the CLI on ``device``, against the CPU."""
    from transformers import LlamaForSequenceClassification

    print(f"\n== 3. other objectives and LoRA experts, the CLI with --device {device} against --device cpu")
    experts = tiny.make_experts(root / "p3" / "experts", 3)
    base = tiny.make_base(root / "p3" / "experts")
    adapters = tiny.make_adapters(root / "p3" / "adapters", base, 3)
    tok = tiny.make_tokenizer()
    config = tiny.make_config(len(tok))
    config.num_labels = 1
    torch.manual_seed(7)
    rm = root / "p3" / "rm"
    LlamaForSequenceClassification(config).save_pretrained(rm)
    tok.save_pretrained(rm)
    (root / "p3" / "score.py").write_text(SCORE_PY)
    rubric = "Request: {prompt} Response: {response} Rate 1 to 3:"
    cases = {
        "reward": (experts, f"{{type: reward, dev: data/dev.jsonl, reward_model: {rm}, max_new_tokens: 3}}", []),
        "judge": (experts, f"{{type: judge, dev: data/dev.jsonl, judge_model: {experts[0]}, rubric: '{rubric}', "
                           "scale: [1, 3], max_new_tokens: 3}", []),
        "custom": (experts, "{type: custom, dev: data/dev.jsonl}",
                   ["--objective-code", f"{root / 'p3' / 'score.py'}:utility"]),
        "harmonic": (experts, None, []),
        "lora": (adapters, "{type: loglik, dev: data/dev.jsonl, test: data/test.jsonl}", []),
        "lora-streaming": (adapters, "{type: loglik, dev: data/dev.jsonl}", ["--eval-mode", "streaming"]),
        "compare": (experts, "{type: loglik, dev: data/dev.jsonl, test: data/test.jsonl}", ["compare"]),
    }
    for name, (models, objective, flags) in cases.items():
        got = {}
        for i, dev_name in enumerate(("cpu", device)):
            work = root / "p3" / f"{name}-{i}-{dev_name}"
            tiny.write_jsonl(work / "data" / "dev.jsonl", tiny.arithmetic_rows(8))
            tiny.write_jsonl(work / "data" / "test.jsonl", tiny.arithmetic_rows(8, offset=5))
            body = (f"objective: {objective}\n" if objective else
                    "objectives:\n  - {type: exact_match, dev: data/dev.jsonl, name: a}\n"
                    "  - {type: exact_match, dev: data/test.jsonl, name: b}\ncombine: mean\n")
            lines = "\n".join(f"  - {p}" for p in models)
            extra = f"base_model: {base}\n" if name == "compare" else ""
            recipe = work / "recipe.yml"
            recipe.write_text(f"name: {name}\nexperts:\n{lines}\n{extra}{body}"
                              f"swarm: {{size: 5, max_iterations: 2}}\noutput: {{dir: {work / 'out'}}}\n")
            sub = [f for f in flags if f == "compare"]
            rest = [f for f in flags if f != "compare"]
            start = time.perf_counter()
            code = main([*sub, str(recipe), "--device", dev_name, "--no-progress", *rest])
            took = time.perf_counter() - start
            report = read_report(work / "out" / "swarm.json") if code == 0 else None
            got[i] = report.scores.winner.dev.utility if report else None
            extra_info = ""
            if report is not None and report.comparison is not None:
                extra_info = "  methods " + ", ".join(f"{m.method} {m.dev_mean:.4f}" for m in report.comparison.summary)
            where = f"  on {report.hardware}" if report is not None else ""
            print(f"{name:15s} {dev_name:5s} exit {code}  {took:6.1f} s  winner dev {got[i]}{where}{extra_info}")
        if None in got.values():
            print(f"{name:15s} a run failed")
        else:
            diff = abs(got[0] - got[1])
            print(f"{name:15s} cpu and {device} winners' dev utilities differ by {diff:.2e}")


def run(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a small model for part 2 (a smoke test on CPU)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "1" in parts:
            end_to_end(root, args.device)
        if "2" in parts:
            timings(root, torch.device(args.device), args.small)
        if "3" in parts:
            other_objectives(root, args.device)
    sys.stdout.flush()


if __name__ == "__main__":
    run()
