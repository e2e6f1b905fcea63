"""Evaluate a particle: build its weights from the experts' tensors, then score.

A particle is a coefficient array ``a`` of shape ``(groups, K)``; the weights of
tensor ``t`` in group ``g`` are ``sum_k a[g, k] * E_k[t]``. No merged model is
ever written to disk, and the model skeleton is built once and reused.

In-memory mode (:class:`InMemoryEvaluator`) holds the K experts' tensors and
rebuilds every weight of the skeleton in place before each evaluation.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from swarm_merge.errors import EvaluationError
from swarm_merge.experts import Expert
from swarm_merge.objectives import Example, Score, score

__all__ = ["tensor_groups", "InMemoryEvaluator", "resolve_device", "torch_dtype"]

LOG = logging.getLogger(__name__)

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


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
    layer_of = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
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


class InMemoryEvaluator:
    """Holds the experts' tensors and rebuilds one reused skeleton per evaluation.

    Args:
        experts: the pulled, compatible experts.
        groups: tensor name -> coefficient group (see :func:`tensor_groups`).
        dtype: the skeleton's dtype (the recipe's ``dtype``).
        device: where the skeleton and the expert tensors live.
        tokenizer_path: folder to load the tokenizer from.
    """

    def __init__(self, experts: Sequence[Expert], groups: Dict[str, int], *, dtype: str, device: torch.device, tokenizer_path=None):
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        self.device = device
        self.groups = groups
        self.num_experts = len(experts)
        self.tokenizer = load_tokenizer(tokenizer_path or experts[0].path)
        self.dtype = torch_dtype(dtype)
        # The skeleton: expert 0 loaded once; its weights are overwritten per particle.
        model = AutoModelForCausalLM.from_pretrained(str(experts[0].path), dtype=self.dtype)
        self.model = model.to(device).eval()
        state = self.model.state_dict(keep_vars=True)
        self.targets: Dict[str, torch.Tensor] = {}
        seen = set()
        for name, tensor in state.items():
            if name not in experts[0].tensors:
                continue  # tied copy (e.g. lm_head of a tied model) or a buffer the files lack
            ptr = tensor.data_ptr()
            if ptr in seen:
                continue  # tied weights share storage: write them once
            seen.add(ptr)
            self.targets[name] = tensor
        # Expert tensors, stacked (K, numel) per target. In float32 for a float32
        # skeleton (one matmul per tensor builds it); in the skeleton's 16-bit
        # dtype otherwise, to halve memory, and accumulated in float32 per tensor.
        self.stacked: Dict[str, torch.Tensor] = {}
        handles = {}
        try:
            for name, target in self.targets.items():
                rows = []
                for e in experts:
                    info = e.tensors[name]
                    if info.file not in handles:
                        handles[info.file] = safe_open(info.file, framework="pt")
                    rows.append(handles[info.file].get_tensor(name).reshape(-1).to(self.dtype))
                self.stacked[name] = torch.stack(rows).to(device)
        finally:
            handles.clear()
        self.expert_bytes = sum(t.numel() * t.element_size() for t in self.stacked.values())

    @torch.no_grad()
    def build(self, coefficients: np.ndarray) -> None:
        """Write ``sum_k a[g, k] E_k`` into every weight of the skeleton."""
        coefficients = np.asarray(coefficients, dtype=np.float64)
        per_group = [torch.tensor(row, dtype=torch.float32, device=self.device) for row in coefficients]
        for name, target in self.targets.items():
            c = per_group[self.groups[name]]
            experts = self.stacked[name]
            flat = target.data.view(-1)
            if experts.dtype == torch.float32:
                torch.matmul(c, experts, out=flat)
            else:
                acc = torch.zeros(flat.shape, dtype=torch.float32, device=self.device)
                for k in range(experts.shape[0]):
                    acc.add_(experts[k], alpha=float(c[k]))
                flat.copy_(acc)

    def evaluate(self, coefficients: np.ndarray, examples: Sequence[Example], objective) -> Score:
        """Build the particle and score it; a failure or NaN gives a NaN utility."""
        try:
            self.build(coefficients)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = score(self.model, self.tokenizer, examples, objective, self.device)
        except Exception as exc:  # the search goes on; the particle ranks worst
            LOG.warning("evaluation failed (%s: %s); the particle is scored worst", type(exc).__name__, exc)
            LOG.debug("evaluation traceback", exc_info=True)
            return Score(float("nan"), {}, len(examples))
        if not math.isfinite(result.utility):
            LOG.warning("utility is NaN (the merged weights may have blown up); the particle is scored worst")
            return Score(float("nan"), result.groups, result.n)
        return result
