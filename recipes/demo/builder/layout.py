"""What lives where under the models folder, and what a model folder holds.

    <out>/base/               the converted base model (base.py)
    <out>/<skill>/            each skill's expert: the base with its LoRA merged in (train.py)
    <out>/adapters/<skill>/   that LoRA as a PEFT adapter folder (train.py)
    <out>/reward/             a reward model (sequence classification, one output) (reward.py)

A model folder is a transformers folder (config.json, generation_config.json,
one model.safetensors, tokenizer files with the chat template), plus
build_info.json and a model card (README.md) carrying the license, so merges
of these experts inherit it.  An adapter folder is a PEFT folder
(adapter_config.json, adapter_model.safetensors) plus build_info.json and a
card; its ``base_model_name_or_path`` is the base folder's path relative to
the adapter folder (``../../base``), so the models folder can be moved.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import cache
from .spec import BuildSpec

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def base_dir(out: Path) -> Path:
    return out / "base"


def expert_dir(out: Path, skill: str) -> Path:
    return out / skill


def reward_dir(out: Path) -> Path:
    return out / "reward"


def adapter_dir(out: Path, skill: str) -> Path:
    return out / "adapters" / skill


def base_ref(adapter: Path, base: Path) -> str:
    """The base folder as an adapter records it: relative to the adapter folder."""
    return Path(os.path.relpath(base, adapter)).as_posix()


CARD = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [swarm_merge-demo]
---
# {name}

A swarm_merge demo model built by recipes/demo/build_experts.py from
SmolLM2-135M-Instruct (Apache-2.0){what}.
"""


def write_card(folder: Path, name: str, what: str = "") -> None:
    """A model card carrying the license; ``what`` ends the sentence saying what it is."""
    (folder / "README.md").write_text(CARD.format(name=name, what=what), encoding="utf-8")


def save_model_folder(model, tok, final: Path, spec: BuildSpec, extra: dict, what: str = "") -> None:
    """Write a full model folder (weights, tokenizer, build_info, card) and publish it."""
    with cache.staged(final) as tmp:
        model.save_pretrained(tmp)  # one model.safetensors (135M params)
        tok.save_pretrained(tmp)
        cache.write_build_info(tmp, spec, extra)
        write_card(tmp, final.name, what)
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"save_pretrained did not write {tmp / 'model.safetensors'}")
