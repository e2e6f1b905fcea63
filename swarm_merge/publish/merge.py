"""Write the winning merge with mergekit, and the ``swarm`` merge method.

The winner is ``sum_k a_k E_k`` with ``sum_k a_k = 1`` and a_k possibly
negative. That is mergekit's ``linear`` method with ``normalize: false``: the
written ``mergekit_config.yml`` uses it, so stock ``mergekit-yaml`` reproduces
the weights. Normalising would be wrong: it divides by ``sum_k a_k``, which is 1
for a position but 0 for a velocity, and it hides coefficients that do not sum
to 1.

The ``swarm`` method registered here is that affine combination with the
constraint checked: a mergekit config can name ``merge_method: swarm`` (run it
with ``mergekit-swarm-yaml``) and gets an error, not a silently rescaled model,
if its weights do not sum to 1. mergekit 0.1.5 has no plugin discovery, so
:func:`register` is called by our entry points, once.

This module and the CLI wrapper are the only places that touch mergekit.
"""

from __future__ import annotations

import contextlib

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from typing_extensions import Annotated

from mergekit.merge_methods import BatchParameter, ParameterScope, TensorBatch, merge_method

from swarm_merge.experts import Expert
from swarm_merge.errors import EvaluationError
from swarm_merge.recipe import portable_path
from swarm_merge.weights import is_finite

__all__ = ["swarm_method", "register", "mergekit_config", "write_merge", "check_written", "model_ref"]

LOG = logging.getLogger(__name__)

AFFINE_TOLERANCE = 1e-4


@merge_method(
    name="swarm",
    pretty_name="Model Swarms",
    reference_url="https://arxiv.org/abs/2410.11163",
)
def swarm_method(
    batch: TensorBatch,
    weight: Annotated[torch.Tensor, BatchParameter(float, ParameterScope.INPUT)],
) -> torch.Tensor:
    """sum_k w_k E_k, never normalised; the weights must sum to 1 (affine)."""
    first = batch.tensors[0]
    if not first.is_floating_point():
        raise TypeError("the swarm method merges floating-point tensors only")
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = weight.to(dtype)
    totals = weight.sum(dim=1)
    if torch.any((totals - 1).abs() > AFFINE_TOLERANCE):
        raise ValueError(
            f"swarm weights must sum to 1 (got {totals.flatten()[0].item():.6g}); "
            "use the coefficients from swarm.json, or merge_method: linear for other weights"
        )
    shape = (first.shape[0],) + (1,) * (first.ndim - 1)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(batch.tensors, weight.unbind(1)):
        result.addcmul_(tensor, coefficient.reshape(shape))
    return result.to(first.dtype)


def register() -> None:
    """Make ``merge_method: swarm`` available to mergekit (idempotent)."""
    from mergekit import merge_methods

    if not any(m.spec.name == "swarm" for m in merge_methods.registered_methods()):
        merge_methods.register(swarm_method)


def model_ref(expert: Expert, *, portable: bool, relative_to: Optional[Path] = None) -> str:
    """How a config names ``expert``: its absolute folder (to run here), or with ``portable`` the Hub
    id pinned to the commit searched, or the folder relative to ``relative_to`` (to publish)."""
    if portable and not expert.ref.is_local:
        # Pin the exact commit that was searched.
        return f"{expert.ref.model}@{expert.revision}" if expert.revision else expert.ref.model
    path = str(Path(expert.path).resolve())
    if portable and relative_to is not None:
        return portable_path(path, relative_to)  # a published file carries no absolute local path
    return path


def mergekit_config(
    experts: Sequence[Expert],
    coefficients: np.ndarray,
    groups: Dict[str, int],
    *,
    dtype: str,
    portable: bool = True,
    relative_to: Optional[Path] = None,
) -> Dict[str, Any]:
    """The mergekit config whose ``linear``/``normalize: false`` merge is the particle.

    Args:
        coefficients: ``(G, K)``; with G > 1 each expert's weight is given per
            layer group with mergekit's filter syntax.
        portable: name Hub experts as ``repo@commit`` and local ones relative to
            ``relative_to`` (for the written file) rather than by their absolute
            local folder (for running here).
    """
    coefficients = np.asarray(coefficients, dtype=np.float64)
    models: List[Dict[str, Any]] = []
    for k, expert in enumerate(experts):
        if coefficients.shape[0] == 1:
            weight: Any = float(coefficients[0, k])
        else:
            weight = _filtered_weights(coefficients[:, k], groups)
        models.append({"model": model_ref(expert, portable=portable, relative_to=relative_to),
                       "parameters": {"weight": weight}})
    return {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "models": models,
        # Inputs are read in the recipe's dtype, as the search read them: the kernel accumulates in
        # float32 either way, so the written weights are the ones the search scored; and the K inputs
        # mergekit holds per tensor take half the memory of float32 copies for 16-bit experts.
        "dtype": dtype,
        "out_dtype": dtype,
    }


def _filtered_weights(column: np.ndarray, groups: Dict[str, int]) -> List[Dict[str, Any]]:
    """Per-group weights as mergekit conditional parameters (first matching filter wins):
    one filter per decoder layer, one per tensor outside the layers."""
    from swarm_merge.space import LAYER

    entries: List[Dict[str, Any]] = []
    layers: Dict[str, int] = {}
    for name, g in groups.items():
        m = LAYER.search(name)
        if m:
            # "model.layers.1." does not match "model.layers.11.": the dot closes it.
            layers[f"{m.group(1)}{m.group(2)}."] = g
        else:
            entries.append({"filter": name, "value": float(column[g])})
    entries += [{"filter": f, "value": float(column[g])} for f, g in sorted(layers.items())]
    return entries


@contextlib.contextmanager
def _pread_loaders():
    """While mergekit writes, its loaders read safetensors shards with pread
    (:class:`swarm_merge.weights.PreadShard`) instead of memory-mapping them,
    so the write's memory is the tensors in flight, not every expert's file."""
    from mergekit.io.loader import TensorLoader

    from swarm_merge.weights import PreadShard, TensorReader

    reader = TensorReader()
    original = TensorLoader.__dict__["get"]

    def get(cls, shard_path, use_lazy_unpickle=False, device=None):
        if str(shard_path).lower().endswith(".safetensors"):
            return PreadShard(str(shard_path), reader)
        return original.__func__(cls, shard_path, use_lazy_unpickle=use_lazy_unpickle, device=device)

    def forget() -> None:
        # mergekit's LoaderCache keeps every model's loader, and the shard it has open, in a dict
        # that outlives run_merge (process-wide): a later write in this process (ci run, library
        # use) would read through the last write's shards, stale if a file changed, and reopen
        # files this reader closed, leaking them. mergekit has no API to drop them; we start and
        # end each write with none.
        from mergekit.io.tasks import LoaderCache

        cache = LoaderCache()
        cache.flush_all()
        cache.loaders.clear()

    TensorLoader.get = classmethod(get)
    forget()
    try:
        yield
    finally:
        forget()
        TensorLoader.get = original
        reader.close()


def write_merge(config: Dict[str, Any], out_path: Path, *, device: str = "cpu", quiet: bool = True,
                shard_bytes: Optional[int] = None) -> None:
    """Run mergekit on ``config`` into ``out_path`` (config, safetensors, tokenizer).

    ``shard_bytes``: mergekit holds a whole output shard in memory before it
    writes it (5 GB by default); a smaller size bounds the write's memory,
    at the price of a sharded folder (which transformers loads the same).
    """
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    register()
    merge_config = MergeConfiguration.model_validate(config)
    options = MergeOptions(
        copy_tokenizer=True,
        # swarm_merge writes its own card; mergekit's asks the Hub about local paths.
        write_model_card=False,
        device=device,
        quiet=quiet,
        allow_crimes=False,
        **({"out_shard_size": int(shard_bytes)} if shard_bytes else {}),
    )
    out_path = Path(out_path)  # an empty (staging) folder, or none yet
    with _pread_loaders():
        run_merge(merge_config, str(out_path), options=options, config_source=yaml.safe_dump(config, sort_keys=False))
    if not any(out_path.glob("*.safetensors")):
        raise RuntimeError(f"mergekit wrote no safetensors into {out_path}")


def check_written(folder: Path) -> None:
    """The model mergekit wrote is finite, read back tensor by tensor (one read of one model).
    The winner's build passed the same check during the search, but mergekit reads the experts
    in float32 where the evaluators read them converted to the recipe's dtype: near float16's
    limit the two roundings can differ, and a model with inf must never be published."""
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not is_finite(tensor):
                    raise EvaluationError(f"the merge mergekit wrote holds NaN or inf in {name!r} (the winner's "
                                          "weights overflow the recipe's dtype); use dtype: float32 or bfloat16, "
                                          "then run again with --force")
