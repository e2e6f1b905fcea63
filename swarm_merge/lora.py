"""LoRA adapters as experts: combine them per particle, score them on one base
model, and write the winner back as an adapter (reading an adapter folder is
pulling an expert: :mod:`swarm_merge.experts`).

Every adapter ``k`` holds, per target module, ``A_k`` (r_k x in) and ``B_k``
(out x r_k), with scaling ``s_k`` (``alpha / r``, or ``alpha / sqrt(r)`` with
rsLoRA); its delta is ``s_k B_k A_k``. A particle's coefficients ``a`` give,
per module (``swarm.lora_space``):

- ``factors`` (the paper's official code): ``A = sum_k a_k A_k``,
  ``B = sum_k a_k B_k``, delta ``s (sum a_k B_k)(sum a_k A_k)``. Adapters of
  different ranks are zero-padded to the largest rank and different scalings
  are folded into B (``s_k / s`` times B_k): an adapter is the same function
  either way, and with equal ranks and alphas this is exactly the official code.
- ``delta`` (task-vector space): delta ``sum_k a_k s_k B_k A_k``, itself a
  LoRA of rank ``sum_k r_k``: the A's stacked along the rank, the scaled B's
  side by side (PEFT's ``cat`` combination), scaling 1. No dense delta.

A module one adapter does not target counts as A = B = 0 for it.

Both spaces are linear in the coefficients, so a particle's adapter is
``sum_k a_k X_k`` of per-expert tensors held in memory (a few MB each). The
:class:`LoraEvaluator` holds the base once (or streams it) wrapped by PEFT, and
per particle copies only the new A and B in; :func:`write_adapter` writes the
same tensors, so the written adapter gives the logits the search scored.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from swarm_merge.errors import EvaluationError, ExpertError, ExpertMismatchError
from swarm_merge.evaluate import Evaluator, load_tokenizer, offload, remembered, trim_heap
# Reading an adapter folder is pulling an expert (experts/folder.py); re-exported here for the adapters' users.
from swarm_merge.experts import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterInfo, index_adapter, is_adapter_folder,
                                 is_adapter_listing, read_adapter_config)
from swarm_merge.weights import NonFiniteWeights, check_range, coefficient_rows, combine, is_finite, torch_dtype

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MERGED_DIR", "LORA_SPACES", "AdapterInfo", "is_adapter_folder", "is_adapter_listing",
           "read_adapter_config", "index_adapter", "base_of", "AdapterBank", "LoraEvaluator", "write_adapter",
           "merge_adapter", "memory_estimate"]

LOG = logging.getLogger(__name__)

MERGED_DIR = "merged"  # output.merge_adapter: the base with the winner merged in
LORA_SPACES = ("factors", "delta")
_PREFIX = "base_model.model."


def base_of(experts, recipe_base) -> Tuple[object, Optional[str]]:
    """The base the adapters apply to: (ExpertRef, where it came from), from the recipe's
    ``base_model`` or the adapters' ``base_model_name_or_path``.

    Raises:
        ExpertMismatchError: the adapters name different bases, or a base other than the recipe's.
        ExpertError: no base anywhere.
    """
    from swarm_merge.recipe import ExpertRef, looks_local

    named = {}
    for e in experts:
        base = e.adapter.base
        if base is None:
            continue
        if looks_local(base):
            # A local base is named relative to the adapter's folder (or absolute);
            # a name shaped like a Hub id is a Hub id, whatever folders the current
            # directory or the adapter's folder happen to hold.
            candidate = (Path(e.path) / Path(base).expanduser())
            base = str(candidate.resolve()) if candidate.is_dir() else base
        named[e.describe()] = base
    distinct = sorted(set(named.values()))
    if recipe_base is not None:
        if not recipe_base.is_local:
            for who, base in named.items():
                if not looks_local(base) and base.split("@")[0].lower() != recipe_base.model.lower():
                    raise ExpertMismatchError(
                        f"adapter {who} was trained on {base!r} but the recipe's base_model is {recipe_base.model!r}; "
                        "set base_model to the adapters' base, or use adapters of that base")
        else:
            for who, base in named.items():
                if (looks_local(base) and Path(base).is_dir()
                        and Path(base).resolve() != Path(recipe_base.model).expanduser().resolve()):
                    raise ExpertMismatchError(
                        f"adapter {who} was trained on the folder {base!r} but the recipe's base_model is "
                        f"{recipe_base.model!r}; set base_model to the adapters' base")
        return recipe_base, "recipe"
    if not distinct:
        raise ExpertError("the adapters do not name their base model (base_model_name_or_path); "
                          "set base_model in the recipe")
    if len(distinct) > 1:
        a = next(iter(named.items()))
        b = next(kv for kv in named.items() if kv[1] != a[1])
        raise ExpertMismatchError(f"the adapters name different bases: {a[0]} is on {a[1]!r}, {b[0]} on {b[1]!r}; "
                                  "combine adapters of one base model (or set base_model)")
    base = distinct[0]
    if looks_local(base) and Path(base).is_dir():
        return ExpertRef(model=str(Path(base).resolve())), "adapters"
    if looks_local(base):
        raise ExpertError(f"the adapters' base {base!r} is neither a folder here nor a Hub repo id; "
                          "set base_model in the recipe")
    return ExpertRef.model_validate(base), "adapters"


def _check_linear(modules: Sequence[str], experts: Sequence, base) -> None:
    """Every targeted module is a linear layer of the base's architecture (built on the
    meta device from its config: no weights), as PEFT needs for factors named lora_A/lora_B.
    An embedding also has a 2-D weight, so the shapes alone would pass it, and the run would
    fail at its first evaluation; here it fails in the dry run."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(str(base.path), trust_remote_code=False)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # the base's own checks report a bad config; this one only adds to them
        LOG.debug("no meta model of the base to check adapter targets against: %s", exc)
        return
    for module in modules:
        try:
            layer = skeleton.get_submodule(module)
        except AttributeError:
            continue  # a name transformers maps differently: the shape checks above cover it
        if not isinstance(layer, (torch.nn.Linear, Conv1D)):
            who = next(e for e in experts if module in e.adapter.modules)
            raise ExpertMismatchError(
                f"adapter {who.describe()} has LoRA factors for {module!r}, which is a {type(layer).__name__}, not "
                "a linear layer, in the base's architecture; use adapters on linear layers (q_proj, v_proj, ...)")


class AdapterBank:
    """The K adapters' factors in memory (float32), arranged so that a particle's
    adapter is a coefficient combination (see the module docstring).

    Args:
        experts: adapter experts (``Expert.adapter`` set), one base.
        base: the base model expert (its tensors give each module's shape).
        space: ``factors`` or ``delta``.
    """

    def __init__(self, experts: Sequence, base, *, space: str):
        from swarm_merge.weights import TensorReader

        if space not in LORA_SPACES:
            raise ValueError(space)
        self.experts = list(experts)
        self.space = space
        infos = [e.adapter for e in self.experts]
        self.modules = sorted({m for info in infos for m in info.modules})
        fan = {info.fan_in_fan_out for info in infos}
        if len(fan) > 1:
            raise ExpertMismatchError("the adapters disagree on fan_in_fan_out; combine adapters of one architecture")
        self.fan_in_fan_out = fan.pop()
        # Each module must be a 2-D weight of the base with matching in/out features.
        self.shapes: Dict[str, Tuple[int, int]] = {}
        for module in self.modules:
            weight = base.tensors.get(f"{module}.weight")
            if weight is None or len(weight.shape) != 2:
                who = next(e for e in self.experts if module in e.adapter.modules)
                raise ExpertMismatchError(f"adapter {who.describe()} targets {module!r}, which the base "
                                          f"{base.describe()} has no linear weight for; use adapters of this base")
            out_f, in_f = weight.shape if not self.fan_in_fan_out else weight.shape[::-1]
            self.shapes[module] = (out_f, in_f)
            for e in self.experts:
                if module not in e.adapter.modules:
                    continue
                a_key, b_key = e.adapter.modules[module]
                a, b = e.tensors[a_key].shape, e.tensors[b_key].shape
                if a[1] != in_f or b[0] != out_f:
                    raise ExpertMismatchError(
                        f"adapter {e.describe()} has {module!r} for a {a[1]}->{b[0]} layer but the base "
                        f"{base.describe()} has {in_f}->{out_f}; the adapter was trained on another base")
        _check_linear(self.modules, self.experts, base)
        ranks = [info.r for info in infos]
        scalings = [info.scaling for info in infos]
        same = len({(i.r, i.alpha, i.rslora) for i in infos}) == 1
        if space == "factors":
            self.rank = max(ranks)
            # One (r, alpha) for all: the official code exactly, the inputs' own config.
            self.alpha, self.rslora = (infos[0].alpha, infos[0].rslora) if same else (float(self.rank), False)
            self.offsets = [0] * len(infos)
        else:
            self.rank = sum(ranks)
            self.alpha, self.rslora = float(self.rank), False  # scaling 1: each s_k is in its B block
            self.offsets = list(np.cumsum([0] + ranks[:-1]))
        self.scaling = self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
        if not same:
            LOG.info("adapters differ in rank/alpha (%s): %s", ", ".join(f"r={i.r} alpha={i.alpha:g}" for i in infos),
                     "zero-padded to rank %d, scalings folded into B" % self.rank if space == "factors"
                     else "concatenated")
        # Per module: A_stack (K, R*in) and B_stack (K, out*R) with sum_k a_k X_k the particle's factor
        # (delta space: A is fixed, the stacked A's block-placed and summed).
        self.a_stack: Dict[str, torch.Tensor] = {}
        self.a_fixed: Dict[str, torch.Tensor] = {}
        self.b_parts: Dict[str, List[Optional[torch.Tensor]]] = {}
        self.b_stack: Dict[str, torch.Tensor] = {}
        reader = TensorReader()
        try:
            for module in self.modules:
                out_f, in_f = self.shapes[module]
                a_all = torch.zeros(len(infos), self.rank, in_f)
                b_all = [None] * len(infos) if space == "delta" else torch.zeros(len(infos), out_f, self.rank)
                for k, e in enumerate(self.experts):
                    if module not in e.adapter.modules:
                        continue
                    a_key, b_key = e.adapter.modules[module]
                    a = _read(reader, e.tensors[a_key], a_key)
                    b = _read(reader, e.tensors[b_key], b_key)
                    r, off = infos[k].r, self.offsets[k]
                    a_all[k, off:off + r] = a
                    fold = scalings[k] / self.scaling
                    if space == "delta":
                        b_all[k] = b * fold  # (out, r_k), placed at its columns on build
                    else:
                        b_all[k, :, :r] = b if fold == 1.0 else b * fold
                if space == "factors":
                    self.a_stack[module] = a_all.reshape(len(infos), -1)
                    self.b_stack[module] = b_all.reshape(len(infos), -1)
                else:
                    self.a_fixed[module] = a_all.sum(dim=0)  # disjoint blocks: the concatenation
                    self.b_parts[module] = b_all
        finally:
            reader.close()

    @property
    def nbytes(self) -> int:
        tensors = list(self.a_stack.values()) + list(self.b_stack.values()) + list(self.a_fixed.values())
        tensors += [t for parts in self.b_parts.values() for t in parts if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def target_modules(self, base_tensors) -> List[str]:
        """PEFT target_modules: the leaf names when the adapters cover every base module of
        those names, else the exact module paths (so nothing else gets a LoRA)."""
        leaves = sorted({m.rsplit(".", 1)[-1] for m in self.modules})
        everywhere = {n[: -len(".weight")] for n in base_tensors if n.endswith(".weight")
                      and n[: -len(".weight")].rsplit(".", 1)[-1] in leaves}
        return leaves if everywhere == set(self.modules) else list(self.modules)

    def particle(self, coefficients: np.ndarray, groups: Dict[str, int]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """module -> (A, B), float32 on the CPU, for the coefficient array (G, K)."""
        rows = coefficient_rows(coefficients, "cpu")
        found = {}
        for module in self.modules:
            out_f, in_f = self.shapes[module]
            c = rows[groups[module]]
            if self.space == "factors":
                a = combine(self.a_stack[module], c).view(self.rank, in_f)
                b = combine(self.b_stack[module], c).view(out_f, self.rank)
            else:
                a = self.a_fixed[module]
                b = torch.zeros(out_f, self.rank)
                for k, part in enumerate(self.b_parts[module]):
                    if part is not None:
                        b[:, self.offsets[k]:self.offsets[k] + part.shape[1]] = part * float(c[k])
            found[module] = (a, b)
        return found

    def lora_config(self, base_tensors, *, base_model: Optional[str] = None, revision: Optional[str] = None):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha if self.alpha != int(self.alpha) else int(self.alpha),
            use_rslora=self.rslora, target_modules=self.target_modules(base_tensors), lora_dropout=0.0,
            bias="none", task_type="CAUSAL_LM", fan_in_fan_out=self.fan_in_fan_out, inference_mode=True,
            base_model_name_or_path=base_model, revision=revision,
        )


def _read(reader, info, key: str) -> torch.Tensor:
    raw = torch.empty(info.shape, dtype=reader.stored_dtype(info.file, key))
    reader.read_into(info.file, key, raw.view(-1))
    return raw.to(torch.float32)


def memory_estimate(base, bank_bytes: int, dtype: str) -> Dict[str, int]:
    """Bytes each mode holds for weights: the base (held or streamed) plus the adapters."""
    from swarm_merge.evaluate import memory_estimate as full

    streamed = full([base], dtype)
    est = {"model": streamed["model"], "in-memory": streamed["model"] + 2 * bank_bytes,
           "streaming": streamed["streaming"] + 2 * bank_bytes}
    est["one-model"] = est["in-memory"]  # the base is the one model
    return est


class LoraEvaluator(Evaluator):
    """The base model, once, wrapped by PEFT with one LoRA of the particle's shape;
    per evaluation only the A and B tensors are replaced.

    ``streaming``: the base stays on the meta device and accelerate's hooks build
    each module's base weights from its files per forward (as the full-model
    streaming mode does), while the LoRA factors come from memory.

    Memory: the base (or one module of it, streaming) plus the K adapters.
    """

    def __init__(self, bank: AdapterBank, base, groups: Dict[str, int], *, dtype: str, device: torch.device,
                 streaming: bool = False, tokenizer_path=None):
        from peft import get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        self.mode = "streaming" if streaming else "in-memory"
        self.bank, self.groups, self.device = bank, groups, device
        self.dtype = torch_dtype(dtype)
        check_range([base], self.dtype, what="base_model")  # a base the dtype cannot hold: every particle inf
        self.tokenizer = load_tokenizer(tokenizer_path or base.path)
        if streaming:
            from accelerate import init_empty_weights

            with init_empty_weights():
                config = AutoConfig.from_pretrained(str(base.path), trust_remote_code=False)
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            model.tie_weights()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(base.path), trust_remote_code=False, dtype=self.dtype).to(device)
        model.eval()
        # The same wrapping PeftModel.from_pretrained does (LoRA factors upcast to
        # float32 on a 16-bit base), so the written adapter scores the same.
        self.model = get_peft_model(model, bank.lora_config(base.tensors), autocast_adapter_dtype=True)
        self.model.eval()
        # PEFT freezes the base. torch 2.13 on CPU then multiplies the head's
        # sliced input (logits_to_keep) by a frozen weight through bmm, ~10x
        # slower than the mm it uses for a weight that requires grad (measured:
        # 0.66 s against 0.06 s for 36x3 rows on SmolLM2's 49k vocabulary).
        # Scoring runs under inference_mode, so the flag changes nothing else.
        head = self.model.get_output_embeddings()
        if head is not None and head.weight.is_floating_point():
            head.weight.requires_grad_(True)
        self.slots = {}
        for module in bank.modules:
            layer = self.model.base_model.model.get_submodule(module)
            self.slots[module] = (f"{_PREFIX}{module}.lora_A.default.weight", f"{_PREFIX}{module}.lora_B.default.weight",
                                  layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        self.share_prefix = not streaming
        self.factors: Optional[Dict[str, torch.Tensor]] = None
        if streaming:
            self.factors = {}

            def rename(name: str) -> Optional[str]:
                if ".lora_" in name:
                    return None  # served from self.factors
                return name[len(_PREFIX):].replace(".base_layer.", ".") if name.startswith(_PREFIX) else name

            self.model, self.weights = offload(self.model, [base], None, dtype=self.dtype, device=device,
                                               rename=rename, extra=self.factors)
            self.weights.set_coefficients(np.ones((1, 1)))

    def close(self) -> None:
        if self.factors is not None:  # streaming: the base's files, read per forward
            self.weights.combiner.reader.close()

    @remembered
    @torch.no_grad()
    def build(self, coefficients: np.ndarray) -> None:
        """Put the particle's LoRA factors in place (the base is untouched)."""
        for module, (a, b) in self.bank.particle(coefficients, self.groups).items():
            if not (is_finite(a) and is_finite(b)):  # float32 factors: only absurd adapters overflow them
                raise NonFiniteWeights(f"{module}.lora_{'A' if not is_finite(a) else 'B'}", torch.float32)
            a_name, b_name, a_param, b_param = self.slots[module]
            if self.factors is not None:
                self.factors[a_name], self.factors[b_name] = a, b
            else:
                a_param.data.copy_(a)
                b_param.data.copy_(b)

    def evaluate(self, coefficients, examples, objective):
        if self.factors is not None:
            self.batch_size = self.rows_per_forward(examples)  # every forward rebuilds the base's weights
        try:
            return super().evaluate(coefficients, examples, objective)
        finally:
            if self.factors is not None:  # streaming: keep the run's memory flat (evaluate.trim_heap)
                trim_heap()


def write_adapter(folder: Path, bank: AdapterBank, coefficients: np.ndarray, groups: Dict[str, int], base, *,
                  base_model: Optional[str], revision: Optional[str]) -> None:
    """The particle as a PEFT adapter folder: adapter_config.json (PEFT's own writer) and
    adapter_model.safetensors with PEFT's key names, in float32 (the dtype the evaluator
    computed the factors in, so PeftModel.from_pretrained scores exactly the same)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    bank.lora_config(base.tensors, base_model=base_model, revision=revision).save_pretrained(str(folder))
    tensors = {}
    for module, (a, b) in bank.particle(coefficients, groups).items():
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def merge_adapter(adapter_dir: Path, base, out_dir: Path, *, dtype: str) -> None:
    """The base with the adapter merged in (PEFT ``merge_and_unload``), saved as a full model.

    PEFT's merge rather than mergekit's: mergekit 0.1.5 applies a LoRA by loading
    the base with PEFT and calling the same merge_and_unload, so going through it
    would add a copy and a temp folder for the same result. Memory: the base once.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base.path), trust_remote_code=False, dtype=torch_dtype(dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    # The search scored base(x) + lora(x), never W + s B A itself: a weight near the dtype's limit
    # plus the update can overflow here alone. Never write inf.
    for name, param in merged.state_dict().items():
        if param.is_floating_point() and not is_finite(param):
            raise EvaluationError(f"merging the winning adapter into the base makes tensor {name!r} NaN or inf in "
                                  f"{dtype} (the adapter itself is fine); set dtype: float32 in the recipe, or drop "
                                  "output.merge_adapter")
    merged.save_pretrained(str(out_dir))
    load_tokenizer(base.path).save_pretrained(str(out_dir))
    del merged, model
