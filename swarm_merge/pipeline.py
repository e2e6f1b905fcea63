"""The whole run, top to bottom, one stage per module:

recipe -> output folder checked (output.py) -> pull experts (experts.py) ->
search space (space.py) -> inputs checked: data, tokenizer, finite weights
(objectives.py, evaluate.py, weights.py) -> swarm search, each particle built
and scored (search.py, swarm.py, weights.py, evaluate.py, objectives.py) ->
write the winner with mergekit (merge.py) -> report (report.py) -> card
(card.py) -> publish (output.py) -> push (hub.py).

Every check that can fail on bad input runs before the output folder is
claimed, so bad input writes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import yaml

from swarm_merge import card, evaluate, experts as experts_mod, merge, objectives, output, report as report_mod
from swarm_merge import lora, search, space, weights
from swarm_merge.errors import RecipeError
from swarm_merge.options import RunOptions
from swarm_merge.recipe import Recipe
from swarm_merge.report import Report

__all__ = ["run"]

LOG = logging.getLogger(__name__)


def run(recipe: Recipe, options: RunOptions = RunOptions(), *, out=None) -> Optional[Report]:
    """Run a recipe end to end; returns the report (``swarm.json``), or None for a dry run.

    ``out`` receives the plan and the final table (default: the current sys.stdout).
    """
    out = out or sys.stdout
    started = time.monotonic()
    evaluate.check_device(options.device)
    output.check_flags(resume=options.resume, force=options.force)
    push_to = options.push_to_hub or recipe.output.push_to_hub
    out_dir = output.check_path(options.out_dir or recipe.output_dir, inputs=_inputs(recipe, options),
                                recipe_dir=recipe.base_dir)
    # Read-only checks, a dry run's too: it validates everything it can without the weights.
    output.check_contents(out_dir, resume=options.resume, force=options.force)
    if push_to:
        from swarm_merge import hub

        hub.require_token(push_to)  # fail now, not after the search

    # 1. Pull the experts and check them from their headers.
    # A dry run resolves Hub experts (commit, sizes, headers) without downloading weights.
    experts = experts_mod.pull_experts(recipe.experts, cache_dir=options.cache_dir,
                                       allow_pickle=recipe.allow_pickle, download=not options.dry_run)
    k = len(experts)
    bank = None
    if experts[0].adapter is not None:
        # LoRA experts: the base is pulled whole (it is what every particle runs on),
        # and the adapters are checked against it and held in memory (a few MB each).
        base = _pull_lora_base(recipe, experts, options, out_dir)
        bank = lora.AdapterBank(experts, base, space=recipe.swarm.lora_space)
        names = bank.modules
    else:
        if recipe.output.merge_adapter:
            raise RecipeError("output.merge_adapter applies to LoRA adapter experts, and these are full models; "
                              "drop it from the recipe")
        base = _pull_base(recipe, options)
        names = sorted(experts[0].tensors)
    groups, group_labels = space.tensor_groups(
        names, granularity=recipe.swarm.granularity, layer_groups=recipe.swarm.layer_groups
    )
    dev = objectives.load_examples(recipe.objective.dev, recipe.objective.type, recipe.objective.group_by)
    test = (
        objectives.load_examples(recipe.objective.test, recipe.objective.type, recipe.objective.group_by)
        if recipe.objective.test
        else None
    )
    test_in_dev = _overlap(dev, test)
    device = evaluate.resolve_device(options.device)
    tokenizer_path = base.path if base else experts[0].path
    evaluate.check_tokenizer(tokenizer_path, recipe.objective)
    if options.dry_run:
        _print_plan(recipe, experts, group_labels, dev, test, device, out_dir, push_to, out, options, bank=bank,
                    base=base)
        return None
    # Non-finite weights are bad input; the content goes into the fingerprint.
    digests = weights.scan_experts(experts + ([base] if bank else []))
    base_digest = digests.pop() if bank else None

    with output.OutputFolder(out_dir, resume=options.resume, force=options.force) as folder:
        # 2. The swarm search over coefficient arrays (G, K).
        mode = _eval_mode(recipe, experts, device, options, bank=bank, base=base)
        LOG.info("evaluation: %s on %s", mode, device)
        if bank is not None:
            evaluator = lora.LoraEvaluator(bank, base, groups, dtype=recipe.dtype, device=device,
                                           streaming=mode == "streaming", tokenizer_path=tokenizer_path)
        else:
            evaluator = evaluate.make_evaluator(mode, experts, groups, dtype=recipe.dtype, device=device,
                                                tokenizer_path=tokenizer_path)
        result = search.run_search(
            recipe.swarm,
            num_experts=k,
            num_groups=len(group_labels),
            evaluate=functools.partial(evaluator.evaluate, examples=dev, objective=recipe.objective),
            checkpoint=folder.state_path,
            fingerprint=_fingerprint(recipe, digests + ([base_digest] if base_digest else [])),
            resume=options.resume,
            progress=options.progress,
            started=started,
        )

        # 3. Score the experts, the uniform soup and the winner (dev from the memo).
        LOG.info("scoring the experts, the uniform average and the winner%s", " on the test set" if test else "")
        scores = _scores(recipe, experts, result, evaluator, dev, test, len(group_labels))

        # 4. Write the winner with mergekit, the report and the card into a
        #    staging folder, then publish them (output.py: atomic as seen by a user).
        # The evaluator's memory (K experts in memory mode, one model in
        # one-model mode) is not needed to write: free it first.
        del evaluator
        _free(device)
        stage = folder.new_stage()
        if bank is not None:
            LOG.info("writing the winning adapter")
            base_id = _portable_ref(recipe, base)
            lora.write_adapter(stage, bank, result.best, groups, base, base_model=base_id, revision=base.revision)
            if recipe.output.merge_adapter:
                LOG.info("merging the adapter into the base (%s/)", lora.MERGED_DIR)
                lora.merge_adapter(stage, base, stage / lora.MERGED_DIR, dtype=recipe.dtype)
            mergekit_yaml = None
        else:
            LOG.info("writing the merge with mergekit")
            merge.write_merge(
                merge.mergekit_config(experts, result.best, groups, dtype=recipe.dtype, portable=False),
                stage, device=str(device) if device.type == "cuda" else "cpu",
                shard_bytes=_shard_bytes(mode, experts, recipe),
            )
            mergekit_yaml = yaml.safe_dump(
                merge.mergekit_config(experts, result.best, groups, dtype=recipe.dtype, portable=True,
                                      relative_to=recipe.base_dir),
                sort_keys=False,
            )
            (stage / output.MERGEKIT_FILE).write_text(mergekit_yaml, encoding="utf-8")
        report = _report(recipe, experts, digests, base, result, scores, group_labels, device, started,
                         dev=dev, test=test, test_in_dev=test_in_dev, bank=bank, base_digest=base_digest)
        recipe_yaml = yaml.safe_dump(report.recipe.model_dump(mode="json"), sort_keys=False)
        plot = card.plot_history(report.search.history, stage / output.PLOT_FILE, title=recipe.name)
        model_card = card.render_card(report, recipe_yaml=recipe_yaml, mergekit_yaml=mergekit_yaml,
                                      repo_id=push_to, plot=output.PLOT_FILE if plot else None)
        model_card.save(stage / output.CARD_FILE)
        if bank is not None and recipe.output.merge_adapter:
            card.render_merged_card(report, repo_id=push_to).save(stage / lora.MERGED_DIR / output.CARD_FILE)
        report_mod.write(stage / output.REPORT_FILE, report)
        folder.publish(stage)
    _print_table(report, out)
    print(f"wrote {out_dir}  (winner dev {card.fmt(report.scores.winner.dev.utility)})", file=out)

    # 5. Push.
    if push_to:
        from swarm_merge import hub

        url = hub.push(out_dir, push_to, private=recipe.output.private, report=report)
        print(f"pushed to {push_to}: {url}", file=out)
    return report


# ------------------------------------------------------------------ stages


def _inputs(recipe: Recipe, options: RunOptions) -> List[tuple]:
    """What the output folder must stay clear of: every local input and the Hub cache."""
    from huggingface_hub import constants

    found = recipe.local_inputs()
    found.append(("the Hub cache", options.cache_dir or constants.HF_HUB_CACHE))
    return found


def _estimate(recipe: Recipe, experts, *, bank=None, base=None):
    if bank is not None:
        return lora.memory_estimate(base, bank.nbytes, recipe.dtype)
    return evaluate.memory_estimate(experts, recipe.dtype)


def _eval_mode(recipe: Recipe, experts, device, options: RunOptions, *, bank=None, base=None) -> str:
    """The fastest mode whose weight memory fits the budget (see evaluate.choose_mode)."""
    estimate = _estimate(recipe, experts, bank=bank, base=base)
    budget = evaluate.memory_budget(device, options.max_memory)
    return evaluate.choose_mode(options.eval_mode, estimate, budget)


def _pull_base(recipe: Recipe, options: RunOptions) -> Optional[experts_mod.Expert]:
    """The base model's config and tokenizer (no weights: the swarm merges experts only)."""
    ref = recipe.base_model
    if ref is None:
        return None
    if ref.is_local:
        path = Path(ref.model).expanduser()
        if not (path / "config.json").is_file():
            raise experts_mod.ExpertError(f"base_model {ref.model!r}: no config.json there; point at a model folder")
        return experts_mod.Expert(ref=ref, path=path, revision=None, config={}, tensors={})
    from swarm_merge import hub

    path, commit = hub.download(ref, cache_dir=options.cache_dir, allow_patterns=experts_mod.SMALL_PATTERNS,
                                what="base_model")
    return experts_mod.Expert(ref=ref, path=path, revision=commit, config={}, tensors={})


def _pull_lora_base(recipe: Recipe, experts, options: RunOptions, out_dir: Path) -> experts_mod.Expert:
    """The adapters' base with its weights: the recipe's base_model, or the one the adapters name."""
    ref, _ = lora.base_of(experts, recipe.base_model)
    base = experts_mod.pull_expert(ref, cache_dir=options.cache_dir, what="base_model", download=not options.dry_run)
    if base.adapter is not None:
        raise experts_mod.ExpertError(f"base_model {ref.model!r} is itself a LoRA adapter; point at the full base model")
    if base.pickled and options.dry_run:
        raise experts_mod.ExpertError(f"--dry-run: base_model {ref.model!r} has pickled weights, whose tensors are "
                                      "not known without downloading them; run without --dry-run")
    if base.ref.is_local:  # the output folder stays clear of it, as of every input
        output.check_path(out_dir, inputs=[(f"the base model {ref.model!r}", str(base.path))],
                          recipe_dir=recipe.base_dir)
    return base


def _portable_ref(recipe: Recipe, base) -> str:
    """How the written adapter names its base: the Hub id, or the folder relative to the recipe's."""
    if not base.ref.is_local:
        return base.ref.model
    if recipe.base_dir is None:
        return str(base.path)
    relative = os.path.relpath(Path(base.path).resolve(), recipe.base_dir)
    return relative if relative.startswith("..") else os.path.join(".", relative)


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _shard_bytes(mode: str, experts, recipe: Recipe) -> Optional[int]:
    """Output shard size for mergekit, so the final write stays near the mode's
    memory: mergekit's default (one shard up to 5 GB) in memory mode, shards of
    about the one-model / streaming estimate otherwise (at least 256 MiB)."""
    if mode == "in-memory":
        return None
    estimate = evaluate.memory_estimate(experts, recipe.dtype)
    return max(estimate[mode], 256 * 2**20)


def _overlap(dev, test) -> int:
    """Test rows that also appear in the dev set (same prompt, answer and choices)."""
    if test is None:
        return 0
    seen = {(e.prompt, json.dumps(e.answer), e.choices) for e in dev}
    n = sum((e.prompt, json.dumps(e.answer), e.choices) in seen for e in test)
    if n:
        LOG.warning("%d of the %d test rows also appear in the dev set: the test score is not a held-out measure",
                    n, len(test))
    return n


def _fingerprint(recipe: Recipe, digests: List[str]) -> str:
    """What a checkpoint must match to be resumed: the search inputs (the recipe
    without its output settings, the experts' weight bytes, the dev rows)."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.portable().model_dump(mode="json", exclude={"output"}), sort_keys=True).encode())
    for digest in digests:
        h.update(digest.encode())
    h.update(Path(recipe.objective.dev).read_bytes())
    return h.hexdigest()


def _scores(recipe, experts, result, evaluator, dev, test, num_groups) -> report_mod.Scores:
    k = len(experts)
    candidates = [(e.name, "expert", np.tile(np.eye(k)[i], (num_groups, 1))) for i, e in enumerate(experts)]
    candidates.append(("uniform average", "uniform", np.full((num_groups, k), 1.0 / k)))
    candidates.append(("swarm winner", "winner", result.best))
    rows = []
    for name, kind, x in candidates:
        dev_score = result.lookup(x) or evaluator.evaluate(x, dev, recipe.objective)
        test_score = evaluator.evaluate(x, test, recipe.objective) if test is not None else None
        rows.append(report_mod.ScoreRow(
            name=name, kind=kind, coefficients=np.asarray(x, dtype=float).tolist(), dev=report_mod.Split.of(dev_score),
            test=report_mod.Split.of(test_score) if test_score else None,
        ))
    return report_mod.Scores(rows=rows)


def _report(recipe, experts, digests, base, result, scores, group_labels, device, started, *, dev, test,
            test_in_dev, bank=None, base_digest=None) -> Report:
    import mergekit
    import torch
    import transformers

    from swarm_merge import __version__

    portable = recipe.portable()
    state = result.state
    return Report(
        recipe=portable,
        experts=[
            report_mod.ExpertRecord(
                name=e.name,
                model=ref.model,
                local=e.ref.is_local,
                requested_revision=e.ref.revision,
                revision=e.revision,
                parameters=e.num_parameters,
                license=card.expert_license(e.path),
                pickled=e.pickled,
                digest=digest,
                adapter=(report_mod.AdapterRecord(r=e.adapter.r, alpha=e.adapter.alpha, rslora=e.adapter.rslora,
                                                  target_modules=e.adapter.target_names, base_model=e.adapter.base)
                         if e.adapter else None),
            )
            for e, ref, digest in zip(experts, portable.experts, digests)
        ],
        base_model=(report_mod.BaseModelRecord(
            model=_portable_ref(recipe, base) if bank else portable.base_model.model, revision=base.revision,
            digest=base_digest) if base else None),
        lora=(report_mod.LoraRecord(
            space=bank.space, rank=bank.rank, alpha=bank.alpha, rslora=bank.rslora,
            target_modules=bank.target_modules(base.tensors),
            merged=lora.MERGED_DIR if recipe.output.merge_adapter else None) if bank else None),
        coefficients=report_mod.Coefficients.of(result.best, group_labels),
        scores=scores,
        data=report_mod.DataRecord(dev_rows=len(dev), test_rows=len(test) if test is not None else None,
                                   test_rows_in_dev=test_in_dev),
        search=report_mod.SearchRecord(
            iterations=state.iteration,
            evaluations=state.evaluations,
            distinct_positions_scored=len(result.memo),
            stop_reason=result.stop_reason,
            resumed=result.resumed,
            seconds=round(result.seconds, 3),
            history=result.history,
        ),
        # This session's wall time plus the earlier sessions' (from the checkpoint).
        wall_seconds=round(result.wall_before + time.monotonic() - started, 3),
        hardware=_hardware(device),
        versions={"swarm_merge": __version__, "mergekit": getattr(mergekit, "__version__", "0.1.x"),
                  "torch": torch.__version__, "transformers": transformers.__version__},
    )


def _hardware(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ----------------------------------------------------------------- printing


def _print_plan(recipe, experts, group_labels, dev, test, device, out_dir, push_to, out,
                options: RunOptions = RunOptions(), *, bank=None, base=None) -> None:
    k = len(experts)
    model_bytes = max(e.nbytes for e in experts)
    params = experts[0].num_parameters
    hb = experts_mod.human_bytes
    if bank is not None:
        print(f"recipe {recipe.name!r}: {k} LoRA adapters on {base.describe()} ({base.num_parameters / 1e6:.1f}M "
              f"parameters, {hb(base.nbytes)}); lora_space {bank.space}: the winner is a rank-{bank.rank} adapter",
              file=out)
    else:
        print(f"recipe {recipe.name!r}: {k} experts, {params / 1e6:.1f}M parameters each", file=out)
    for e in experts:
        if e.ref.is_local:
            shape = f"LoRA r={e.adapter.r} alpha={e.adapter.alpha:g}, " if e.adapter else ""
            print(f"  {e.ref.model}  " + ("pickled weights (allow_pickle): converted and checked on the run"
                                          if e.pickled else f"{shape}weights {hb(e.nbytes)}"), file=out)
            continue
        asked = f" (asked {e.ref.revision})" if e.ref.revision and e.ref.revision != e.revision else ""
        size = f"weights {hb(e.nbytes)}, " if not e.pickled else ""
        shape = f"LoRA r={e.adapter.r} alpha={e.adapter.alpha:g}, " if e.adapter else ""
        print(f"  {e.ref.model} @ {e.revision}{asked}  {shape}{size}download {hb(e.download_bytes or 0)}", file=out)
        if e.pickled:
            print("    pickled weights (allow_pickle): assumed to match the others; checked after the download", file=out)
    s = recipe.swarm
    print(f"swarm: size {s.size}, granularity {s.granularity} ({len(group_labels)} group(s), "
          f"{len(group_labels) * k} coefficients), at most {s.max_iterations} iterations", file=out)
    from swarm_merge.swarm import budget

    print(f"evaluations: at most {budget(s)} on {len(dev)} dev rows ({recipe.objective.type})"
          + (f"; then {k + 2} on {len(test)} test rows" if test else ""), file=out)
    estimate = _estimate(recipe, experts, bank=bank, base=base)
    budget_bytes = evaluate.memory_budget(device, options.max_memory)
    mode = evaluate.choose_mode(options.eval_mode, estimate, budget_bytes)
    print(f"device: {device}; dtype {recipe.dtype}; experts on disk {hb(k * model_bytes)}", file=out)
    print(f"estimated weight memory: in-memory {hb(estimate['in-memory'])}, one-model {hb(estimate['one-model'])}, "
          f"streaming {hb(estimate['streaming'])} (+ activations); budget {hb(budget_bytes)} -> eval mode: {mode}"
          + (" (auto)" if options.eval_mode == "auto" else ""), file=out)
    print(f"output: {out_dir}" + (f"; push to {push_to}" if push_to else ""), file=out)
    print("dry run: nothing was written (the run also reads every weight once, refusing NaN or inf)", file=out)


def _print_table(report: Report, out) -> None:
    rows = report.scores.rows
    width = max(len(r.name) for r in rows) + 2
    has_test = report.scores.has_test
    print(f"\n{'model':<{width}}{'dev':>10}" + (f"{'test':>10}" if has_test else ""), file=out)
    for r in rows:
        line = f"{r.name:<{width}}{card.fmt(r.dev.utility):>10}"
        if has_test:
            line += f"{card.fmt(r.test.utility if r.test else None):>10}"
        print(line, file=out)
    c = report.coefficients
    if c.model is not None:
        print("coefficients: " + ", ".join(f"{e.name} {a:+.4f}" for e, a in zip(report.experts, c.model)), file=out)
    if report.data.test_rows_in_dev:
        print(f"warning: {report.data.test_rows_in_dev} of the {report.data.test_rows} test rows are also dev rows: "
              "the test column is not held out", file=out)
    s = report.search
    print(f"search: {s.iterations} iterations, {s.evaluations} evaluations, {s.stop_reason}, "
          f"{report.wall_seconds:.0f} s", file=out)
