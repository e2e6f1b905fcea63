"""Pull an expert from a Hub repo or a local folder, and index it (:mod:`.folder`).

A Hub repo is resolved first (commit, file list), its small files checked, then
only the weight files it is indexed from are downloaded (:mod:`.hub` makes every
call). Pickled weights are converted to safetensors only under ``allow_pickle``.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from swarm_merge.errors import ExpertError, ExpertMismatchError, HubError
from swarm_merge.experts import hub
from swarm_merge.experts.folder import (ADAPTER_WEIGHTS, ALLOW_PATTERNS, INDEX_FILE, PICKLE_PATTERNS, SINGLE_FILE,
                                        SMALL_PATTERNS, Expert, TensorInfo, check_compatible, check_weights,
                                        collect_tensors, human_bytes, index_adapter, index_folder, is_adapter_folder,
                                        is_adapter_listing, read_adapter_config, read_config, read_index,
                                        weight_files, weight_names)
from swarm_merge.recipe import ExpertRef

__all__ = ["pull_expert", "pull_experts", "pull_model_files"]

LOG = logging.getLogger(__name__)


def pull_expert(ref: ExpertRef, *, cache_dir: Optional[str] = None, what: str = "expert",
                allow_pickle: bool = False, download: bool = True) -> Expert:
    """Make one expert available locally and index it.

    A Hub repo is first resolved to a commit and its file list, and its small
    files (configs, tokenizer, card, shard index) are downloaded, so a repo
    without safetensors or with a config swarm_merge refuses fails before any
    weight moves; then only the weight files the expert is indexed from (see
    :func:`weight_names`) are downloaded. When the Hub cannot be reached, a
    complete snapshot already in the cache is used.

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
        if is_adapter_folder(path):
            return _adapter(ref, path, label, revision=None)
        path, pickled = _as_safetensors(path, label, allow_pickle=allow_pickle, convert=download)
        if pickled and not download:
            return Expert(ref=ref, path=path, revision=None, config=read_config(path, label), tensors={}, pickled=True)
        config, tensors = index_folder(path, label, who=f"{what} {label}")
        return Expert(ref=ref, path=path, revision=None, config=config, tensors=tensors, pickled=pickled)
    label = f"{str(ref)!r}"
    try:
        snapshot = hub.resolve(ref, what=what)
    except hub.HubUnreachable as exc:
        found = _cached(ref, label, cache_dir=cache_dir, allow_pickle=allow_pickle)
        if found is None:
            raise hub.unreachable_error(ref, exc.reason, what=what) from None
        path, revision = found
        LOG.warning("%s %s: %s; using the cached snapshot %s", what, ref, exc.reason, revision)
        if is_adapter_folder(path):
            return _adapter(ref, path, label, revision=revision)
        path, pickled = _as_safetensors(path, label, allow_pickle=allow_pickle, key=f"{ref.model}@{revision}")
        config, tensors = index_folder(path, label, who=f"{what} {label}")
        return Expert(ref=ref, path=path, revision=revision, config=config, tensors=tensors, pickled=pickled)

    if is_adapter_listing(snapshot.files):
        # An adapter is a few MB: its small files and its factors, dry run or not.
        patterns = SMALL_PATTERNS + [ADAPTER_WEIGHTS]
        size = sum(n or 0 for f, n in snapshot.files.items() if any(fnmatch.fnmatch(f, p) for p in patterns))
        LOG.info("pulling %s %s (LoRA adapter) at %s (%s)", what, ref.model, snapshot.commit[:12], human_bytes(size))
        path, revision = hub.download(ref, cache_dir=cache_dir, allow_patterns=patterns, what=what)
        return replace(_adapter(ref, path, label, revision=revision), download_bytes=size)

    small: List[Path] = []

    def small_files() -> Path:
        """The repo's small files at the resolved commit (configs, tokenizer, card, shard index), once."""
        if not small:
            small.append(hub.download(ref, cache_dir=cache_dir, allow_patterns=SMALL_PATTERNS, what=what,
                                      revision=snapshot.commit)[0])
        return small[0]

    shards, weight_map, pickled = _hub_weights(snapshot, f"{what} {label}", allow_pickle=allow_pickle,
                                               load_index=lambda: read_index(small_files(), label))
    # The config is checked (remote code, JSON) before any weight moves.
    config = read_config(small_files(), label)
    # Exact names, escaped: allow_patterns are fnmatch patterns, and a name may hold [ or *.
    patterns = PICKLE_PATTERNS if pickled else SMALL_PATTERNS + [glob.escape(n) for n in shards]
    size = sum(n or 0 for f, n in snapshot.files.items() if any(fnmatch.fnmatch(f, p) for p in patterns))
    if not download:
        return _planned(ref, snapshot, small_files(), config, shards, weight_map, pickled, size, what=what)
    LOG.info("pulling %s %s at %s (%s)", what, ref.model, snapshot.commit[:12], human_bytes(size))
    # At the ref itself (not the commit), so the cache maps the ref to its commit for offline runs.
    path, revision = hub.download(ref, cache_dir=cache_dir, allow_patterns=patterns, what=what)
    if revision != snapshot.commit:  # the shard list came from the resolved commit
        raise HubError(f"{what} {label}: {ref.revision or 'main'} moved from {snapshot.commit[:12]} to "
                       f"{revision[:12]} during the pull; run again")
    path, pickled = _as_safetensors(path, label, allow_pickle=allow_pickle, key=f"{ref.model}@{revision}")
    config, tensors = index_folder(path, label, who=f"{what} {label}")
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
    adapters = [e for e in experts if e.adapter is not None]
    if adapters:
        full = next((e for e in experts if e.adapter is None), None)
        if full is not None:
            raise ExpertMismatchError(
                f"expert {full.describe()} is a full model but {adapters[0].describe()} is a LoRA adapter; list "
                "only adapters (their base is base_model) or only full models")
        return experts  # checked against their base by lora.AdapterBank
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


def _adapter(ref: ExpertRef, path: Path, label: str, *, revision: Optional[str]) -> Expert:
    config = read_adapter_config(path, label)
    tensors, info = index_adapter(path, config, label)
    return Expert(ref=ref, path=path, revision=revision, config=config, tensors=tensors, adapter=info)


def _hub_weights(snapshot, label: str, *, allow_pickle: bool, load_index
                 ) -> Tuple[List[str], Optional[Dict[str, str]], bool]:
    """The weight files to pull from a repo, from its listing: (shard names, weight_map or None, pickled).

    ``load_index()`` returns the weight_map of the repo's shard index; it is
    only called when the repo has one.
    """
    files = snapshot.files
    shards, weight_map = weight_names(files, label, load_index)
    if shards:
        missing = [s for s in shards if s not in files]
        if missing:
            raise ExpertError(f"{label}: {INDEX_FILE} names shard {missing[0]!r}, which the repo does not have at "
                              f"{snapshot.commit[:12]}; pin a revision whose shards are all there, or use a local folder")
        return shards, weight_map, False
    names = list(files)
    bins = sorted(n for n in names if fnmatch.fnmatch(n, "pytorch_model*.bin"))
    if bins:
        if allow_pickle:
            return [], None, True
        raise ExpertError(
            f"{label} has only pickled weights ({bins[0]}), which can run code when loaded; convert the repo "
            "to safetensors, or set `allow_pickle: true` in the recipe to accept them"
        )
    raise ExpertError(f"{label} has no *.safetensors weights (files: {', '.join(sorted(names)[:6]) or 'none'}); "
                      "point at a repo with a saved transformers model")


def _cached(ref: ExpertRef, label: str, *, cache_dir: Optional[str], allow_pickle: bool) -> Optional[Tuple[Path, str]]:
    """A complete snapshot of ``ref`` in the local cache (small files and the weight files a pull takes), or None."""
    found = hub.cached(ref, cache_dir=cache_dir, allow_patterns=SMALL_PATTERNS)
    if found is None:
        return None
    path = found[0]
    names = {p.name for p in path.iterdir()}
    if is_adapter_listing(names):
        if ADAPTER_WEIGHTS not in names:
            return None
        return hub.cached(ref, cache_dir=cache_dir, allow_patterns=SMALL_PATTERNS + [ADAPTER_WEIGHTS])
    shards, _ = weight_names(names, label, lambda: read_index(path, label))
    ignore = None
    if INDEX_FILE in names or SINGLE_FILE in names:  # the weight files are known by name
        if not all((path / s).is_file() for s in shards):
            return None  # e.g. a dry run's cache: the index, not the shards
        patterns = SMALL_PATTERNS + [glob.escape(s) for s in shards]
    elif shards:  # every top-level non-adapter *.safetensors, as a pull takes them
        patterns, ignore = ALLOW_PATTERNS, ["*/*.safetensors", "adapter_*.safetensors"]
    elif allow_pickle and any(path.glob("pytorch_model*.bin")):
        patterns = PICKLE_PATTERNS
    else:
        return None
    # huggingface_hub checks these against the repo listing it cached at the pull.
    return hub.cached(ref, cache_dir=cache_dir, allow_patterns=patterns, ignore_patterns=ignore)


def _planned(ref: ExpertRef, snapshot, path: Path, config: dict, shards: List[str],  # noqa: PLR0913 (the pull's findings)
             weight_map: Optional[Dict[str, str]], pickled: bool, size: int, *, what: str) -> Expert:
    """A Hub expert for the plan: its small files (``path``, at the resolved commit, so the config
    and headers describe what a run would pull), and its tensors from the shards' safetensors headers."""
    tensors: Dict[str, TensorInfo] = {}
    headers = None if pickled else hub.safetensors_headers(ref, snapshot.commit, files=shards)
    if headers is None and not pickled:
        LOG.warning("%s %s: the Hub did not serve its safetensors headers; its tensors are checked after the download",
                    what, ref)
    if headers is not None:
        found = {name: {t: TensorInfo(str(path / name), dtype, shape) for t, (dtype, shape) in entries.items()}
                 for name, entries in headers.items()}
        tensors = collect_tensors(found, weight_map, f"{str(ref)!r}", where=f"{ref.model}@{snapshot.commit[:12]}")
        check_weights(path, tensors, f"{what} {str(ref)!r}")
    return Expert(ref=ref, path=path, revision=snapshot.commit, config=config, tensors=tensors,
                  download_bytes=size, pickled=pickled)


# -------------------------------------------------------------- pickled weights


def _as_safetensors(path: Path, label: str, *, allow_pickle: bool, key: Optional[str] = None,
                    convert: bool = True) -> Tuple[Path, bool]:
    """``path`` itself if it holds safetensors; with ``allow_pickle``, a converted
    copy of its pickled weights; (folder, pickled)."""
    if not path.is_dir() or weight_files(path) or not allow_pickle:
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
    if not (dest / "config.json").is_file() or not weight_files(dest):
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


def pull_model_files(ref: ExpertRef, *, cache_dir: Optional[str], what: str,
                     patterns: Sequence[str] = SMALL_PATTERNS) -> Tuple[Path, Optional[str]]:
    """A model that is not an expert (the base's config and tokenizer, a reward or judge model):
    a local folder as it is, or a Hub repo's ``patterns`` downloaded; (folder, commit or None).
    Either way the folder must hold a config.json. Reading and checking its weights is the caller's."""
    if ref.is_local:
        path, commit = Path(ref.model).expanduser(), None
    else:
        path, commit = hub.download(ref, cache_dir=cache_dir, allow_patterns=list(patterns), what=what)
    if not (path / "config.json").is_file():
        raise ExpertError(f"{what} {ref.model!r}: no config.json there; point at a saved transformers model folder")
    return path, commit
