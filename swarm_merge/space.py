"""The search space: which coefficient group each tensor belongs to.

A particle is a coefficient array ``(groups, K)``. ``model`` granularity (the
paper's) has one group; ``layer`` granularity gives each block of decoder
layers its own coefficient vector. mergekit's per-layer filters in
:mod:`swarm_merge.publish.merge` are written from the same pattern.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from swarm_merge.errors import RecipeError

__all__ = ["LAYER", "tensor_groups"]

# A numbered decoder layer in a tensor name: group 1 the prefix up to the
# number ("model.layers."), group 2 the number. Used for layer groups here and
# for mergekit's per-layer filters in publish/merge.py.
LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.)(\d+)\.")


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
        raise RecipeError(
            "swarm.granularity 'layer' needs numbered decoder layers (model.layers.N.*), which these experts "
            "lack; use granularity: model"
        )
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
