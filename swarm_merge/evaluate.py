"""Evaluate a particle: make a model compute with its weights, then score it.

A particle is a coefficient array ``a`` of shape ``(groups, K)``; the weights
are built by :mod:`swarm_merge.weights`. No merged model is ever written to
disk, and the model skeleton is built once and reused.

Three modes, one arithmetic (:func:`swarm_merge.weights.combine`), so they
score identically:
- in-memory (:class:`InMemoryEvaluator`) holds the K experts' tensors and
  rebuilds every weight of one skeleton in place before each evaluation;
- one-model (:class:`OneModelEvaluator`) holds one model and, before each
  evaluation, reads every expert tensor once from its file into it;
- streaming (:class:`StreamingEvaluator`) keeps the skeleton on the meta
  device; accelerate's offload hooks build each module's weights from the
  experts' files right before its forward and free them right after, so memory
  stays about one module's worth whatever the model size.

Also here: the memory policy that picks a mode (``--eval-mode auto``).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from swarm_merge.errors import EvaluationError, InputError
from swarm_merge.experts import Expert
from swarm_merge.objectives import Example, Score, row_count, score
from swarm_merge import distributed, weights
from swarm_merge.recipe import short_repr
from swarm_merge.weights import (
    ChunkedCombiner,
    LazyMergedWeights,
    NonFiniteWeights,
    TensorReader,
    coefficient_rows,
    combine,
    read_stacked,
    torch_dtype,
)

__all__ = [
    "Evaluator",
    "remembered",
    "InMemoryEvaluator",
    "OneModelEvaluator",
    "StreamingEvaluator",
    "memory_estimate",
    "memory_budget",
    "choose_mode",
    "make_evaluator",
    "offload",
    "check_device",
    "resolve_device",
    "load_tokenizer",
    "check_tokenizer",
    "parse_bytes",
    "EVAL_MODES",
]

LOG = logging.getLogger(__name__)


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def check_device(device: str) -> None:
    """A device this tool can evaluate on (checked before any work)."""
    from swarm_merge.errors import InputError

    if not isinstance(device, str) or not DEVICE.match(device):
        raise InputError(f"--device {short_repr(device)} is not a device this tool evaluates on; "
                         "use auto, cpu, cuda, cuda:N or mps")


def resolve_device(device: str) -> torch.device:
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError("--device cuda asked for but torch sees no CUDA GPU; use --device cpu or auto")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise EvaluationError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s); "
                              "use cuda:0 .. cuda:N-1")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise EvaluationError("--device mps asked for but torch sees no MPS device; use --device cpu or auto")
    return resolved


def check_tokenizer(path, objective) -> None:
    """The tokenizer loads and has what the objective asks of it (checked before the search)."""
    from swarm_merge.errors import DataError

    try:
        tokenizer = load_tokenizer(path)
    except Exception as exc:
        raise DataError(f"the tokenizer in {str(path)!r} cannot be loaded ({type(exc).__name__}); "
                        "the first expert (or base_model) must carry its tokenizer files") from None
    if getattr(objective, "chat_template", False) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"objective.chat_template is true but the tokenizer in {str(path)!r} has no chat template; "
                        "set objective.chat_template: false, or use a base_model whose tokenizer has one")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# ----------------------------------------------------------------- evaluators


def remembered(build):
    """A ``build`` that the evaluator remembers: ``evaluate`` skips it for the coefficients the model holds already.
    A race scores one position's stages one after another (search.py); without this each stage would build the
    same weights again (0.1 s on the demo; by the cost model, docs/scale.md, an in-memory evaluation of 7B experts
    on one H200 is 2.7 x a plain forward, so the build is over half of it). Forgotten first, so a build that fails
    or raises NonFiniteWeights half way is done again next time."""

    def remembering(self, coefficients: np.ndarray) -> None:
        self._built = None
        build(self, coefficients)
        self._built = np.array(coefficients, dtype=float)

    remembering.__doc__ = build.__doc__
    return remembering


class Evaluator(abc.ABC):
    """Shared by both modes: a model whose weights follow ``build(coefficients)``."""

    mode = "?"
    # Rows per forward call; None keeps the recipe's objective.batch_size.
    batch_size: Optional[int] = None
    # Compute a prompt prefix common to a batch once (off where a forward costs a weight rebuild).
    share_prefix: bool = True
    # Where every forward rebuilds the weights (streaming): the most rows one forward takes.
    # The pipeline sets it to the dev set's rows, so a larger set (the test set) is scored
    # in chunks of that size and the run's memory is the search's, whatever the data.
    max_rows: Optional[int] = None
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    # The coefficients the model's weights hold (set by a remembered build; None: unknown).
    _built: Optional[np.ndarray] = None

    @abc.abstractmethod
    def build(self, coefficients: np.ndarray) -> None:
        """Make ``self.model`` compute with the particle ``coefficients`` (G, K)."""

    def close(self) -> None:
        """Close the expert files this evaluator reads (one-model and streaming keep them open for
        pread); it cannot build after. The pipeline calls it when the search and scoring are done,
        or failed. In memory, nothing stays open."""
        return None

    def rows_per_forward(self, examples) -> int:
        """One forward for the whole set (each forward rebuilds every weight), up to ``max_rows``."""
        n = max(1, row_count(examples))
        return min(n, self.max_rows) if self.max_rows else n

    def evaluate(self, coefficients: np.ndarray, examples: Sequence[Example], objective) -> Score:
        """Build the particle and score it; a NaN utility ranks it worst. Weights that come out
        NaN or inf in the dtype (checked as they are built) or logits that do (checked by a
        hook on the LM head) score NaN too, whatever the objective would make of the output.

        Raises:
            EvaluationError: scoring raised. Every particle runs the same code on
                the same shapes, so the cause (memory, a template, the device)
                would recur on every particle: the run stops instead of scoring
                NaN a hundred times. The checkpoint is kept for --resume.
        """
        if self._built is not None and np.array_equal(self._built, np.asarray(coefficients, dtype=float)):
            return self._score(lambda: None, examples, objective)  # (it holds them already: remembered)
        return self._score(lambda: self.build(coefficients), examples, objective)

    def evaluate_weights(self, tensor_of: Callable[[str], torch.Tensor], examples: Sequence[Example],
                         objective) -> Score:
        """Score the model with weights ``tensor_of(stored name)`` (a merge this tool did not
        search, e.g. a mergekit baseline); in-memory and one-model modes."""
        return self._score(lambda: self.load(tensor_of), examples, objective)

    def load(self, tensor_of) -> None:
        raise EvaluationError(f"the {self.mode} evaluator cannot take weights from outside the search; "
                              "use --eval-mode in-memory or one-model")

    def _score(self, build: Callable[[], None], examples: Sequence[Example], objective) -> Score:
        try:
            build()
            with warnings.catch_warnings(), _contiguous_head(self.model), _LogitsWatch(self.model) as logits:
                warnings.simplefilter("ignore")
                result = score(self.model, self.tokenizer, examples, objective, self.device, batch_size=self.batch_size,
                               share_prefix=self.share_prefix)
            # Streaming builds the weights during the forwards: their check is read after them.
            streamed = getattr(self, "weights", None)
            bad = streamed.nonfinite() if isinstance(streamed, LazyMergedWeights) else None
            if bad is not None:
                raise NonFiniteWeights(bad, self.dtype)
        except NonFiniteWeights as exc:
            LOG.warning("%s: the particle scores NaN (worst); if every particle does, use a wider dtype "
                        "(bfloat16 or float32)", exc)
            return Score(float("nan"), {}, row_count(examples))
        except (EvaluationError, InputError):  # InputError: bad input met only now (exit 2)
            raise
        except Exception as exc:
            LOG.debug("evaluation traceback", exc_info=True)
            detail = " ".join(str(exc).split())[:200]
            # What to run next depends on whether progress was saved: search.run_search says it.
            raise EvaluationError(f"evaluating a particle failed ({type(exc).__name__}: {detail}); fix the cause "
                                  "(run with -v for the traceback)") from exc
        if logits.bad:
            # Garbage text from NaN logits scores 0 on an accuracy objective, like a sane but poor model.
            LOG.warning("the particle's logits are NaN or inf: it scores NaN (worst), not what its garbage output "
                        "would score")
            return Score(float("nan"), {}, result.n)
        if not math.isfinite(result.utility):
            LOG.warning("utility is NaN (the merged weights may have blown up); the particle is scored worst")
            return Score(float("nan"), result.groups, result.n)
        return result


@contextlib.contextmanager
def _contiguous_head(model: torch.nn.Module):
    """The LM head's input made contiguous while scoring.

    Written by hand: transformers slices the hidden states for ``logits_to_keep``, and torch's CPU
    linear in bfloat16 on such a strided 3-D input takes a slow path: 400 ms against 9.6 ms for
    (8, 5, 576) x (49152, 576) here (2.5 x in float32). Streaming's log-likelihoods (no shared
    prefix) hit it on every forward. The copy is a few rows of activations."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(
        lambda module, args: (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else None)
    try:
        yield
    finally:
        handle.remove()


class _LogitsWatch:
    """Whether any logits ``model`` computes are NaN or inf: a forward hook on its output
    embeddings (the LM head; the model itself when it has none), so every forward counts:
    generate()'s steps, log-likelihoods, lm-eval's and custom objectives' own calls.

    On the CPU each output is checked as it comes (:func:`weights.is_finite`, a sum); on a
    GPU the flag stays on the device and is read once, after the scoring."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._cpu_bad = False
        self._flag: Optional[torch.Tensor] = None

    def __enter__(self) -> "_LogitsWatch":
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        target = head if isinstance(head, torch.nn.Module) else self.model
        self._handle = target.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        return False

    def _hook(self, module, args, output) -> None:
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or self._cpu_bad:
            return
        if logits.device.type == "cpu":
            self._cpu_bad = not weights.is_finite(logits)
            return
        flag = ~torch.isfinite(logits).all()
        self._flag = flag if self._flag is None else self._flag | flag

    @property
    def bad(self) -> bool:
        return self._cpu_bad or (self._flag is not None and bool(self._flag))


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
        self.device = device
        self.groups = groups
        self.dtype = torch_dtype(dtype)
        weights.check_range(experts, self.dtype)
        self.tokenizer = load_tokenizer(tokenizer_path or experts[0].path)
        self.model, self.targets = _skeleton(experts, self.dtype, device)
        reader = TensorReader()
        try:
            self.stacked = {n: read_stacked(reader, experts, n, self.dtype).to(device) for n in self.targets}
        finally:
            reader.close()
        self.expert_bytes = sum(t.numel() * t.element_size() for t in self.stacked.values())
        # Each expert's largest |value| per tensor: most particles provably build finite weights,
        # whose chunks then skip the check (weights.may_overflow).
        self.peaks = {n: weights.row_peaks(t) for n, t in self.stacked.items() if t.is_floating_point()}

    @remembered
    @torch.no_grad()
    def build(self, coefficients: np.ndarray) -> None:
        """Write ``sum_k a[g, k] E_k`` into every weight of the skeleton, in place."""
        rows = coefficient_rows(coefficients, self.device)
        # The tensors this particle might overflow are checked finite as they are built (NonFiniteWeights: it scores NaN).
        unsafe = weights.may_overflow(self.peaks, coefficients, self.groups, self.dtype)
        if self.device.type == "cpu":  # cache-sized chunks on every core: 0.119 -> 0.100 s on the demo
            weights.combine_chunked([(name if name in unsafe else None, self.stacked[name], rows[self.groups[name]],
                                      target.data.view(-1)) for name, target in self.targets.items()],
                                    weights.build_workers(self.device))
            return
        check = weights.FiniteCheck()
        for name, target in self.targets.items():
            combine(self.stacked[name], rows[self.groups[name]], out=target.data.view(-1))
            if name in unsafe:
                check.add(name, target)
        bad = check.first()
        if bad is not None:
            raise NonFiniteWeights(bad, self.dtype)

    def expert_rows(self, name: str) -> torch.Tensor:
        """The K experts' tensor ``name``, ``(K, numel)``."""
        return self.stacked[name]

    @torch.no_grad()
    def load(self, tensor_of) -> None:
        self._built = None  # (weights from outside the search)
        for name, target in self.targets.items():
            target.data.copy_(tensor_of(name).reshape(target.shape))
            if target.is_floating_point() and not weights.is_finite(target):
                raise NonFiniteWeights(name, self.dtype)


def _skeleton(experts: Sequence[Expert], dtype: torch.dtype, device: torch.device):
    """One model on ``device`` (expert 0, loaded once; its weights are overwritten
    per particle) and the parameters to write: (model, stored name -> tensor)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(experts[0].path), trust_remote_code=False, dtype=dtype).to(device).eval()
    targets: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in experts[0].tensors:
            continue  # a tied copy the files do not store, or a buffer
        if tensor.data_ptr() in seen:
            continue  # tied weights share storage: write them once
        seen.add(tensor.data_ptr())
        targets[name] = tensor
    return model, targets


class OneModelEvaluator(Evaluator):
    """One model held on the device; per evaluation each expert tensor is read
    once from its file (chunked, into a reused buffer) and combined straight
    into the model's parameter. Scoring then runs at full speed, generation
    included.

    Memory: one model plus K chunks of buffer per build thread. I/O: K x the model per
    evaluation (from the OS page cache when the experts fit in it).
    """

    mode = "one-model"

    def __init__(self, experts: Sequence[Expert], groups: Dict[str, int], *, dtype: str, device: torch.device,
                 tokenizer_path=None):
        self.device = device
        self.groups = groups
        self.dtype = torch_dtype(dtype)
        weights.check_range(experts, self.dtype)
        self.tokenizer = load_tokenizer(tokenizer_path or experts[0].path)
        self.model, self.targets = _skeleton(experts, self.dtype, device)
        self.combiner = ChunkedCombiner(experts, dtype=self.dtype, device=device)

    @remembered
    @torch.no_grad()
    def build(self, coefficients: np.ndarray) -> None:
        rows = coefficient_rows(coefficients, self.device)
        # The tensors this particle might overflow are checked finite as they are built (NonFiniteWeights: it scores NaN).
        peaks = self.combiner.peaks  # learnt by the first build
        self.combiner.skip = set(peaks) - weights.may_overflow(peaks, coefficients, self.groups, self.dtype)
        self.combiner.combine_all([(name, rows[self.groups[name]], target.data.view(-1))
                                   for name, target in self.targets.items()])
        bad = self.combiner.check.first()
        if bad is not None:
            raise NonFiniteWeights(bad, self.dtype)

    def expert_rows(self, name: str) -> torch.Tensor:
        return read_stacked(self.combiner.reader, self.combiner.experts, name, self.dtype)

    def close(self) -> None:
        self.combiner.reader.close()

    load = InMemoryEvaluator.load


class StreamingEvaluator(Evaluator):
    """A meta-device skeleton whose modules load their merged weights per forward.

    Memory: about the largest module's weights times (K + 1), plus activations,
    whatever the model size. Cost: the weights are rebuilt on every forward
    call, so scoring uses one large batch (see :mod:`swarm_merge.objectives`),
    and generation rebuilds them once per generated token.
    """

    mode = "streaming"
    share_prefix = False  # one more forward would rebuild every weight once more

    def __init__(self, experts: Sequence[Expert], groups: Dict[str, int], *, dtype: str, device: torch.device, tokenizer_path=None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device = device
        self.dtype = torch_dtype(dtype)
        weights.check_range(experts, self.dtype)
        self.tokenizer = load_tokenizer(tokenizer_path or experts[0].path)
        config = AutoConfig.from_pretrained(str(experts[0].path), trust_remote_code=False)
        with init_empty_weights():  # buffers (e.g. rotary frequencies) are still built for real
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        model.tie_weights()  # from_config on meta leaves tied parameters as separate objects
        model.eval()
        self.model, self.weights = offload(model, experts, groups, dtype=self.dtype, device=device)

    def build(self, coefficients: np.ndarray) -> None:
        self.weights.set_coefficients(coefficients)

    def close(self) -> None:
        self.weights.combiner.reader.close()

    def evaluate(self, coefficients, examples, objective) -> Score:
        self.batch_size = self.rows_per_forward(examples)
        # accelerate empties the CUDA cache after placing each tensor, which
        # costs more than the combine itself; keep the cache for the evaluation.
        try:
            with _no_per_tensor_cache_clearing(self.device):
                return super().evaluate(coefficients, examples, objective)
        finally:
            trim_heap()


def score_all(evaluator: Evaluator, objective, jobs: Sequence[tuple], ranks=None) -> List[Score]:
    """Scores of ``jobs`` [(coefficients, rows)], spread over the ranks (default: this process)."""
    return (ranks or distributed.Ranks()).map(lambda job: evaluator.evaluate(job[0], job[1], objective), jobs)


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc's ``malloc_trim``).

    Written by hand: neither torch nor Python does it. glibc raises its mmap
    threshold each time a large block is freed, so after a few evaluations the
    weights and logits built per forward (up to 32 MB each) come from the heap,
    and freed heap memory stays in the process: streaming mode's anonymous RSS
    grew by about 100 MB an evaluation on the demo without this, and stays flat
    with it. A no-op where glibc is absent.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def offload(model: torch.nn.Module, experts: Sequence[Expert], groups: Optional[Dict[str, int]], *,
            dtype: torch.dtype, device: torch.device, rename: Optional[Callable[[str], Optional[str]]] = None,
            extra: Optional[Dict[str, torch.Tensor]] = None):
    """Hook a meta-device ``model`` so each module builds its weights from the experts' files
    right before its forward (accelerate's ``cpu_offload`` over a :class:`LazyMergedWeights`).

    Args:
        groups: stored tensor name -> coefficient group (None: one group).
        rename: a model parameter's name -> the stored tensor name (None: the
            parameter is served from ``extra``); default: the same name.
        extra: tensors served as they are, by parameter name (the LoRA factors);
            the caller replaces them between evaluations.

    Returns:
        (the hooked model, the weights map; set its coefficients before a forward)
    """
    from accelerate import cpu_offload

    stored = experts[0].tensors
    rename = rename or (lambda name: name)
    # Tied parameters (lm_head = embed_tokens) appear under a name the files
    # may not store: serve them from the stored one.
    sources: Dict[str, str] = {}  # parameter name -> stored name
    by_param: Dict[int, str] = {}
    params = list(model.named_parameters(remove_duplicate=False))
    for name, param in params:
        source = rename(name)
        if source is not None and source in stored:
            sources[name] = source
            by_param.setdefault(id(param), source)
    for name, param in params:
        if name in sources or rename(name) is None:
            continue
        if id(param) not in by_param:
            raise EvaluationError(f"the experts' files lack tensor {name!r} that the model needs; re-save them")
        sources[name] = by_param[id(param)]
    counts = Counter(sources.values())
    tied = {s for s, n in counts.items() if n > 1}
    weights = LazyMergedWeights(experts, groups if groups is not None else {n: 0 for n in stored},
                                {n: s for n, s in sources.items() if n != s}, tied=tied, dtype=dtype, device=device)
    served = weights if extra is None else _WithExtra(weights, extra)
    # accelerate's AlignDevicesHook loads every module's parameters from the
    # map at pre-forward and puts them back on `meta` at post-forward.
    return cpu_offload(model, execution_device=device, state_dict=served), weights


class _WithExtra(Mapping):
    """A weights map that serves some names from a dict the caller updates."""

    def __init__(self, weights: Mapping, extra: Dict[str, torch.Tensor]):
        self.weights, self.extra = weights, extra

    def __getitem__(self, name: str) -> torch.Tensor:
        found = self.extra.get(name)
        return found if found is not None else self.weights[name]

    def __contains__(self, name: object) -> bool:
        return name in self.extra or name in self.weights

    def __iter__(self):
        yield from self.weights
        yield from (n for n in self.extra if n not in self.weights)

    def __len__(self) -> int:
        return len(self.weights) + sum(n not in self.weights for n in self.extra)


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

EVAL_MODES = ("auto", "in-memory", "one-model", "streaming")
# auto tries them fastest first: the first whose estimate fits the budget.
_AUTO_ORDER = ("in-memory", "one-model", "streaming")


def memory_estimate(experts: Sequence[Expert], dtype: str) -> Dict[str, int]:
    """Bytes each mode holds for weights (activations not included)."""
    elem = torch.finfo(torch_dtype(dtype)).bits // 8
    k = len(experts)
    params = experts[0].num_parameters
    largest = max(t.numel for t in experts[0].tensors.values())
    chunk = min(weights.CHUNK, largest)
    workers = weights.build_workers(torch.device("cpu"))  # buffers in host memory, one set per build thread
    return {
        "model": params * elem,
        "in-memory": (k + 1) * params * elem,
        # the model; per reader thread, K chunks of read buffer and a float32 chunk accumulator (16-bit dtypes)
        "one-model": params * elem + workers * (k * chunk * elem + chunk * 4),
        # the K expert chunks being combined (per reader thread), the float32 accumulator, the module's weights
        "streaming": workers * k * chunk * elem + largest * 4 + largest * elem,
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
    return next((m for m in _AUTO_ORDER if estimate[m] <= budget), "streaming")


def make_evaluator(mode: str, experts, groups, *, dtype: str, device: torch.device, tokenizer_path=None) -> Evaluator:
    cls = {"in-memory": InMemoryEvaluator, "one-model": OneModelEvaluator, "streaming": StreamingEvaluator}[mode]
    return cls(experts, groups, dtype=dtype, device=device, tokenizer_path=tokenizer_path)


def parse_bytes(text: str) -> int:
    """'24GiB', '512MB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 16GiB or 500MB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(value * base ** "_KMGT".index(unit or "_"))
