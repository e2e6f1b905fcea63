"""Tiny real models for fast tests: a 2-layer Llama with a byte-level BPE
tokenizer trained on the fly, and experts that are seeded perturbations of
one base (like fine-tunes of a shared model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

CORPUS = [f"{a}+{b}={a + b}" for a in range(30) for b in range(30)] + [
    "upper: cat -> CAT", "reverse: abc -> cba", "the quick brown fox jumps over the lazy dog",
]


def make_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def make_config(vocab_size: int, *, tie: bool = False, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )


def make_experts(root: Path, n: int = 3, *, tie: bool = False, layers: int = 2, scale: float = 0.5,
                 dtype=torch.float32, names: Optional[List[str]] = None) -> List[Path]:
    """A base model and ``n`` experts = base + seeded noise; returns the expert folders."""
    from transformers import LlamaForCausalLM

    tok = make_tokenizer()
    config = make_config(len(tok), tie=tie, layers=layers)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype)
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        expert = LlamaForCausalLM(config).to(dtype)
        with torch.no_grad():
            for p, q in zip(expert.parameters(), base.parameters()):
                p.copy_(q + scale * torch.randn_like(q) * q.float().std().clamp(min=1e-3).to(dtype))
        path = root / (names[i] if names else f"expert{i}")
        expert.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths


def write_jsonl(path: Path, rows: List[Dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arithmetic_rows(n: int, *, offset: int = 0) -> List[Dict]:
    rows = []
    for i in range(n):
        a, b = (7 * i + offset) % 23, (5 * i + 3 + offset) % 19
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "task": "add" if i % 2 else "sum"})
    return rows


def write_recipe(root: Path, experts, extra: str = "", *, objective: str = "loglik") -> Path:
    """A runnable recipe over ``experts`` at ``root/recipe.yml``, with dev/test data
    under ``root/data`` and its output at ``root/out``."""
    root = Path(root)
    write_jsonl(root / "data" / "dev.jsonl", arithmetic_rows(12))
    write_jsonl(root / "data" / "test.jsonl", arithmetic_rows(12, offset=5))
    lines = "\n".join(f"  - {p}" for p in experts)
    text = (
        f"name: tiny\nexperts:\n{lines}\n"
        f"objective:\n  type: {objective}\n  dev: data/dev.jsonl\n  test: data/test.jsonl\n  batch_size: 64\n"
        "  max_new_tokens: 3\n"
        "swarm:\n  size: 5\n  max_iterations: 3\n  patience: 3\n"
        f"output:\n  dir: {root / 'out'}\n" + extra
    )
    path = root / "recipe.yml"
    path.write_text(text, encoding="utf-8")
    return path


def make_base(root: Path, *, tie: bool = False, layers: int = 2, dtype=torch.float32, name: str = "base") -> Path:
    """The tiny base model (the one make_experts perturbs), saved with its tokenizer."""
    from transformers import LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(make_config(len(tok), tie=tie, layers=layers)).to(dtype)
    path = Path(root) / name
    base.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_adapters(root: Path, base: Path, n: int = 3, *, ranks=None, alphas=None, targets=("q_proj", "v_proj"),
                  base_name: Optional[str] = None, scale: float = 1.0, names: Optional[List[str]] = None,
                  **config) -> List[Path]:
    """``n`` PEFT LoRA adapters on ``base`` with seeded random (non-zero) A and B;
    ``base_name`` is written as their base_model_name_or_path (default: the base's folder)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        torch.manual_seed(200 + i)
        model = AutoModelForCausalLM.from_pretrained(str(base))
        r = (ranks or [4] * n)[i]
        alpha = (alphas or [2 * r] * n)[i] if alphas or not ranks else 2 * r
        lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                          lora_dropout=0.0, **config)
        peft_model = get_peft_model(model, lcfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.mul_(scale)
        path = Path(root) / (names[i] if names else f"adapter{i}")
        peft_model.save_pretrained(str(path))
        cfg_file = path / "adapter_config.json"
        data = json.loads(cfg_file.read_text())
        data["base_model_name_or_path"] = base_name if base_name is not None else str(base)
        cfg_file.write_text(json.dumps(data, indent=2))
        paths.append(path)
    return paths


def make_reward_model(root: Path, name: str = "rm") -> Path:
    """A tiny reward model (Llama sequence classifier, one output, seeded), saved with the tokenizer."""
    from transformers import LlamaForSequenceClassification

    tok = make_tokenizer()
    config = make_config(len(tok))
    config.num_labels = 1
    torch.manual_seed(7)
    path = Path(root) / name
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
