"""What differs between the two kinds of expert, full models and LoRA adapters, in one place.

The pipeline asks an :class:`ExpertKind` for the tensors the search combines, the memory each eval mode
needs, the evaluator, how to write the winner, its records in swarm.json and its line in a dry run's plan;
it never asks which kind it holds. :func:`pull` makes the kind from the pulled experts (the adapters' base
is pulled whole; a full model's base only for its config and tokenizer).
"""

from __future__ import annotations

import abc
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import yaml

from swarm_merge import evaluate, experts as experts_mod, lora, output, report as report_mod
from swarm_merge.errors import ExpertError, RecipeError
from swarm_merge.options import RunOptions
from swarm_merge.publish import merge
from swarm_merge.recipe import Recipe

__all__ = ["ExpertKind", "FullModels", "LoraAdapters", "pull", "relative_path"]

LOG = logging.getLogger(__name__)


def relative_path(recipe: Recipe, path) -> str:
    """A local path as swarm.json and the card publish it: relative to the recipe's folder (``./x`` or
    ``../x``), or as given for a recipe without a folder."""
    if recipe.base_dir is None:
        return str(path)
    relative = os.path.relpath(Path(path).resolve(), recipe.base_dir)
    return relative if relative.startswith("..") else os.path.join(".", relative)


class ExpertKind(abc.ABC):
    """Full models or LoRA adapters: the experts, their base (or None), and what the run does with them.
    The abstract methods are what each kind must say for itself; the others have one answer for both."""

    adapters = False  # (the comparison's mergekit baselines and the card's wording read it)

    def __init__(self, recipe: Recipe, experts: List[experts_mod.Expert], base: Optional[experts_mod.Expert]):
        self.recipe, self.experts, self.base = recipe, experts, base

    @property
    def tokenizer_path(self) -> Path:
        return self.base.path if self.base else self.experts[0].path

    @property
    def folders(self) -> List[Path]:
        """Every model folder the run reads (their small files go into the checkpoint's fingerprint)."""
        return [e.path for e in self.experts] + ([self.base.path] if self.base else [])

    @abc.abstractmethod
    def tensor_names(self) -> List[str]:
        """The tensors (or, for adapters, the modules) the search space groups."""

    def weighed(self) -> List[experts_mod.Expert]:
        """The models whose every weight is read once before the search (finite, digested)."""
        return list(self.experts)

    @abc.abstractmethod
    def estimate(self) -> Dict[str, int]:
        """Bytes of weights each eval mode holds (evaluate.choose_mode picks from them)."""

    def choose_mode(self, requested: str, budget: int) -> str:
        return evaluate.choose_mode(requested, self.estimate(), budget)

    @abc.abstractmethod
    def evaluator(self, mode: str, groups: Dict[str, int], device) -> evaluate.Evaluator:
        """The evaluator of eval mode ``mode`` that builds and scores this kind's particles."""

    @abc.abstractmethod
    def write(self, stage: Path, best: np.ndarray, groups: Dict[str, int], *, mode: str, device) -> Optional[str]:
        """Write the winner into ``stage``; returns the mergekit YAML it was written with (None: not mergekit)."""

    @abc.abstractmethod
    def records(self, digests: List[str]) -> dict:
        """The kind's fields of the report: ``base_model`` and ``lora`` (``digests``: of :meth:`weighed`)."""

    def extra_cards(self, stage: Path, report, *, repo_id: Optional[str]) -> None:
        """Cards of anything written besides the winner (none by default)."""
        return None

    @abc.abstractmethod
    def headline(self) -> str:
        """The dry run's first line."""

    def shape(self, expert: experts_mod.Expert) -> str:
        """What the dry run says of one expert's shape before its size (empty for a full model)."""
        return ""

    def shard_bytes(self, mode: str) -> Optional[int]:
        return None


class FullModels(ExpertKind):
    """Full models, merged tensor by tensor; the base (optional) lends its config and tokenizer only."""

    def tensor_names(self) -> List[str]:
        return sorted(self.experts[0].tensors)

    def estimate(self) -> Dict[str, int]:
        return evaluate.memory_estimate(self.experts, self.recipe.dtype)

    def evaluator(self, mode, groups, device):
        return evaluate.make_evaluator(mode, self.experts, groups, dtype=self.recipe.dtype, device=device,
                                       tokenizer_path=self.tokenizer_path)

    def shard_bytes(self, mode: str) -> Optional[int]:
        """Output shard size for mergekit, so the final write stays near the mode's memory: mergekit's
        default (one shard up to 5 GB) in memory mode, shards of about the one-model / streaming estimate
        otherwise (at least 256 MiB)."""
        if mode == "in-memory":
            return None
        return max(self.estimate()[mode], 256 * 2**20)

    def write(self, stage, best, groups, *, mode, device):
        LOG.info("writing the merge with mergekit")
        recipe = self.recipe
        merge.write_merge(merge.mergekit_config(self.experts, best, groups, dtype=recipe.dtype, portable=False),
                          stage, device=str(device) if device.type == "cuda" else "cpu",
                          shard_bytes=self.shard_bytes(mode))
        merge.check_written(stage)
        mergekit_yaml = yaml.safe_dump(merge.mergekit_config(self.experts, best, groups, dtype=recipe.dtype,
                                                             portable=True, relative_to=recipe.base_dir),
                                       sort_keys=False)
        (stage / output.MERGEKIT_FILE).write_text(mergekit_yaml, encoding="utf-8")
        return mergekit_yaml

    def records(self, digests):
        base = self.base
        model = self.recipe.portable().base_model.model if base else None
        return {"base_model": report_mod.BaseModelRecord(model=model, revision=base.revision) if base else None,
                "lora": None}

    def headline(self) -> str:
        return (f"recipe {self.recipe.name!r}: {len(self.experts)} experts, "
                f"{self.experts[0].num_parameters / 1e6:.1f}M parameters each")


class LoraAdapters(ExpertKind):
    """LoRA adapters on one base: the base is pulled whole (every particle runs on it), the adapters are
    held in memory (a few MB each) and the winner is written as an adapter (and, on request, merged)."""

    adapters = True

    def __init__(self, recipe, experts, base):
        super().__init__(recipe, experts, base)
        self.bank = lora.AdapterBank(experts, base, space=recipe.swarm.lora_space)

    def tensor_names(self) -> List[str]:
        return self.bank.modules

    def weighed(self):
        return [*self.experts, self.base]

    def estimate(self):
        return lora.memory_estimate(self.base, self.bank.nbytes, self.recipe.dtype)

    def choose_mode(self, requested, budget):
        mode = super().choose_mode(requested, budget)
        if mode == "one-model":
            # The base is the one model, and the adapters are a few MB: that is in-memory.
            LOG.info("--eval-mode one-model with LoRA adapters is in-memory (the base is the one model held)")
            return "in-memory"
        return mode

    def evaluator(self, mode, groups, device):
        return lora.LoraEvaluator(self.bank, self.base, groups, dtype=self.recipe.dtype, device=device,
                                  streaming=mode == "streaming", tokenizer_path=self.tokenizer_path)

    def _base_ref(self) -> str:
        """How the written adapter names its base: the Hub id, or the folder relative to the recipe's."""
        return self.base.ref.model if not self.base.ref.is_local else relative_path(self.recipe, self.base.path)

    def write(self, stage, best, groups, *, mode, device):
        LOG.info("writing the winning adapter")
        lora.write_adapter(stage, self.bank, best, groups, self.base, base_model=self._base_ref(),
                           revision=self.base.revision)
        if self.recipe.output.merge_adapter:
            LOG.info("merging the adapter into the base (%s/)", lora.MERGED_DIR)
            lora.merge_adapter(stage, self.base, stage / lora.MERGED_DIR, dtype=self.recipe.dtype)
        return None

    def records(self, digests):
        bank, base = self.bank, self.base
        return {
            "base_model": report_mod.BaseModelRecord(model=self._base_ref(), revision=base.revision,
                                                     digest=digests[-1]),
            "lora": report_mod.LoraRecord(space=bank.space, rank=bank.rank, alpha=bank.alpha, rslora=bank.rslora,
                                          target_modules=bank.target_modules(base.tensors),
                                          merged=lora.MERGED_DIR if self.recipe.output.merge_adapter else None),
        }

    def extra_cards(self, stage, report, *, repo_id):
        if self.recipe.output.merge_adapter:
            from swarm_merge.publish import card

            card.render_merged_card(report, repo_id=repo_id).save(stage / lora.MERGED_DIR / output.CARD_FILE)

    def shape(self, expert):
        return f"LoRA r={expert.adapter.r} alpha={expert.adapter.alpha:g}, "

    def headline(self) -> str:
        base, bank, hb = self.base, self.bank, experts_mod.human_bytes
        return (f"recipe {self.recipe.name!r}: {len(self.experts)} LoRA adapters on {base.describe()} "
                f"({base.num_parameters / 1e6:.1f}M parameters, {hb(base.nbytes)}); lora_space {bank.space}: the "
                f"winner is a rank-{bank.rank} adapter")


def pull(recipe: Recipe, experts: List[experts_mod.Expert], options: RunOptions, out_dir: Path) -> ExpertKind:
    """The kind of the pulled ``experts``, with its base pulled (the caller runs this on one rank per
    machine first: the downloads go to a shared cache)."""
    if experts[0].adapter is not None:
        return LoraAdapters(recipe, experts, _pull_lora_base(recipe, experts, options, out_dir))
    if recipe.output.merge_adapter:
        raise RecipeError("output.merge_adapter applies to LoRA adapter experts, and these are full models; "
                          "drop it from the recipe")
    return FullModels(recipe, experts, _pull_base(recipe, options))


def _pull_base(recipe: Recipe, options: RunOptions) -> Optional[experts_mod.Expert]:
    """The base model's config and tokenizer (no weights: the swarm merges experts only)."""
    ref = recipe.base_model
    if ref is None:
        return None
    path, commit = experts_mod.pull_model_files(ref, cache_dir=options.cache_dir, what="base_model")
    return experts_mod.Expert(ref=ref, path=path, revision=commit, config={}, tensors={})


def _pull_lora_base(recipe: Recipe, experts, options: RunOptions, out_dir: Path) -> experts_mod.Expert:
    """The adapters' base with its weights: the recipe's base_model, or the one the adapters name."""
    ref, _ = lora.base_of(experts, recipe.base_model)
    base = experts_mod.pull_expert(ref, cache_dir=options.cache_dir, what="base_model", download=not options.dry_run)
    if base.adapter is not None:
        raise ExpertError(f"base_model {ref.model!r} is itself a LoRA adapter; point at the full base model")
    if base.pickled and options.dry_run:
        raise ExpertError(f"--dry-run: base_model {ref.model!r} has pickled weights, whose tensors are "
                                      "not known without downloading them; run without --dry-run")
    if base.ref.is_local:  # the output folder stays clear of it, as of every input
        output.check_path(out_dir, inputs=[(f"the base model {ref.model!r}", str(base.path))],
                          recipe_dir=recipe.base_dir)
    return base
