"""Evaluate a particle: build its weights from the experts' tensors, then score.

A particle is a coefficient array ``a`` of shape ``(groups, K)``; the weights of
tensor ``t`` in group ``g`` are ``sum_k a[g, k] * E_k[t]``. No merged model is
ever written to disk, and the model skeleton is built once and reused.

Two modes, one arithmetic (:func:`combine`), so they score identically:
- in-memory (:class:`InMemoryEvaluator`) holds the K experts' tensors and
  rebuilds every weight of one skeleton in place before each evaluation;
- streaming (:class:`StreamingEvaluator`) keeps the skeleton on the meta
  device; accelerate's offload hooks build each module's weights from the
  experts' files right before its forward and free them right after, so memory
  stays about one module's worth whatever the model size.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import re
import struct
import warnings
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from swarm_merge.errors import EvaluationError
from swarm_merge.experts import Expert
from swarm_merge.objectives import Example, Score, score

__all__ = [
    "tensor_groups",
    "combine",
    "Evaluator",
    "InMemoryEvaluator",
    "StreamingEvaluator",
    "LazyMergedWeights",
    "memory_estimate",
    "choose_mode",
    "make_evaluator",
    "resolve_device",
    "torch_dtype",
]

LOG = logging.getLogger(__name__)

# A numbered decoder layer in a tensor name: group 1 the prefix up to the
# number ("model.layers."), group 2 the number. Used for layer groups here and
# for mergekit's per-layer filters in merge.py.
LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.)(\d+)\.")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError("--device cuda asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def tensor_groups(
    names: Sequence[str], *, granularity: str, layer_groups: Optional[int] = None
) -> Tuple[Dict[str, int], List[str]]:
    """Map each tensor name to its coefficient group.

    ``model`` granularity: one group. ``layer``: contiguous blocks of decoder
    layers (``layer_groups`` of them, default one per layer); tensors outside the
    layers join the first group (embeddings) or the last (final norm, head).

    Returns:
        (group index of each tensor, a label per group)
    """
    if granularity == "model":
        return {n: 0 for n in names}, ["all tensors"]
    layer_of = {n: int(m.group(2)) for n in names if (m := LAYER.search(n))}
    if not layer_of:
        raise EvaluationError("granularity 'layer' needs numbered layers (model.layers.N.*); use granularity: model")
    num_layers = max(layer_of.values()) + 1
    n_groups = min(layer_groups or num_layers, num_layers)
    groups: Dict[str, int] = {}
    for name in names:
        if name in layer_of:
            groups[name] = layer_of[name] * n_groups // num_layers
        else:
            groups[name] = 0 if re.search(r"embed|wte|wpe", name) else n_groups - 1
    labels = []
    for g in range(n_groups):
        layers = [i for i in range(num_layers) if i * n_groups // num_layers == g]
        label = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        if g == 0:
            label = "embeddings + " + label
        if g == n_groups - 1:
            label += " + head"
        labels.append(label)
    return groups, labels


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# ------------------------------------------------------------ reading experts

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class TensorReader:
    """Reads single tensors out of safetensors files with ``os.preadv``.

    Written by hand because safetensors' ``safe_open`` memory-maps each file:
    every page it touches stays mapped into the process and counts in its RSS,
    so streaming K experts through it would end with all K resident. pread
    copies only the bytes of the tensor asked for (one copy, straight into the
    caller's buffer) and leaves caching to the OS page cache.
    """

    def __init__(self) -> None:
        self._files: Dict[str, Tuple[int, int, dict]] = {}  # path -> (fd, data start, header)

    def _open(self, path: str):
        if path not in self._files:
            fd = os.open(path, os.O_RDONLY)
            (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, size, 8))
            self._files[path] = (fd, 8 + size, header)
        return self._files[path]

    def read_into(self, path: str, name: str, out: torch.Tensor, *, start: int = 0) -> torch.Tensor:
        """Fill ``out`` (a CPU tensor of the stored dtype) with tensor ``name``'s
        flattened elements from ``start`` on (as many as ``out`` holds)."""
        fd, data, header = self._open(path)
        begin, end = header[name]["data_offsets"]
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        offset = begin + start * out.element_size()
        if offset + len(view) > end:
            raise EvaluationError(f"{path}: tensor {name} is {end - begin} bytes, shorter than asked; re-save the expert")
        done = 0
        while done < len(view):  # preadv may return short reads on large tensors
            n = os.preadv(fd, [view[done:]], data + offset + done)
            if n <= 0:
                raise EvaluationError(f"{path}: truncated while reading {name}; re-download the expert")
            done += n
        return out

    def stored_dtype(self, path: str, name: str) -> torch.dtype:
        return _ST_DTYPES[self._open(path)[2][name]["dtype"]]

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def read_stacked(reader: TensorReader, experts: Sequence[Expert], name: str, dtype: torch.dtype,
                 scratch: Optional[torch.Tensor] = None, span: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The K experts' tensor ``name`` as one ``(K, numel)`` tensor of ``dtype`` (CPU).

    With ``scratch`` (a flat buffer of at least K * numel elements of ``dtype``)
    the result is a view of it: no fresh allocation, hence no page faults.
    """
    infos = [e.tensors[name] for e in experts]
    stored = {reader.stored_dtype(i.file, name) for i in infos}
    start, stop = span or (0, infos[0].numel)
    numel = stop - start
    if scratch is not None:
        stacked = scratch[: len(infos) * numel].view(len(infos), numel)
    else:
        stacked = torch.empty((len(infos), numel), dtype=dtype)
    if stored == {dtype}:
        for k, info in enumerate(infos):
            reader.read_into(info.file, name, stacked[k], start=start)
        return stacked
    for k, info in enumerate(infos):
        raw = torch.empty(numel, dtype=reader.stored_dtype(info.file, name))
        stacked[k].copy_(reader.read_into(info.file, name, raw, start=start))
    return stacked


@torch.no_grad()
def combine(stacked: torch.Tensor, c: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_k c[k] * stacked[k]``, accumulated in float32, into ``out`` or a new tensor
    (never into ``stacked``, which may be a reused scratch buffer).

    Both evaluation modes build every weight with this one function, so they
    give bit-identical weights. Coefficients are float32: in a 16-bit dtype a
    coefficient like 0.3456 would round to 3 significant digits.
    """
    if stacked.dtype == torch.float32:
        # One (1, K) x (K, N) product: a single pass over the experts' memory.
        if out is not None and out.dtype == torch.float32:
            torch.matmul(c.unsqueeze(0), stacked, out=out.view(1, -1))
            return out
        result = torch.matmul(c.unsqueeze(0), stacked).view(-1)
    else:
        result = torch.zeros(stacked.shape[1], dtype=torch.float32, device=stacked.device)
        for k in range(stacked.shape[0]):
            result.add_(stacked[k], alpha=float(c[k]))
    if out is not None:
        return out.copy_(result)
    return result


def _coefficient_rows(coefficients: np.ndarray, device) -> List[torch.Tensor]:
    coefficients = np.asarray(coefficients, dtype=np.float64)
    return [torch.tensor(row, dtype=torch.float32, device=device) for row in coefficients]


# ----------------------------------------------------------------- evaluators


class Evaluator(abc.ABC):
    """Shared by both modes: a model whose weights follow ``build(coefficients)``."""

    mode = "?"
    # Rows per forward call; None keeps the recipe's objective.batch_size.
    batch_size: Optional[int] = None
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

    @abc.abstractmethod
    def build(self, coefficients: np.ndarray) -> None:
        """Make ``self.model`` compute with the particle ``coefficients`` (G, K)."""

    def evaluate(self, coefficients: np.ndarray, examples: Sequence[Example], objective) -> Score:
        """Build the particle and score it; a failure or NaN gives a NaN utility."""
        try:
            self.build(coefficients)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = score(self.model, self.tokenizer, examples, objective, self.device, batch_size=self.batch_size)
        except Exception as exc:  # the search goes on; the particle ranks worst
            LOG.warning("evaluation failed (%s: %s); the particle is scored worst", type(exc).__name__, exc)
            LOG.debug("evaluation traceback", exc_info=True)
            return Score(float("nan"), {}, len(examples))
        if not math.isfinite(result.utility):
            LOG.warning("utility is NaN (the merged weights may have blown up); the particle is scored worst")
            return Score(float("nan"), result.groups, result.n)
        return result


class InMemoryEvaluator(Evaluator):
    """Holds the K experts' tensors and rebuilds one reused skeleton per evaluation.

    Memory: K expert copies plus one model, in the recipe's dtype.

    Args:
        experts: the pulled, compatible experts.
        groups: tensor name -> coefficient group (see :func:`tensor_groups`).
        dtype: the skeleton's dtype (the recipe's ``dtype``).
        device: where the skeleton and the expert tensors live.
        tokenizer_path: folder to load the tokenizer from.
    """

    mode = "in-memory"

    def __init__(self, experts: Sequence[Expert], groups: Dict[str, int], *, dtype: str, device: torch.device, tokenizer_path=None):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.groups = groups
        self.dtype = torch_dtype(dtype)
        self.tokenizer = load_tokenizer(tokenizer_path or experts[0].path)
        # The skeleton: expert 0 loaded once; its weights are overwritten per particle.
        model = AutoModelForCausalLM.from_pretrained(str(experts[0].path), dtype=self.dtype)
        self.model = model.to(device).eval()
        self.targets: Dict[str, torch.Tensor] = {}
        seen = set()
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name not in experts[0].tensors:
                continue  # a tied copy the files do not store, or a buffer
            if tensor.data_ptr() in seen:
                continue  # tied weights share storage: write them once
            seen.add(tensor.data_ptr())
            self.targets[name] = tensor
        reader = TensorReader()
        try:
            self.stacked = {n: read_stacked(reader, experts, n, self.dtype).to(device) for n in self.targets}
        finally:
            reader.close()
        self.expert_bytes = sum(t.numel() * t.element_size() for t in self.stacked.values())

    @torch.no_grad()
    def build(self, coefficients: np.ndarray) -> None:
        """Write ``sum_k a[g, k] E_k`` into every weight of the skeleton, in place."""
        rows = _coefficient_rows(coefficients, self.device)
        for name, target in self.targets.items():
            combine(self.stacked[name], rows[self.groups[name]], out=target.data.view(-1))


class LazyMergedWeights(Mapping):
    """A weights map whose values are built on access: ``sum_k a[g, k] E_k[name]``.

    accelerate's offload hooks read each module's tensors from it right before
    the module's forward and drop them right after, so at any time the process
    holds one module's weights plus K chunks of the tensor being combined.
    """

    CHUNK = 4 * 1024 * 1024  # elements read per expert at a time (16 MiB in float32)

    def __init__(self, experts: Sequence[Expert], groups: Dict[str, int], aliases: Dict[str, str], *,
                 dtype: torch.dtype, device: torch.device):
        self.experts = list(experts)
        self.groups = groups
        self.aliases = aliases  # tied names the files do not store -> the stored name
        self.names = [n for n in experts[0].tensors] + [a for a in aliases if a not in experts[0].tensors]
        self.dtype = dtype
        self.device = device
        self.reader = TensorReader()
        self.rows: Optional[List[torch.Tensor]] = None
        self.bytes_read = 0  # expert bytes read so far (for tests and the benchmark)
        self.tensors_built = 0
        # One reusable read buffer for K chunks of CHUNK elements: reading into
        # fresh memory every time costs page faults worth more than the read, and
        # chunking keeps it small next to the largest tensor (the embeddings).
        self.chunk = min(self.CHUNK, max(t.numel for t in experts[0].tensors.values()))
        self.scratch = torch.empty(len(self.experts) * self.chunk, dtype=dtype)
        # Tied weights (embeddings = head) are asked for twice per forward; the
        # second ask reuses the first build (until the coefficients change).
        self.tied_sources = set(aliases.values())
        self._tied: Dict[str, torch.Tensor] = {}

    def set_coefficients(self, coefficients: np.ndarray) -> None:
        self.rows = _coefficient_rows(coefficients, self.device)
        self._tied.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self.aliases.get(name, name)
        if source not in self.groups:
            raise KeyError(name)
        if self.rows is None:
            raise EvaluationError("no particle set: call set_coefficients first")
        if source in self._tied:
            return self._tied[source]
        info = self.experts[0].tensors[source]
        c = self.rows[self.groups[source]]
        merged = torch.empty(info.numel, dtype=torch.float32 if self.dtype == torch.float32 else self.dtype,
                             device=self.device)
        # Chunk by chunk along the flattened tensor; each output element is the
        # same K-term combination as in-memory mode computes, so weights match.
        for start in range(0, info.numel, self.chunk):
            stop = min(start + self.chunk, info.numel)
            stacked = read_stacked(self.reader, self.experts, source, self.dtype, scratch=self.scratch,
                                   span=(start, stop))
            self.bytes_read += stacked.numel() * stacked.element_size()
            if self.device.type != "cpu":
                stacked = stacked.to(self.device)
            combine(stacked, c, out=merged[start:stop])
        self.tensors_built += 1
        merged = merged.reshape(info.shape)
        if source in self.tied_sources:
            self._tied[source] = merged
        return merged

    def __contains__(self, name: object) -> bool:  # cheap: never builds a tensor
        return name in self.groups or name in self.aliases

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class StreamingEvaluator(Evaluator):
    """A meta-device skeleton whose modules load their merged weights per forward.

    Memory: about the largest module's weights times (K + 1), plus activations,
    whatever the model size. Cost: the weights are rebuilt on every forward
    call, so scoring uses one large batch (see :mod:`swarm_merge.objectives`),
    and generation rebuilds them once per generated token.
    """

    mode = "streaming"

    def __init__(self, experts: Sequence[Expert], groups: Dict[str, int], *, dtype: str, device: torch.device, tokenizer_path=None):
        from accelerate import cpu_offload, init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device = device
        self.dtype = torch_dtype(dtype)
        self.tokenizer = load_tokenizer(tokenizer_path or experts[0].path)
        config = AutoConfig.from_pretrained(str(experts[0].path))
        with init_empty_weights():  # buffers (e.g. rotary frequencies) are still built for real
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        model.tie_weights()  # from_config on meta leaves tied parameters as separate objects
        model.eval()
        # Tied parameters (lm_head = embed_tokens) appear under a name the files
        # may not store: serve them from the stored one.
        stored = experts[0].tensors
        by_param: Dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in stored:
                by_param.setdefault(id(param), name)
        aliases = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name not in stored:
                if id(param) not in by_param:
                    raise EvaluationError(f"the experts' files lack tensor {name!r} that the model needs; re-save them")
                aliases[name] = by_param[id(param)]
        self.weights = LazyMergedWeights(experts, groups, aliases, dtype=self.dtype, device=device)
        # accelerate's AlignDevicesHook loads every module's parameters from the
        # map at pre-forward and puts them back on `meta` at post-forward.
        self.model = cpu_offload(model, execution_device=device, state_dict=self.weights)

    def build(self, coefficients: np.ndarray) -> None:
        self.weights.set_coefficients(coefficients)

    def evaluate(self, coefficients, examples, objective) -> Score:
        # One batch for the whole set: every forward rebuilds every weight.
        self.batch_size = len(examples)
        # accelerate empties the CUDA cache after placing each tensor, which
        # costs more than the combine itself; keep the cache for the evaluation.
        with _no_per_tensor_cache_clearing(self.device):
            return super().evaluate(coefficients, examples, objective)


class _no_per_tensor_cache_clearing:
    def __init__(self, device: torch.device):
        self.active = device.type == "cuda"

    def __enter__(self):
        if self.active:
            import accelerate.utils.modeling as modeling

            self._saved = modeling.clear_device_cache
            modeling.clear_device_cache = lambda *a, **k: None
        return self

    def __exit__(self, *exc):
        if self.active:
            import accelerate.utils.modeling as modeling

            modeling.clear_device_cache = self._saved
        return False


# ------------------------------------------------------------- choosing a mode

EVAL_MODES = ("auto", "in-memory", "streaming")


def memory_estimate(experts: Sequence[Expert], dtype: str) -> Dict[str, int]:
    """Bytes each mode holds for weights (activations not included)."""
    elem = torch.finfo(torch_dtype(dtype)).bits // 8
    k = len(experts)
    params = experts[0].num_parameters
    largest = max(t.numel for t in experts[0].tensors.values())
    return {
        "model": params * elem,
        "in-memory": (k + 1) * params * elem,
        # the K expert rows being combined, the float32 accumulator, the module's weights
        "streaming": (k + 1) * largest * elem + largest * 4,
    }


def memory_budget(device: torch.device, max_memory: Optional[int]) -> int:
    """The bytes a run may use: ``--max-memory``, else 70% of what is available now."""
    if max_memory:
        return max_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    import psutil

    return int(psutil.virtual_memory().available * 0.7)


def choose_mode(mode: str, estimate: Dict[str, int], budget: int) -> str:
    if mode not in EVAL_MODES:
        raise EvaluationError(f"--eval-mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
    if mode != "auto":
        return mode
    return "in-memory" if estimate["in-memory"] <= budget else "streaming"


def make_evaluator(mode: str, experts, groups, *, dtype: str, device: torch.device, tokenizer_path=None) -> Evaluator:
    cls = {"in-memory": InMemoryEvaluator, "streaming": StreamingEvaluator}[mode]
    return cls(experts, groups, dtype=dtype, device=device, tokenizer_path=tokenizer_path)


def parse_bytes(text: str) -> int:
    """'24GiB', '512MB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 16GiB or 500MB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(value * base ** "_KMGT".index(unit or "_"))
