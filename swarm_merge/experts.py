"""Pull the experts (local folders or Hub repos) and index their tensors.

Compatibility is decided from config.json and the safetensors headers alone,
before any weight is read: same architecture, same tensor names, same shapes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from safetensors import safe_open

from swarm_merge.errors import ExpertError, ExpertMismatchError
from swarm_merge.recipe import ExpertRef

__all__ = ["TensorInfo", "Expert", "pull_expert", "pull_experts", "index_folder", "check_compatible"]

LOG = logging.getLogger(__name__)

# What a merge needs from a repo: weights, configs, tokenizer. Pickled *.bin
# weights are never fetched (they can run code on load).
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # absolute path of the shard holding it
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class Expert:
    """A pulled expert: where its files are, what revision, what tensors."""

    ref: ExpertRef
    path: Path
    revision: Optional[str]  # resolved commit sha for a Hub repo; None for a local folder
    config: dict = field(repr=False)
    tensors: Dict[str, TensorInfo] = field(repr=False)

    @property
    def name(self) -> str:
        return self.ref.model if not self.ref.is_local else self.path.name

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def describe(self) -> str:
        rev = f"@{self.revision[:10]}" if self.revision else ""
        return f"{self.ref.model}{rev}"


def index_folder(path: Path, label: str) -> Tuple[dict, Dict[str, TensorInfo]]:
    """Read config.json and every safetensors header of a model folder."""
    if not path.is_dir():
        raise ExpertError(f"expert {label}: folder {str(path)!r} not found; check the path in the recipe")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExpertError(f"expert {label}: no config.json in {str(path)!r}; point at a saved transformers model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExpertError(f"expert {label}: config.json is not valid JSON ({exc}); re-save the model") from None
    shards = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not shards:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found pickled {bins[0]}; convert it to safetensors)" if bins else ""
        raise ExpertError(f"expert {label}: no *.safetensors weights in {str(path)!r}{hint}; save the model with safe_serialization")
    tensors: Dict[str, TensorInfo] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    tensors[name] = TensorInfo(str(shard.resolve()), sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ExpertError(f"expert {label}: cannot read {shard.name} ({exc}); re-download or re-save it") from None
    return config, tensors


def pull_expert(ref: ExpertRef, *, cache_dir: Optional[str] = None, what: str = "expert") -> Expert:
    """Make one expert available locally (download if it is a Hub repo) and index it."""
    if ref.is_local:
        path = Path(ref.model).expanduser()
        config, tensors = index_folder(path, f"{ref.model!r}")
        return Expert(ref=ref, path=path, revision=None, config=config, tensors=tensors)
    from swarm_merge import hub  # Hub calls live in one module

    path, revision = hub.download(ref, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS, what=what)
    config, tensors = index_folder(path, f"{str(ref)!r}")
    return Expert(ref=ref, path=path, revision=revision, config=config, tensors=tensors)


def pull_experts(refs: Sequence[ExpertRef], *, cache_dir: Optional[str] = None) -> List[Expert]:
    """Pull and index every expert, then check they can be merged."""
    experts = [pull_expert(r, cache_dir=cache_dir) for r in refs]
    check_compatible(experts)
    return experts


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else str(config.get("model_type", "?"))


def check_compatible(experts: Sequence[Expert]) -> None:
    """Same architecture, tensor names and shapes, or an error naming the tensor."""
    first = experts[0]
    arch = _architecture(first.config)
    for other in experts[1:]:
        other_arch = _architecture(other.config)
        if other_arch != arch:
            raise ExpertMismatchError(
                f"experts have different architectures: {first.describe()} is {arch}, "
                f"{other.describe()} is {other_arch}; merge experts of one architecture"
            )
        missing = sorted(set(first.tensors) ^ set(other.tensors))
        if missing:
            name = missing[0]
            has = first if name in first.tensors else other
            lacks = other if has is first else first
            raise ExpertMismatchError(
                f"tensor {name!r} is in {has.describe()} but not in {lacks.describe()}; "
                "experts must share every tensor (same architecture and config)"
            )
        for name, info in first.tensors.items():
            o = other.tensors[name]
            if o.shape != info.shape:
                raise ExpertMismatchError(
                    f"tensor {name!r} has shape {list(info.shape)} in {first.describe()} but "
                    f"{list(o.shape)} in {other.describe()}; experts must be fine-tunes of one base model"
                )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def token_files(path: Path) -> List[str]:
    return [p for p in os.listdir(path) if p.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template"))]
