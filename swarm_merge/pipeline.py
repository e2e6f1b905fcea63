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
from swarm_merge import search, space, weights
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
    groups, group_labels = space.tensor_groups(
        sorted(experts[0].tensors), granularity=recipe.swarm.granularity, layer_groups=recipe.swarm.layer_groups
    )
    base = _pull_base(recipe, options)
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
        _print_plan(recipe, experts, group_labels, dev, test, device, out_dir, push_to, out, options)
        return None
    digests = weights.scan_experts(experts)  # non-finite weights are bad input; content for the fingerprint

    with output.OutputFolder(out_dir, resume=options.resume, force=options.force) as folder:
        # 2. The swarm search over coefficient arrays (G, K).
        mode = _eval_mode(recipe, experts, device, options)
        LOG.info("evaluation: %s on %s", mode, device)
        evaluator = evaluate.make_evaluator(mode, experts, groups, dtype=recipe.dtype, device=device,
                                            tokenizer_path=tokenizer_path)
        result = search.run_search(
            recipe.swarm,
            num_experts=k,
            num_groups=len(group_labels),
            evaluate=functools.partial(evaluator.evaluate, examples=dev, objective=recipe.objective),
            checkpoint=folder.state_path,
            fingerprint=_fingerprint(recipe, digests),
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
                         dev=dev, test=test, test_in_dev=test_in_dev)
        recipe_yaml = yaml.safe_dump(report.recipe.model_dump(mode="json"), sort_keys=False)
        plot = card.plot_history(report.search.history, stage / output.PLOT_FILE, title=recipe.name)
        model_card = card.render_card(report, recipe_yaml=recipe_yaml, mergekit_yaml=mergekit_yaml,
                                      repo_id=push_to, plot=output.PLOT_FILE if plot else None)
        model_card.save(stage / output.CARD_FILE)
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


def _eval_mode(recipe: Recipe, experts, device, options: RunOptions) -> str:
    """in-memory when the experts plus one model fit the memory budget, else streaming."""
    estimate = evaluate.memory_estimate(experts, recipe.dtype)
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
            test_in_dev) -> Report:
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
            )
            for e, ref, digest in zip(experts, portable.experts, digests)
        ],
        base_model=(report_mod.BaseModelRecord(model=portable.base_model.model, revision=base.revision)
                    if base else None),
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
                options: RunOptions = RunOptions()) -> None:
    k = len(experts)
    model_bytes = max(e.nbytes for e in experts)
    params = experts[0].num_parameters
    print(f"recipe {recipe.name!r}: {k} experts, {params / 1e6:.1f}M parameters each", file=out)
    hb = experts_mod.human_bytes
    for e in experts:
        if e.ref.is_local:
            print(f"  {e.ref.model}  " + ("pickled weights (allow_pickle): converted and checked on the run"
                                          if e.pickled else f"weights {hb(e.nbytes)}"), file=out)
            continue
        asked = f" (asked {e.ref.revision})" if e.ref.revision and e.ref.revision != e.revision else ""
        size = f"weights {hb(e.nbytes)}, " if not e.pickled else ""
        print(f"  {e.ref.model} @ {e.revision}{asked}  {size}download {hb(e.download_bytes or 0)}", file=out)
        if e.pickled:
            print("    pickled weights (allow_pickle): assumed to match the others; checked after the download", file=out)
    s = recipe.swarm
    print(f"swarm: size {s.size}, granularity {s.granularity} ({len(group_labels)} group(s), "
          f"{len(group_labels) * k} coefficients), at most {s.max_iterations} iterations", file=out)
    from swarm_merge.swarm import budget

    print(f"evaluations: at most {budget(s)} on {len(dev)} dev rows ({recipe.objective.type})"
          + (f"; then {k + 2} on {len(test)} test rows" if test else ""), file=out)
    estimate = evaluate.memory_estimate(experts, recipe.dtype)
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
