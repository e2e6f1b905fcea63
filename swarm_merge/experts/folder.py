"""What an expert folder holds, read without running anything it names.

Its config (remote code refused), its weight files and their safetensors
headers (names, dtypes, shapes), a PEFT LoRA adapter's factors, and whether
experts can be merged: compatibility is decided from config.json and the
headers alone, before any weight is read (same architecture, same tensor
names, same shapes). Pulling them (Hub or local) is :mod:`.pull`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from safetensors import safe_open

from swarm_merge.errors import ExpertError, ExpertMismatchError
from swarm_merge.recipe import ExpertRef

__all__ = ["TensorInfo", "Expert", "index_folder", "check_compatible", "AdapterInfo", "ADAPTER_CONFIG",
           "ADAPTER_WEIGHTS", "is_adapter_folder", "is_adapter_listing", "read_adapter_config", "index_adapter",
           "read_json", "read_config", "read_index", "read_headers", "weight_files", "weight_names",
           "collect_tensors", "check_weights", "human_bytes"]

LOG = logging.getLogger(__name__)

# What a merge needs from a repo: configs, tokenizer, the card (for its
# license), and the weights as safetensors. Pickled *.bin weights can run code
# when unpickled: fetched only for a recipe with `allow_pickle: true` and a repo
# that has no safetensors. Never *.py: remote code is never run.
SMALL_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
# Only for a cached snapshot of unknown content; a pull names its weight files
# exactly (see weight_names): many repos hold stray *.safetensors beside the shards.
ALLOW_PATTERNS = ["*.safetensors"] + SMALL_PATTERNS
PICKLE_PATTERNS = ["pytorch_model*.bin"] + SMALL_PATTERNS
# transformers' names: a sharded checkpoint's index, and an unsharded checkpoint.
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

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
    # A PEFT LoRA adapter (tensors: its A and B factors; config: adapter_config.json).
    adapter: Optional["AdapterInfo"] = field(default=None, repr=False)

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


# ---------------------------------------------------------------- LoRA adapters (PEFT folders)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's saved key of a LoRA factor: base_model.model.<module>.lora_A.weight
# (older saves may keep the adapter name: ...lora_A.default.weight).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter is, from its config and its tensors' headers."""

    r: int
    alpha: float
    rslora: bool
    base: Optional[str]  # base_model_name_or_path, as the adapter names it
    modules: Dict[str, Tuple[str, str]]  # module path -> (A key, B key) in the adapter's file
    fan_in_fan_out: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def target_names(self) -> List[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})


def is_adapter_listing(names) -> bool:
    """A folder or repo listing that is a PEFT adapter: adapter files, no full-model weights."""
    names = set(names)
    full = "config.json" in names and any(n.endswith(".safetensors") and not n.startswith("adapter_") for n in names)
    return ADAPTER_CONFIG in names and not full


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and is_adapter_listing(p.name for p in path.iterdir())


def read_adapter_config(path: Path, label: str) -> dict:
    config = read_json(path / ADAPTER_CONFIG, label)
    if not isinstance(config, dict):
        raise ExpertError(f"expert {label}: {ADAPTER_CONFIG} holds a JSON {type(config).__name__}, not an object; "
                          "re-save the adapter with save_pretrained")
    return config


def index_adapter(path: Path, config: dict, label: str):  # noqa: C901 (one guard per line: each refuses one hostile field)
    """The adapter's tensors (name -> TensorInfo) and its :class:`AdapterInfo`, from the config and
    the safetensors header; refuses what this tool cannot combine exactly (one line, exit 2)."""
    def refuse(what: str, fix: str) -> ExpertError:
        return ExpertError(f"expert {label}: {what}; {fix}")

    kind = config.get("peft_type")
    if kind != "LORA":
        raise refuse(f"is a {kind or 'PEFT'} adapter, not LoRA", "swarm_merge combines LoRA adapters only")
    if config.get("use_dora"):
        raise refuse("is a DoRA adapter (use_dora: true), whose magnitude vector does not combine linearly",
                     "use plain LoRA adapters")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise refuse(f"sets {key} (per-module ranks or alphas)", "use adapters with one r and lora_alpha")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise refuse(f"trains biases (bias: {config.get('bias')})", "use adapters trained with bias: none")
    if config.get("modules_to_save"):
        raise refuse(f"saves full copies of {config['modules_to_save']} (modules_to_save)",
                     "use adapters without modules_to_save")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if (not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float))
            or isinstance(alpha, bool)):
        raise refuse(f"{ADAPTER_CONFIG} has r={r!r}, lora_alpha={alpha!r}", "re-save the adapter with PEFT")
    if not math.isfinite(alpha) or alpha <= 0:  # 0 switches the adapter off; NaN/inf poison every merge
        raise refuse(f"{ADAPTER_CONFIG} has lora_alpha={alpha!r}", "set a positive, finite lora_alpha "
                     "(PEFT's default is 8)")
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        hint = " (pickled adapter_model.bin: convert it to safetensors)" if (path / "adapter_model.bin").is_file() else ""
        raise refuse(f"no {ADAPTER_WEIGHTS} in {str(path)!r}{hint}", "save the adapter with safe_serialization")
    tensors: Dict[str, TensorInfo] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                tensors[key] = TensorInfo(str(file.resolve()), sl.get_dtype(), tuple(sl.get_shape()))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise refuse(f"cannot read {ADAPTER_WEIGHTS} ({exc})", "re-download or re-save it") from None
    found: Dict[str, Dict[str, str]] = {}
    for key, info in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise refuse(f"holds tensor {key!r}, which is not a LoRA A or B factor", "use plain LoRA adapters")
        if len(info.shape) != 2 or info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise refuse(f"tensor {key!r} is {info.dtype} {list(info.shape)}, not a 2-D float LoRA factor "
                         "(LoRA on linear layers only)", "use LoRA adapters on linear layers")
        found.setdefault(m["module"], {})[m["which"]] = key
    modules: Dict[str, Tuple[str, str]] = {}
    for module, pair in sorted(found.items()):
        if set(pair) != {"A", "B"}:
            raise refuse(f"module {module!r} has lora_{'A' if 'A' in pair else 'B'} but not its partner",
                         "re-save the adapter")
        a, b = tensors[pair["A"]].shape, tensors[pair["B"]].shape
        if a[0] != r or b[1] != r:
            raise refuse(f"module {module!r} has rank {a[0]}/{b[1]} but r is {r}", "re-save the adapter")
        modules[module] = (pair["A"], pair["B"])
    if not modules:
        raise refuse(f"{ADAPTER_WEIGHTS} holds no LoRA factors", "re-save the adapter")
    base = config.get("base_model_name_or_path")
    info = AdapterInfo(r=r, alpha=float(alpha), rslora=bool(config.get("use_rslora")),
                       base=base if isinstance(base, str) and base else None, modules=modules,
                       fan_in_fan_out=bool(config.get("fan_in_fan_out")))
    return tensors, info


def read_config(path: Path, label: str) -> dict:
    """config.json as a dict, refused unless transformers can build the model without remote code."""
    if not path.is_dir():
        raise ExpertError(f"expert {label}: folder {str(path)!r} not found; check the path in the recipe")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExpertError(f"expert {label}: no config.json in {str(path)!r}; point at a saved transformers model folder")
    config = read_json(config_file, label)
    if not isinstance(config, dict):
        raise ExpertError(f"expert {label}: {config_file} holds a JSON {type(config).__name__}, not an object; "
                          "re-save the model with save_pretrained")
    _refuse_remote_code(config, label)
    archs = config.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)):
        # mergekit picks its tensor layout from this one class name, and fails without it only when it
        # writes the merge: after the whole search.
        what = "names no architecture" if not archs else f"names {archs!r} as its architectures"
        raise ExpertError(f"expert {label}: {config_file} {what}, and mergekit needs exactly one to write the merge; "
                          'set "architectures" to the model\'s class, e.g. ["LlamaForCausalLM"]')
    return config


def read_json(file: Path, label: str):
    """A JSON file read as transformers reads it (UTF-8), or an ExpertError naming it."""
    try:
        # Decoded explicitly: json.loads(bytes) would also accept UTF-16/32,
        # which transformers (open(..., encoding="utf-8")) then fails to read.
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ExpertError(f"expert {label}: {file} is not UTF-8 text (byte {exc.start}); "
                          "re-save it as UTF-8 JSON (save_pretrained does)") from None
    except json.JSONDecodeError as exc:
        raise ExpertError(f"expert {label}: {file} is not valid JSON ({exc}); re-download or re-save the model") from None
    except (ValueError, RecursionError) as exc:  # an integer too long to convert, nesting too deep
        raise ExpertError(f"expert {label}: {file} holds an unreadable JSON value ({str(exc)[:80]}); "
                          "re-download or re-save the model") from None
    except OSError as exc:
        raise ExpertError(f"expert {label}: cannot read {file} ({exc.strerror or type(exc).__name__}); "
                          "check the file's permissions") from None


def _refuse_remote_code(config: dict, label: str) -> None:
    """Refuse an architecture transformers would only build with trust_remote_code.

    Mirrors transformers' own choice: a model_type it has a causal-LM class for
    is built from that class even when ``auto_map`` names remote code (code is
    only run with trust_remote_code=True, which swarm_merge never passes), so
    such an expert is fine; any other model_type would need the repo's code.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    version = f"transformers {transformers.__version__}"
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    auto_map = config.get("auto_map")
    if not model_type and not auto_map:
        raise ExpertError(f"expert {label}: config.json has no model_type, so transformers cannot tell its "
                          "architecture; re-save the model with save_pretrained")
    if auto_map or not known:
        if not model_type:
            what = "config.json has no model_type"
        elif not known:
            what = f"model_type {model_type!r} is unknown to {version}"
        else:
            what = f"model_type {model_type!r} has no causal-LM class in {version}"
        if auto_map:
            what += " and its auto_map points at the repo's own code"
        upgrade = f", or upgrade transformers if {model_type!r} is newer than it" if model_type and not known else ""
        raise ExpertError(f"expert {label}: {what}, so it needs remote code (trust_remote_code), which swarm_merge "
                          f"never runs; use an expert of an architecture transformers supports{upgrade}")
    raise ExpertError(f"expert {label}: model_type {model_type!r} has no causal language model class in {version}; "
                      "merge causal LMs (AutoModelForCausalLM)")


def read_index(path: Path, label: str) -> Dict[str, str]:
    """The weight_map of ``path``'s model.safetensors.index.json: tensor name -> shard file name."""
    index = read_json(path / INDEX_FILE, label)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ExpertError(f"expert {label}: {path / INDEX_FILE} has no weight_map of tensor names to shard files; "
                          "re-download or re-save the model")
    for shard in set(weight_map.values()):
        # Shards sit beside the index (as transformers saves them); a path
        # elsewhere would read, or download, files that are not this model's.
        if shard != Path(shard).name or "\\" in shard or not shard.endswith(".safetensors") or shard.startswith("."):
            raise ExpertError(f"expert {label}: {path / INDEX_FILE} names shard {shard!r}, which is not a "
                              "*.safetensors file beside the index; fix the index or re-save the model")
    return weight_map


def _is_weight_name(name: str) -> bool:
    """A top-level *.safetensors file that is not a PEFT adapter."""
    return "/" not in name and name.endswith(".safetensors") and not name.startswith("adapter_")


def weight_names(names, label: str, load_index) -> Tuple[List[str], Optional[Dict[str, str]]]:
    """Which of a model's files hold its weights; (shard file names, weight_map or None).

    The same rule for a folder and a Hub repo's listing, as mergekit (which
    writes the merge) reads a folder: the shards ``model.safetensors.index.json``
    names when there is one (``load_index()`` returns its weight_map), else
    ``model.safetensors``, else every top-level non-adapter ``*.safetensors``.
    Repos often ship a ``consolidated.safetensors`` holding the same tensors:
    counting it too would double the download, the parameters and the memory.
    """
    names = set(names)
    if INDEX_FILE in names:
        weight_map = load_index()
        return sorted(set(weight_map.values())), weight_map
    if SINGLE_FILE in names:
        return [SINGLE_FILE], None
    return sorted(n for n in names if _is_weight_name(n)), None


def weight_files(path: Path) -> List[Path]:
    """The weight files of a local folder that are there (see weight_names)."""
    names, _ = weight_names((p.name for p in path.iterdir()), "", lambda: read_index(path, repr(str(path))))
    return [path / n for n in names if (path / n).is_file()]


def index_folder(path: Path, label: str, *, who: Optional[str] = None) -> Tuple[dict, Dict[str, TensorInfo]]:
    """Read config.json and the safetensors headers of a model folder's weight files (see weight_names),
    and check them against the architecture (:func:`check_weights`; ``who`` names the model there,
    default ``expert <label>``)."""
    config = read_config(path, label)
    tensors = read_headers(path, label)
    check_weights(path, tensors, who or f"expert {label}")
    return config, tensors


def read_headers(path: Path, label: str) -> Dict[str, TensorInfo]:
    """The tensors of a model folder's weight files (see weight_names), from their safetensors headers."""
    shard_names, weight_map = weight_names((p.name for p in path.iterdir()), label, lambda: read_index(path, label))
    if not shard_names:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = (f" (found pickled {bins[0]}: set `allow_pickle: true` in the recipe to convert it, "
                "or convert it to safetensors yourself)") if bins else ""
        raise ExpertError(f"expert {label}: no *.safetensors weights in {str(path)!r}{hint}; save the model with safe_serialization")
    missing = [n for n in shard_names if not (path / n).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExpertError(f"expert {label}: {INDEX_FILE} names shard {missing[0]!r}{more}, which is not in "
                          f"{str(path)!r}; download every shard the index names, or re-save the model")
    found: Dict[str, Dict[str, TensorInfo]] = {}
    for name in shard_names:
        shard = path / name
        found[name] = {}
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[name][key] = TensorInfo(str(shard.resolve()), sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ExpertError(f"expert {label}: cannot read {shard.name} ({exc}); re-download or re-save it") from None
    for shard_tensors in found.values():
        for key, info in shard_tensors.items():
            if info.dtype not in _DTYPE_BYTES:
                raise ExpertError(f"expert {label}: tensor {key!r} is stored as {info.dtype}, which swarm_merge "
                                  f"cannot merge; use experts saved in {', '.join(_DTYPE_BYTES)}")
    return collect_tensors(found, weight_map, label, where=str(path))


def collect_tensors(found: Dict[str, Dict[str, TensorInfo]], weight_map: Optional[Dict[str, str]], label: str,
             *, where: str) -> Dict[str, TensorInfo]:
    """The model's tensors from its shards' headers: exactly the index's, when there is an index."""
    if weight_map is None:
        return {name: info for shard in found.values() for name, info in shard.items()}
    tensors: Dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        info = found[shard].get(name)
        if info is None:
            raise ExpertError(f"expert {label}: {INDEX_FILE} puts tensor {name!r} in {shard}, which does not hold it "
                              f"(in {where}); re-download the model, or fix its index")
        tensors[name] = info
    # Tensors a shard holds beyond the index are left out: mergekit, which
    # writes the merge, reads only the weight_map's.
    return tensors


def check_weights(path: Path, tensors: Dict[str, TensorInfo], who: str, *, task: str = "causal-lm") -> None:
    """Refuse a checkpoint that lacks a tensor its architecture needs, or holds one of another shape.

    transformers fills a missing tensor with random values and only logs it (the
    CLI silences that log), so the run would go on with a model that differs from
    one run to the next. What the architecture needs is what transformers loads:
    the state_dict of the model class for ``path``'s config.json, built on the meta
    device (no memory; non-persistent buffers are not in it), less the tied
    parameters one of whose group is stored (transformers ties them to it) and the
    keys the class ignores when missing. A tensor stored under a name transformers
    renames or converts when it loads (a legacy name, no ``model.`` prefix, GPT-NeoX's
    ``embed_out``, per-expert MoE tensors it fuses) is there: it is loaded, not made up.
    Headers and config only, so a dry run checks it too. Extra tensors are left alone
    (mergekit and transformers skip them).

    Args:
        who: the model for the message, e.g. ``expert './a'``.
        task: ``causal-lm`` (experts, bases, judges) or ``sequence-classification`` (reward models).

    Raises:
        ExpertError: one line naming the model, the tensor and the fix.
    """
    built = _meta_model(Path(path), task)
    if built is None:
        return  # transformers cannot build it from this config: its own load fails loudly
    model, needed, tied, ignore = built
    arch = type(model).__name__
    stored = set(tensors)
    present = stored & set(needed)
    for name in (n for n in needed if n in present):
        if tuple(tensors[name].shape) != needed[name]:
            raise ExpertError(f"{who}: tensor {name!r} is {list(tensors[name].shape)} but {arch}, built from its "
                              f"config.json, needs {list(needed[name])}; the weights and config.json do not belong "
                              "together: use the config.json the weights were saved with")
    present |= {t for targets in _renamed(model, needed, stored).values() for t in targets if t in needed}
    covered = set(present)
    for group in tied:
        if group & present:
            covered |= group
    missing = [n for n in needed if n not in covered and not (ignore is not None and ignore.search(n))]
    if not missing:
        return
    name = missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    untied = (head is not None and name == next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
              and not getattr(model.config, "tie_word_embeddings", True))
    hint = (", or set tie_word_embeddings: true in config.json if its head is meant to share the input embeddings"
            if untied else "")
    raise ExpertError(f"{who}: lacks tensor {name!r}{more}, which {arch} (built from its config.json) needs: "
                      "transformers would fill it with random values, another model on every run; use the complete "
                      f"checkpoint (every shard, saved with save_pretrained){hint}")


# config.json digest and task -> (meta model, needed {name: shape}, tied groups, ignored-when-missing regex)
_META_MODELS: Dict[Tuple[str, str], tuple] = {}


def _meta_model(path: Path, task: str):
    """The model class for ``path``'s config.json built on the meta device, and what it loads;
    None when transformers cannot build it (its own load then fails, loudly)."""
    key = (hashlib.sha256((path / "config.json").read_bytes()).hexdigest(), task)
    if key not in _META_MODELS:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
            with init_empty_weights():  # parameters on meta: no memory, whatever the model size
                model = auto.from_config(config)
        except Exception as exc:
            LOG.debug("no meta model for %s: %s", path, exc)
            return None
        # Persistent parameters and buffers, tied ones under every name (as a checkpoint may store either).
        needed = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        groups: Dict[str, set] = {}
        for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            groups.setdefault(source, {source}).add(target)
        patterns = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
        ignore = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
        if len(_META_MODELS) >= 8:
            _META_MODELS.clear()
        _META_MODELS[key] = (model, needed, list(groups.values()), ignore)
    return _META_MODELS[key]


def _renamed(model, needed: Dict[str, tuple], stored) -> Dict[str, List[str]]:
    """Stored name -> the model names transformers loads it into (its renames, base-model prefix
    and conversions, as ``from_pretrained`` applies them); {} where this transformers lacks that API."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter, WeightRenaming, dot_natural_key, rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        found: Dict[str, List[str]] = {}
        for key in sorted(stored, key=dot_natural_key):  # transformers' order: some renames depend on it
            new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, needed)
            if new not in needed and key in needed:
                new, pattern = key, None
            if pattern is None:
                found[key] = [new]
            else:  # a conversion (e.g. a fused tensor split in several) names every target it fills
                targets = by_pattern[pattern].target_patterns
                found[key] = [new.replace(targets[0], t) for t in targets]
        return found
    except Exception as exc:  # internal API of transformers 5: without it, names count as stored
        LOG.debug("transformers' weight renames unavailable: %s", exc)
        return {}


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

