"""Build Llama-shaped experts of a chosen size for the scale bench: a random base plus
small seeded deltas per expert, in bfloat16, sharded as the Hub ships large models.

Random weights are enough to measure memory and time; base + small deltas keep every
affine merge a sane model (it loads, scores and generates). Nothing is held but one shard
of the base and one expert's copy of it: building 8 experts of 1B parameters took 1 min 41 s
and 2.1 GB peak RSS here (2 cores). Each expert's tensors depend only on (seed, shard, expert), so the
first K experts of a K = 8 build are the K = 4 build.

    .venv/bin/python bench/scale/build_experts.py --size 1b --experts 8          # bench/scale/cache/1b/
    .venv/bin/python bench/scale/build_experts.py --size tiny --experts 4 --out /tmp/x --tokenizer tests/...

Writes ``expert0 .. expert{K-1}`` (config, tokenizer, shards, index), a dev and a test
set (``dev.jsonl``, ``test.jsonl``, loglik rows) and ``recipe-k{K}.yml`` for K = 2 up
to the experts built. Rebuilds nothing already complete (``.complete`` records what was built).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(__file__).resolve().parent / "cache"
DEFAULT_TOKENIZER = REPO / "recipes" / "demo" / "models" / "base"

# Llama shapes (untied head, grouped-query attention), with the demo tokenizer's 49152-row vocabulary.
# "135m" is SmolLM2-135M's shape untied (1.63e8 parameters, 0.33 GB per expert in bfloat16); "1b" is
# TinyLlama's 1.1B (1.17e9 parameters, 2.3 GB per expert).
SIZES: Dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    # Llama-3.2-3B's shape untied, with the 49152-row vocabulary (3.2e9 parameters, 6.4 GB per expert)
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8),
}
LAYERS_PER_SHARD = {"tiny": 1, "135m": 30, "1b": 4, "3b": 4}  # 1b: about 350 MB per shard in bfloat16, 3b 800 MB
VOCAB = {"135m": 49152, "1b": 49152, "3b": 49152}  # rows of the embeddings whatever the tokenizer (tiny: the tokenizer's)
DELTA = 0.1  # each expert's delta, relative to the base's standard deviation
STD = 0.02  # the base's initialiser (transformers' initializer_range)


def config_for(size: str, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=2048, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=0, pad_token_id=0, dtype="bfloat16",
                       architectures=["LlamaForCausalLM"], **SIZES[size])


def shard_plan(config) -> List[Dict[str, tuple]]:
    """The tensors of each shard, name -> shape: the embeddings, groups of decoder layers, the head."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    size = next(s for s, shape in SIZES.items() if shape["hidden_size"] == h and shape["intermediate_size"] == i)
    shards: List[Dict[str, tuple]] = [{"model.embed_tokens.weight": (v, h)}]
    for first in range(0, config.num_hidden_layers, LAYERS_PER_SHARD[size]):
        shard: Dict[str, tuple] = {}
        for layer in range(first, min(first + LAYERS_PER_SHARD[size], config.num_hidden_layers)):
            p = f"model.layers.{layer}."
            shard.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        shards.append(shard)
    shards.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shards


def _base_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=gen.device)
    return torch.randn(shape, generator=gen, device=gen.device) * STD


def build(out: Path, size: str, experts: int, tokenizer: Path, seed: int = 0, device: str = "cpu") -> List[Path]:
    """Write ``experts`` expert folders under ``out``; returns them. Skips a complete build.

    ``device="cuda"`` draws the random numbers on the GPU (a 3B build in seconds rather than
    minutes); its experts differ from a CPU build's, so the device is part of the build's stamp."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    owned = out / ".scale-bench"  # this folder is the bench's: a rebuild may replace its expert folders
    if out.is_dir() and any(out.iterdir()) and not (owned.is_file() or (out / ".complete").is_file()):
        raise SystemExit(f"{out} holds files this bench did not write; pass --out an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    owned.touch()
    stamp = {"size": size, "experts": experts, "seed": seed, "delta": DELTA, "tokenizer": str(tokenizer)}
    if device != "cpu":
        stamp["device"] = device
    marker = out / ".complete"
    paths = [out / f"expert{k}" for k in range(experts)]
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return paths
    marker.unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer)) if tokenizer.is_dir() else _fallback_tokenizer(out)
    vocab = max(-(-len(tok) // 64) * 64, VOCAB.get(size, 0))  # padded to a multiple of 64, as released models are
    config = config_for(size, vocab)
    shards = shard_plan(config)
    names = [f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors" for s in range(len(shards))]
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        config.save_pretrained(path)
        tok.save_pretrained(path)
    total = 0
    for s, shard in enumerate(shards):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + s)
        base = {name: _base_tensor(name, shape, gen) for name, shape in shard.items()}
        total += sum(t.numel() * 2 for t in base.values())
        for k, path in enumerate(paths):
            gen_k = torch.Generator(device=device).manual_seed((seed * 1_000_003 + s) * 1009 + k + 1)
            tensors = {}
            for name, t in base.items():
                delta = torch.randn(t.shape, generator=gen_k, device=device) * (DELTA * (STD if t.ndim > 1 else 0.1))
                tensors[name] = (t + delta).to(torch.bfloat16).cpu()
            save_file(tensors, str(path / names[s]), metadata={"format": "pt"})
        del base
    index = {"metadata": {"total_size": total},
             "weight_map": {name: names[s] for s, shard in enumerate(shards) for name in shard}}
    for path in paths:
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    _write_data(out)
    for k in range(2, experts + 1):
        _write_recipe(out, k)
    marker.write_text(json.dumps(stamp))
    return paths


def _fallback_tokenizer(out: Path):
    """A byte-level BPE tokenizer trained here, where the demo's is absent (a bare GPU machine):
    the shapes stay the size's (VOCAB rows), only the ids used are fewer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [f"Add: {a}+{b}= {a + b}" for a in range(10, 100) for b in range(10, 100, 7)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=512, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _rows(n: int, offset: int) -> List[dict]:
    rows = []
    for i in range(n):
        a, b = (7 * i + offset) % 90 + 10, (5 * i + 3 + offset) % 90 + 10
        rows.append({"prompt": f"Add: {a}+{b}=", "answer": f" {a + b}", "task": "add"})
    return rows


def _write_data(out: Path) -> None:
    for name, n, offset in (("dev.jsonl", 8, 0), ("test.jsonl", 8, 50)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in _rows(n, offset)))


def _write_recipe(out: Path, k: int) -> None:
    experts = "\n".join(f"  - ./expert{i}" for i in range(k))
    (out / f"recipe-k{k}.yml").write_text(
        f"# The scale bench (bench/scale/): {k} random Llama-shaped experts, a short loglik dev set.\n"
        f"name: scale-k{k}\nexperts:\n{experts}\ndtype: bfloat16\n"
        "objective:\n  type: loglik\n  dev: dev.jsonl\n  test: test.jsonl\n"
        f"swarm:\n  size: {k + 2}\n  max_iterations: 1\n  racing: false\n  seed: 0\n")


def recipe_with_dev_rows(out: Path, k: int, rows: int) -> Path:
    """``recipe-k{k}.yml`` with a dev set of ``rows`` rows instead of 8 (``dev-{rows}.jsonl``): a
    forward on a GPU costs about the same for 8 rows as for a few hundred, so a dev set of a real
    size shows where the per-evaluation build stops mattering."""
    if rows == 8:
        return out / f"recipe-k{k}.yml"
    (out / f"dev-{rows}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(rows, 0)))
    path = out / f"recipe-k{k}-dev{rows}.yml"
    path.write_text((out / f"recipe-k{k}.yml").read_text().replace("dev: dev.jsonl", f"dev: dev-{rows}.jsonl"))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--out", type=Path, help="default: bench/scale/cache/<size>")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                   help="a folder with tokenizer files (default: the demo base's, from `make demo-models`; where it is "
                        "absent, a small one is trained)")
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn: cpu, or cuda (faster; "
                                                   "other experts than a CPU build's)")
    args = p.parse_args()
    out = args.out or CACHE / args.size
    for path in build(out, args.size, args.experts, args.tokenizer, device=args.device):
        print(path)


if __name__ == "__main__":
    main()
