"""Pull the experts (local folders or Hub repos) and index their tensors.

Compatibility is decided from config.json and the safetensors headers alone,
before any weight is read: same architecture, same tensor names, same shapes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from safetensors import safe_open

from swarm_merge.errors import ExpertError, ExpertMismatchError
from swarm_merge.recipe import ExpertRef

__all__ = ["TensorInfo", "Expert", "pull_expert", "pull_experts", "index_folder", "check_compatible"]

LOG = logging.getLogger(__name__)

# What a merge needs from a repo: configs, tokenizer, the card (for its
# license), and the weights as safetensors. Pickled *.bin weights can run code
# when unpickled: fetched only for a recipe with `allow_pickle: true` and a repo
# that has no safetensors. Never *.py: remote code is never run.
SMALL_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
ALLOW_PATTERNS = ["*.safetensors"] + SMALL_PATTERNS
PICKLE_PATTERNS = ["pytorch_model*.bin"] + SMALL_PATTERNS

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
    # Bytes a pull fetches from the Hub (None for a local folder).
    download_bytes: Optional[int] = None
    # The weights were pickled *.bin, converted to safetensors (allow_pickle).
    pickled: bool = False

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


def _read_config(path: Path, label: str) -> dict:
    if not path.is_dir():
        raise ExpertError(f"expert {label}: folder {str(path)!r} not found; check the path in the recipe")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExpertError(f"expert {label}: no config.json in {str(path)!r}; point at a saved transformers model folder")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExpertError(f"expert {label}: config.json is not valid JSON ({exc}); re-save the model") from None


def _weight_files(path: Path) -> List[Path]:
    return sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_"))


def index_folder(path: Path, label: str) -> Tuple[dict, Dict[str, TensorInfo]]:
    """Read config.json and every safetensors header of a model folder."""
    config = _read_config(path, label)
    shards = _weight_files(path)
    if not shards:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = (f" (found pickled {bins[0]}: set `allow_pickle: true` in the recipe to convert it, "
                "or convert it to safetensors yourself)") if bins else ""
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


def pull_expert(ref: ExpertRef, *, cache_dir: Optional[str] = None, what: str = "expert",
                allow_pickle: bool = False, download: bool = True) -> Expert:
    """Make one expert available locally and index it.

    A Hub repo is first resolved to a commit and its file list (no download), so
    a repo without safetensors fails before any weight moves; then the snapshot
    is downloaded (configs, tokenizer, card and weights only). When the Hub
    cannot be reached, a snapshot already in the cache is used.

    Args:
        ref: a local folder or a Hub repo at an optional revision.
        cache_dir: the Hub download cache (default: the Hugging Face cache).
        what: the expert's role, for error messages.
        allow_pickle: accept a repo or folder whose only weights are pickled
            ``pytorch_model*.bin``; they are read with torch's weights-only loader
            and converted to safetensors once.
        download: False resolves a Hub repo without downloading its weights
            (``--dry-run``): the tensors then come from the safetensors headers,
            read remotely, and ``path`` holds only the small files.
    """
    if ref.is_local:
        path = Path(ref.model).expanduser()
        label = f"{ref.model!r}"
        path, pickled = _as_safetensors(path, label, allow_pickle=allow_pickle, convert=download)
        if pickled and not download:
            return Expert(ref=ref, path=path, revision=None, config=_read_config(path, label), tensors={}, pickled=True)
        config, tensors = index_folder(path, label)
        return Expert(ref=ref, path=path, revision=None, config=config, tensors=tensors, pickled=pickled)
    from swarm_merge import hub  # Hub calls live in one module

    label = f"{str(ref)!r}"
    try:
        snapshot = hub.resolve(ref, what=what)
    except hub.HubUnreachable as exc:
        found = hub.cached(ref, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS)
        if found is None:
            raise hub.unreachable_error(ref, exc.reason, what=what) from None
        path, revision = found
        LOG.warning("%s %s: %s; using the cached snapshot %s", what, ref, exc.reason, revision)
        path, pickled = _as_safetensors(path, label, allow_pickle=allow_pickle, key=f"{ref.model}@{revision}")
        config, tensors = index_folder(path, label)
        return Expert(ref=ref, path=path, revision=revision, config=config, tensors=tensors, pickled=pickled)

    patterns, pickled = _patterns_for(snapshot.files, f"{what} {label}", allow_pickle=allow_pickle)
    size = sum(n or 0 for f, n in snapshot.files.items() if any(fnmatch.fnmatch(f, p) for p in patterns))
    if not download:
        return _planned(ref, snapshot, pickled, size, cache_dir=cache_dir, what=what)
    LOG.info("pulling %s %s at %s (%s)", what, ref.model, snapshot.commit[:12], human_bytes(size))
    path, revision = hub.download(ref, cache_dir=cache_dir, allow_patterns=patterns, what=what)
    path, pickled = _as_safetensors(path, label, allow_pickle=allow_pickle, key=f"{ref.model}@{revision}")
    config, tensors = index_folder(path, label)
    return Expert(ref=ref, path=path, revision=revision, config=config, tensors=tensors,
                  download_bytes=size, pickled=pickled)


def pull_experts(refs: Sequence[ExpertRef], *, cache_dir: Optional[str] = None, allow_pickle: bool = False,
                 download: bool = True) -> List[Expert]:
    """Pull and index every expert, then check they can be merged.

    With ``download=False`` (``--dry-run``) nothing large is downloaded; experts
    whose tensors are not known without their weights (pickled ones) are left
    out of the compatibility check, which the real run repeats.
    """
    experts = [pull_expert(r, cache_dir=cache_dir, allow_pickle=allow_pickle, download=download) for r in refs]
    known = [e for e in experts if e.tensors]
    if len(known) >= 2:
        check_compatible(known)
    if len(known) < len(experts):
        if not known:
            raise ExpertError("--dry-run: no expert's tensors can be known without downloading its weights "
                              "(pickled weights, or no safetensors headers from the Hub); run without --dry-run")
        # Pickled weights have no header to read remotely: plan with the tensors
        # of a compatible expert; the run checks the real ones after the download.
        experts = [e if e.tensors else replace(e, tensors={
            n: TensorInfo(str(e.path / "pytorch_model.bin"), t.dtype, t.shape) for n, t in known[0].tensors.items()
        }) for e in experts]
    return experts


def _patterns_for(files: Dict[str, Optional[int]], label: str, *, allow_pickle: bool) -> Tuple[List[str], bool]:
    """The allow-patterns to download from a repo holding ``files``; (patterns, pickled)."""
    names = list(files)
    if any(n.endswith(".safetensors") and not n.rsplit("/", 1)[-1].startswith("adapter_") for n in names):
        return ALLOW_PATTERNS, False
    bins = sorted(n for n in names if fnmatch.fnmatch(n, "pytorch_model*.bin"))
    if bins:
        if allow_pickle:
            return PICKLE_PATTERNS, True
        raise ExpertError(
            f"{label} has only pickled weights ({bins[0]}), which can run code when loaded; convert the repo "
            "to safetensors, or set `allow_pickle: true` in the recipe to accept them"
        )
    if "adapter_config.json" in names:
        raise ExpertError(f"{label} is a PEFT adapter, not a full model; merge it into its base model and upload that")
    raise ExpertError(f"{label} has no *.safetensors weights (files: {', '.join(sorted(names)[:6]) or 'none'}); "
                      "point at a repo with a saved transformers model")


def _planned(ref: ExpertRef, snapshot, pickled: bool, size: int, *, cache_dir: Optional[str], what: str) -> Expert:
    """A Hub expert for the plan: its small files, and its tensors from the safetensors headers."""
    from swarm_merge import hub

    # Pinned to the resolved commit, so the config and headers describe what a run would pull.
    path, _ = hub.download(ref, cache_dir=cache_dir, allow_patterns=SMALL_PATTERNS, what=what, revision=snapshot.commit)
    config = _read_config(path, f"{str(ref)!r}")
    tensors: Dict[str, TensorInfo] = {}
    headers = None if pickled else hub.safetensors_headers(ref, snapshot.commit)
    if headers is None and not pickled:
        LOG.warning("%s %s: the Hub did not serve its safetensors headers; its tensors are checked after the download",
                    what, ref)
    for file_name, entries in (headers or {}).items():
        if file_name.rsplit("/", 1)[-1].startswith("adapter_"):
            continue
        for name, (dtype, shape) in entries.items():
            tensors[name] = TensorInfo(str(path / file_name), dtype, shape)
    return Expert(ref=ref, path=path, revision=snapshot.commit, config=config, tensors=tensors,
                  download_bytes=size, pickled=pickled)


# -------------------------------------------------------------- pickled weights


def _as_safetensors(path: Path, label: str, *, allow_pickle: bool, key: Optional[str] = None,
                    convert: bool = True) -> Tuple[Path, bool]:
    """``path`` itself if it holds safetensors; with ``allow_pickle``, a converted
    copy of its pickled weights; (folder, pickled)."""
    if not path.is_dir() or _weight_files(path) or not allow_pickle:
        return path, False
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise ExpertError(f"expert {label}: {index.name} is not a valid shard index; re-download it") from None
    elif (path / "pytorch_model.bin").is_file():
        shards = ["pytorch_model.bin"]
    else:
        return path, False  # nothing to convert: index_folder says what is missing
    if not convert:
        return path, True
    if key is None:  # a local folder: its path and the shards' sizes and times
        stats = [f"{s}:{(path / s).stat().st_size}:{(path / s).stat().st_mtime_ns}" for s in shards]
        key = f"{path.resolve()}|{'|'.join(stats)}"
    from huggingface_hub import constants

    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    dest = Path(constants.HF_HOME) / "swarm_merge" / "safetensors" / f"{path.name[:40]}-{digest}"
    if not (dest / "config.json").is_file() or not _weight_files(dest):
        LOG.warning("expert %s: converting pickled %s to safetensors in %s (allow_pickle)", label, shards[0], dest)
        _convert_pickled(path, shards, dest, label)
    return dest, True


def _convert_pickled(src: Path, shards: List[str], dest: Path, label: str) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: Dict[str, str] = {}
    for shard in shards:
        try:
            # weights_only: torch's restricted unpickler, which refuses anything
            # but tensors and plain containers, so a malicious pickle cannot run.
            state = torch.load(src / shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExpertError(
                f"expert {label}: {shard} cannot be read with torch's weights-only loader ({type(exc).__name__}); "
                "it may hold more than tensors: use a safetensors copy of the model"
            ) from None
        out_name = ("model.safetensors" if len(shards) == 1
                    else shard.replace("pytorch_model", "model")[: -len(".bin")] + ".safetensors")
        tensors: Dict[str, "torch.Tensor"] = {}
        storages = set()
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            ptr = tensor.untyped_storage().data_ptr()
            # safetensors refuses tensors sharing memory (tied weights): copy the second.
            tensors[name] = tensor.contiguous() if ptr not in storages else tensor.clone().contiguous()
            storages.add(ptr)
            weight_map[name] = out_name
        save_file(tensors, str(tmp / out_name), metadata={"format": "pt"})
        del state, tensors
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".bin") and f.name != "pytorch_model.bin.index.json":
            shutil.copy2(f, tmp / f.name)  # follows the Hub cache's symlinks
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


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

