"""The whole run, top to bottom, one stage per module:

recipe -> output folder checked (output.py) -> pull experts (experts.py) ->
search space (space.py) -> inputs checked: data, tokenizer, finite weights
(objectives.py, evaluate.py, weights.py) -> swarm search, each particle built
and scored, raced on stages of the dev rows (search.py, swarm.py, racing.py,
weights.py, evaluate.py, objectives.py) ->
write the winner with mergekit (merge.py) -> report (report.py) -> card
(card.py) -> publish (output.py) -> push (hub.py).

Every check that can fail on bad input runs before the output folder is
claimed, so bad input writes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import platform
import sys
import time
import zlib
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import yaml

from swarm_merge import card, evaluate, experts as experts_mod, merge, objectives, output, report as report_mod
from swarm_merge import distributed, lora, racing, search, space, weights
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
    try:
        return _run(recipe, options, out=out)
    finally:  # a reward or judge model and lm-eval's task index are this run's: no memory held after it,
        objectives.release()  # and a later run in this process (ci run, a library user) reads its own files


def _run(recipe: Recipe, options: RunOptions, *, out=None) -> Optional[Report]:
    out = out or sys.stdout
    started = time.monotonic()
    evaluate.check_device(options.device)
    # Several processes (accelerate launch / --num-processes): every rank runs this
    # function; the evaluations are spread, only the main rank prints and writes.
    ranks = distributed.current(evaluate.resolve_device(options.device).type)
    if not ranks.is_main:
        out = io.StringIO()
        LOG.setLevel(logging.WARNING)
        logging.getLogger("swarm_merge").setLevel(logging.WARNING)
    output.check_flags(resume=options.resume, force=options.force)
    push_to = options.push_to_hub or recipe.output.push_to_hub
    out_dir = output.check_path(options.out_dir or recipe.output_dir, inputs=_inputs(recipe, options),
                                recipe_dir=recipe.base_dir)
    # Read-only checks, a dry run's too: it validates everything it can without the weights.
    output.check_contents(out_dir, resume=options.resume, force=options.force)
    if push_to and options.check_token:
        from swarm_merge import hub

        hub.require_token(push_to)  # fail now, not after the search

    # 1. Pull the experts and check them from their headers.
    # A dry run resolves Hub experts (commit, sizes, headers) without downloading weights.
    with ranks.local_main_first():  # one download per machine, into the shared cache
        experts = experts_mod.pull_experts(recipe.experts, cache_dir=options.cache_dir,
                                           allow_pickle=recipe.allow_pickle, download=not options.dry_run)
    k = len(experts)
    bank = None
    if experts[0].adapter is not None:
        # LoRA experts: the base is pulled whole (it is what every particle runs on),
        # and the adapters are checked against it and held in memory (a few MB each).
        with ranks.local_main_first():
            base = _pull_lora_base(recipe, experts, options, out_dir)
        bank = lora.AdapterBank(experts, base, space=recipe.swarm.lora_space)
        names = bank.modules
    else:
        if recipe.output.merge_adapter:
            raise RecipeError("output.merge_adapter applies to LoRA adapter experts, and these are full models; "
                              "drop it from the recipe")
        with ranks.local_main_first():
            base = _pull_base(recipe, options)
        names = sorted(experts[0].tensors)
    groups, group_labels = space.tensor_groups(
        names, granularity=recipe.swarm.granularity, layer_groups=recipe.swarm.layer_groups
    )
    # One objective and its rows, or a Suite of several and each one's rows.
    code = objectives.load_code(options.objective_code) if options.objective_code else None
    objective, dev, test = objectives.task_of(recipe, code, allow_task_code=options.allow_task_code,
                                              allow_benchmark=options.allow_benchmark_tasks)
    race = racing.race_of(recipe.swarm, objective, dev)
    with ranks.local_main_first():
        objective, objective_models = _pull_objective_models(objective, options)
    test_in_dev = _overlap(dev, test)
    device = evaluate.resolve_device(options.device)
    if device.type == "cuda":  # one GPU per process on its machine
        import torch

        device = distributed.device_for(device, ranks, torch.cuda.device_count())
    tokenizer_path = base.path if base else experts[0].path
    for component in recipe.components:
        evaluate.check_tokenizer(tokenizer_path, component)
    if options.dry_run:
        _print_plan(recipe, experts, group_labels, dev, test, device, out_dir, push_to, out, options, bank=bank,
                    base=base, objective=objective, objective_models=objective_models, ranks=ranks, race=race)
        return None
    # Non-finite weights are bad input; the content goes into the fingerprint (read once, by the main rank).
    digests = ranks.broadcast(weights.scan_experts(experts + ([base] if bank else [])) if ranks.is_main else None)
    base_digest = digests.pop() if bank else None

    # Only the main rank claims and writes the output folder.
    claimed = (output.OutputFolder(out_dir, resume=options.resume, force=options.force) if ranks.is_main
               else contextlib.nullcontext(output.Unclaimed(out_dir)))
    with claimed as folder:
        # 2. The swarm search over coefficient arrays (G, K).
        mode = _eval_mode(recipe, experts, device, options, bank=bank, base=base,
                          objective_bytes=sum(m[3] for m in objective_models), ranks=ranks)
        mode = ranks.broadcast(mode)  # the main rank's choice, on every rank
        LOG.info("evaluation: %s on %s", mode, device)
        race = _streaming_race(race, mode, recipe)
        if bank is not None:
            evaluator = lora.LoraEvaluator(bank, base, groups, dtype=recipe.dtype, device=device,
                                           streaming=mode == "streaming", tokenizer_path=tokenizer_path)
        else:
            evaluator = evaluate.make_evaluator(mode, experts, groups, dtype=recipe.dtype, device=device,
                                                tokenizer_path=tokenizer_path)
        evaluator.max_rows = objectives.row_count(dev)
        try:
            result = search.run_search(
                recipe.swarm,
                num_experts=k,
                num_groups=len(group_labels),
                evaluate=functools.partial(evaluator.evaluate, examples=dev, objective=objective),
                checkpoint=folder.state_path,
                fingerprint=_fingerprint(recipe, digests + ([base_digest] if base_digest else []), options,
                                         folders=[e.path for e in experts] + ([base.path] if base else []),
                                         objective_models=[(m[1], m[2]) for m in objective_models]),
                resume=options.resume,
                progress=options.progress,
                started=started,
                ranks=ranks,
                race=race,
                evaluate_rows=_rows_scorer(evaluator, race, objective),
            )

            # 3. Score the experts, the uniform soup and the winner (dev from the memo).
            LOG.info("scoring the experts, the uniform average and the winner%s", " on the test set" if test else "")
            scores, test_rows = _scores(objective, experts, result, evaluator, dev, test, len(group_labels), ranks)
            comparison = None
            if options.baselines:
                comparison = _compare(recipe, objective, result, evaluator, dev, test, k, len(group_labels), options,
                                      experts=experts, adapters=bank is not None, ranks=ranks, race=race)
            analysis = _analysis(recipe, objective, experts, result, scores, test_rows, test, comparison)
            if not ranks.is_main:  # the main rank writes, publishes and pushes
                return None
        finally:  # the expert files it reads stay open until here (on error too)
            evaluator.close()

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
            _check_written(stage)
            mergekit_yaml = yaml.safe_dump(
                merge.mergekit_config(experts, result.best, groups, dtype=recipe.dtype, portable=True,
                                      relative_to=recipe.base_dir),
                sort_keys=False,
            )
            (stage / output.MERGEKIT_FILE).write_text(mergekit_yaml, encoding="utf-8")
        report = _report(recipe, experts, digests, base, result, scores, group_labels, device, started,
                         dev=dev, test=test, test_in_dev=test_in_dev, bank=bank, base_digest=base_digest,
                         analysis=analysis, comparison=comparison, objective_models=objective_models)
        pinned = [*report.experts, *([report.base_model] if report.base_model else []), *report.objective_models]
        pins = {m.model: m.revision for m in pinned if m.revision}
        recipe_yaml = yaml.safe_dump(recipe.as_written(pins), sort_keys=False)
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


def _eval_mode(recipe: Recipe, experts, device, options: RunOptions, *, bank=None, base=None,
               objective_bytes: int = 0, ranks: Optional[distributed.Ranks] = None) -> str:
    """The fastest mode whose weight memory fits the budget (see evaluate.choose_mode), the
    objective models (reward models, held for the whole run) taken off the budget first."""
    estimate = _estimate(recipe, experts, bank=bank, base=base)
    budget = _process_budget(device, options, ranks) - objective_bytes
    mode = evaluate.choose_mode(options.eval_mode, estimate, budget)
    if bank is not None and mode == "one-model":
        # LoRA adapters: the base is the one model, and the adapters are a few MB: that is in-memory.
        LOG.info("--eval-mode one-model with LoRA adapters is in-memory (the base is the one model held)")
        return "in-memory"
    return mode


def _process_budget(device, options: RunOptions, ranks: Optional[distributed.Ranks]) -> int:
    """The memory one process may use: the machine's RAM is shared by its processes
    (each GPU is its own); ``--max-memory`` is per process."""
    budget = evaluate.memory_budget(device, options.max_memory)
    if options.max_memory is None and device.type == "cpu" and ranks is not None and ranks.local_world > 1:
        budget //= ranks.local_world
    return budget


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


def _relative(recipe: Recipe, path) -> str:
    if recipe.base_dir is None:
        return str(path)
    relative = os.path.relpath(Path(path).resolve(), recipe.base_dir)
    return relative if relative.startswith("..") else os.path.join(".", relative)


def _portable_ref(recipe: Recipe, base) -> str:
    """How the written adapter names its base: the Hub id, or the folder relative to the recipe's."""
    return base.ref.model if not base.ref.is_local else _relative(recipe, base.path)


def _pull_objective_models(objective, options: RunOptions):
    """Reward and judge models: pulled (Hub repos pinned to a commit), checked, and the runtime objective
    pointed at the local folder. Returns (objective, [(ref, folder, commit or None, bytes)])."""
    from swarm_merge.recipe import ExpertRef

    found = []

    def pulled(o):
        kind = getattr(o, "type", None)
        if kind not in ("reward", "judge"):
            return o
        key = f"{kind}_model"
        ref = getattr(o, key)
        if ref.is_local:
            path, commit = Path(ref.model).expanduser(), None
            if not (path / "config.json").is_file():
                raise experts_mod.ExpertError(f"{kind} model {ref.model!r}: no config.json there; point at a saved "
                                              "transformers model folder")
        else:
            from swarm_merge import hub

            path, commit = hub.download(ref, cache_dir=options.cache_dir, what=f"{kind} model",
                                        allow_patterns=experts_mod.SMALL_PATTERNS + ["*.safetensors"])
        if kind == "reward":
            _check_reward_config(path, ref)
        else:  # a causal LM transformers builds without remote code, with safetensors weights, none missing
            experts_mod.index_folder(Path(path), f"judge model {str(ref)!r}", who=f"judge model {str(ref)!r}")
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        found.append((ref, Path(path), commit, size))
        return o.model_copy(update={key: ExpertRef(model=str(path))})

    if isinstance(objective, objectives.Suite):
        objective = objectives.Suite(tuple(pulled(o) for o in objective.parts), objective.combine)
    else:
        objective = pulled(objective)
    return objective, found


def _check_reward_config(path: Path, ref) -> None:
    """A sequence-classification architecture transformers has, with safetensors weights (no remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = experts_mod.read_json(Path(path) / "config.json", f"reward model {str(ref)!r}")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise experts_mod.ExpertError(f"reward model {str(ref)!r}: model_type {model_type!r} has no sequence "
                                      "classification class in transformers (remote code is never run); use a "
                                      "reward model of a supported architecture")
    if not any(Path(path).glob("*.safetensors")):
        raise experts_mod.ExpertError(f"reward model {str(ref)!r} has no *.safetensors weights; save it with "
                                      "safe_serialization")
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2  # transformers' default: 2
    if labels != 1:
        raise experts_mod.ExpertError(f"reward model {str(ref)!r} has {labels} outputs; use a reward model with one "
                                      "(num_labels: 1, a scalar reward head)")
    # Its score head and every other tensor its architecture needs (transformers would make up a missing one).
    label = f"reward model {str(ref)!r}"
    experts_mod.check_weights(Path(path), experts_mod.read_headers(Path(path), label), label,
                              task="sequence-classification")


def _check_written(folder: Path) -> None:
    """The model mergekit wrote is finite, read back tensor by tensor (one read of one model).
    The winner's build passed the same check during the search, but mergekit reads the experts
    in float32 where the evaluators read them converted to the recipe's dtype: near float16's
    limit the two roundings can differ, and a model with inf must never be published."""
    from safetensors import safe_open

    from swarm_merge.errors import EvaluationError

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not weights.is_finite(tensor):
                    raise EvaluationError(f"the merge mergekit wrote holds NaN or inf in {name!r} (the winner's "
                                          "weights overflow the recipe's dtype); use dtype: float32 or bfloat16, "
                                          "then run again with --force")


def _free(device) -> None:
    import gc

    gc.collect()
    evaluate.trim_heap()
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
    if dev and isinstance(dev[0], list):  # a suite: each component's test rows against its own dev rows
        return sum(_overlap(d, t) for d, t in zip(dev, test))
    seen = {(e.prompt, json.dumps(e.answer), e.choices) for e in dev}
    n = sum((e.prompt, json.dumps(e.answer), e.choices) in seen for e in test)
    if n:
        LOG.warning("%d of the %d test rows also appear in the dev set: the test score is not a held-out measure",
                    n, len(test))
    return n


def _fingerprint(recipe: Recipe, digests: List[str], options: RunOptions = RunOptions(), *,
                 folders: Sequence[Path] = (), objective_models: Sequence[tuple] = ()) -> str:
    """What a checkpoint must match to be resumed: everything that changes a score. The
    recipe without its output settings, the experts' weight bytes (``digests``), the
    small files of every model folder the run reads (``folders``: the experts' and the
    base's configs, tokenizer files, chat templates, generation config), the reward and
    judge models (``objective_models``: (folder, commit)): a Hub commit names its content,
    a local folder is hashed whole), the dev rows, lm-eval task folders and
    ``--objective-code``. Changing any of them between a kill and ``--resume`` would
    mix utilities of two different searches in one memo."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.portable().model_dump(mode="json", exclude={"output"}), sort_keys=True).encode())
    for digest in digests:
        h.update(digest.encode())
    for i, folder in enumerate(folders):
        _hash_files(h, f"model {i}", Path(folder), experts_mod.SMALL_PATTERNS, skip=("README.md",))
    for i, (folder, commit) in enumerate(objective_models):
        if commit:
            h.update(f"objective model {i}@{commit};".encode())
            continue
        _hash_files(h, f"objective model {i}", Path(folder), experts_mod.SMALL_PATTERNS + ["*.safetensors"],
                    skip=("README.md",))
    for component in recipe.components:
        if component.dev:
            h.update(Path(component.dev).read_bytes())
        if component.include_path:  # an lm-eval task's YAML and data files
            _hash_files(h, "task folder", Path(component.include_path), ["**/*"])
    if options.objective_code:  # another utility function: another search
        h.update(Path(options.objective_code.rpartition(":")[0]).read_bytes() + options.objective_code.encode())
    return h.hexdigest()


def _hash_files(h, label: str, folder: Path, patterns: Sequence[str], *, skip: Sequence[str] = ()) -> None:
    """Every regular file in ``folder`` matching ``patterns``, by relative name and content,
    in a fixed order (a file added, removed, renamed or edited changes the hash)."""
    found = sorted({f for pattern in patterns for f in folder.glob(pattern) if f.is_file() and f.name not in skip})
    h.update(f"{label}:{len(found)};".encode())
    for f in found:
        h.update(f"{f.relative_to(folder).as_posix()}:{f.stat().st_size};".encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)


def _streaming_race(race, mode: str, recipe: Recipe):
    """Streaming rebuilds every weight on each forward: a raced stage would cost another pass over the
    experts' weights, so ``racing: auto`` races only in the modes that build a particle once."""
    if race is not None and mode == "streaming" and recipe.swarm.racing == "auto":
        LOG.info("racing: off in streaming mode (each stage would read every weight again)")
        return None
    return race


def _rows_scorer(evaluator, race, objective):
    """Racing's scorer: ``(coefficients, stage) -> Score`` on that stage's dev rows (racing.Race.rows)."""
    if race is None:
        return None
    return lambda x, stage: evaluator.evaluate(x, race.rows(stage), objective)


def _spread(ranks, evaluator, objective, jobs):
    """Scores of ``jobs`` [(coefficients, rows)], spread over the ranks."""
    ranks = ranks or distributed.Ranks()
    return ranks.map(lambda job: evaluator.evaluate(job[0], job[1], objective), jobs)


def _scores(objective, experts, result, evaluator, dev, test, num_groups, ranks=None):
    k = len(experts)
    candidates = [(e.name, "expert", np.tile(np.eye(k)[i], (num_groups, 1))) for i, e in enumerate(experts)]
    candidates.append(("uniform average", "uniform", np.full((num_groups, k), 1.0 / k)))
    candidates.append(("swarm winner", "winner", result.best))
    jobs = [(x, dev) for _, _, x in candidates if result.lookup(x) is None]
    jobs += [(x, test) for _, _, x in candidates] if test is not None else []
    found = iter(_spread(ranks, evaluator, objective, jobs))
    dev_scores = [result.lookup(x) or next(found) for _, _, x in candidates]
    test_scores = [next(found) if test is not None else None for _ in candidates]
    rows, test_rows = [], {}
    for i, (name, kind, x) in enumerate(candidates):
        dev_score, test_score = dev_scores[i], test_scores[i]
        rows.append(report_mod.ScoreRow(
            name=name, kind=kind, coefficients=np.asarray(x, dtype=float).tolist(), dev=report_mod.Split.of(dev_score),
            test=report_mod.Split.of(test_score) if test_score else None,
        ))
        if test_score is not None:
            test_rows[(kind, i if kind == "expert" else 0)] = test_score.rows
    return report_mod.Scores(rows=rows), test_rows


def _compare(recipe, objective, result, evaluator, dev, test, k: int, g: int, options: RunOptions, *, experts,
             adapters: bool, ranks=None, race=None) -> report_mod.Comparison:
    """Random search, CMA-ES, a GP and NGOpt (and the swarm at other seeds) at the swarm's item budget
    (the dev rows it scored), through the run's evaluator and one memo shared with the swarm's (baselines.py)."""
    import tempfile

    from swarm_merge import baselines

    # The swarm's cost in dev rows buys each baseline this many whole-dev-set evaluations (without
    # racing: exactly the distinct positions the swarm scored).
    rows = result.best_score.n or objectives.row_count(dev)
    items = result.items
    budget = max(1, items // rows)
    memo = dict(result.memo)
    seeds = [recipe.swarm.seed + i for i in range(options.seeds)]

    def score_dev(x):
        return evaluator.evaluate(x, dev, objective)

    def distinct(r) -> int:
        return len(r.memo) + (r.raced["dropped"] if r.raced else 0)

    runs = [baselines.MethodRun("swarm", seeds[0], result.best, result.best_score, distinct(result), result.seconds,
                                items=items)]
    with tempfile.TemporaryDirectory(prefix="swarm-merge-seeds-") as tmp:
        for seed in seeds[1:]:
            LOG.info("comparison: the swarm at seed %d", seed)
            settings = recipe.swarm.model_copy(update={"seed": seed})
            other_race = racing.race_of(settings, objective, dev) if race is not None else None
            start = time.monotonic()
            other = search.run_search(
                settings, num_experts=k, num_groups=g, evaluate=baselines.Budgeted(score_dev, memo),
                checkpoint=Path(tmp) / f"seed-{seed}.json", fingerprint="comparison", progress=options.progress,
                ranks=ranks, race=other_race, evaluate_rows=_rows_scorer(evaluator, other_race, objective))
            runs.append(baselines.MethodRun("swarm", seed, other.best, other.best_score, distinct(other),
                                            time.monotonic() - start, items=other.items))
    optimisers = [baselines.cmaes_search, baselines.gp_search, baselines.ngopt_search]
    import importlib.util

    missing = [name for name in ("optuna", "nevergrad") if importlib.util.find_spec(name) is None]
    if missing:  # an optional extra: the table goes on without them, and says so on the terminal
        LOG.warning("compare: the GP and NGOpt baselines are skipped (%s not installed; pip install "
                    "'swarm-merge[search]')", " and ".join(missing))
        optimisers = optimisers[:1]
    for seed in seeds:
        LOG.info("comparison: random search, CMA-ES, GP and NGOpt at seed %d (%d dev evaluations each)", seed, budget)
        runs.append(baselines.random_search(baselines.Budgeted(score_dev, memo, ranks), num_experts=k, num_groups=g,
                                            budget=budget, seed=seed, seed_soup=recipe.swarm.seed_soup,
                                            init=recipe.swarm.init, spread=recipe.swarm.init_spread))
        for optimiser in optimisers:
            runs.append(optimiser(baselines.Budgeted(score_dev, memo, ranks), num_experts=k, num_groups=g,
                                  budget=budget, seed=seed))
    for r in runs:
        if r.items is None:
            r.items = r.evaluations * rows
    # The mergekit baselines read the base's tensors until their winners are scored on test.
    with contextlib.closing(weights.TensorReader()) as reader:
        mergekit_runs = (_mergekit_baselines(recipe, objective, evaluator, dev, experts, seeds, options, ranks,
                         reader) if not adapters else [])
        tests = {}
        if test is not None:
            distinct = {search.position_key(r.best): r.best for r in runs}
            tests = dict(zip(distinct, _spread(ranks, evaluator, objective, [(x, test) for x in distinct.values()])))
        records = []
        for r in runs:
            key = search.position_key(r.best)
            records.append(report_mod.MethodResult(
                method=r.method, seed=r.seed, coefficients=np.asarray(r.best, dtype=float).tolist(),
                dev=report_mod.Split.of(r.dev), test=report_mod.Split.of(tests[key]) if test is not None else None,
                evaluations=r.evaluations, items=r.items, seconds=round(r.seconds, 3)))
        for name, seed, _point, config, dev_score, tensor_of, seconds in mergekit_runs:
            test_score = evaluator.evaluate_weights(tensor_of, test, objective) if test is not None else None
            records.append(report_mod.MethodResult(
                method=name, seed=seed, config=config, dev=report_mod.Split.of(dev_score),
                test=report_mod.Split.of(test_score) if test_score else None,
                evaluations=len(baselines.MERGEKIT_GRID[name][1]), items=len(baselines.MERGEKIT_GRID[name][1]) * rows,
                seconds=round(seconds, 3)))
    summary = []
    for method in ("swarm", "random search", "CMA-ES", "GP (Optuna)", "NGOpt (Nevergrad)", "task arithmetic", "TIES",
                   "DARE"):
        mine = [r for r in records if r.method == method]
        if not mine:
            continue
        dev_s = baselines.summarize([r.dev.utility for r in mine])
        test_s = baselines.summarize([r.test.utility if r.test else None for r in mine])
        summary.append(report_mod.MethodSummary(
            method=method, seeds=len(mine), dev_mean=dev_s["mean"], dev_std=dev_s["std"], test_mean=test_s["mean"],
            test_std=test_s["std"], evaluations=max(r.evaluations for r in mine), items=max(r.items for r in mine),
            seconds_mean=round(float(np.mean([r.seconds for r in mine])), 3)))
    return report_mod.Comparison(budget=budget, items=items, seeds=seeds, runs=records, summary=summary)


def _mergekit_baselines(recipe, objective, evaluator, dev, experts, seeds, options: RunOptions, ranks,
                        reader) -> list:
    """Task arithmetic, TIES and DARE against the recipe's base_model, each at the small grid of
    baselines.MERGEKIT_GRID, through mergekit's own kernels on tensors in memory, put into the
    run's model and scored on dev; the best grid point is the method's winner.

    Returns (method, seed, point, mergekit config, dev score, tensor_of, seconds) per method and seed.
    """
    import torch

    from swarm_merge import baselines

    if recipe.base_model is None:
        LOG.info("comparison: no base_model in the recipe, so no task arithmetic / TIES / DARE baselines")
        return []
    if not hasattr(evaluator, "expert_rows"):
        LOG.warning("comparison: the mergekit baselines need --eval-mode in-memory or one-model; skipped")
        return []
    from swarm_merge.errors import SwarmMergeError

    try:  # after the search, a base that cannot be pulled or merged costs these rows, not the run
        base = experts_mod.pull_expert(recipe.base_model, cache_dir=options.cache_dir, what="base_model")
        experts_mod.check_compatible([base] + list(experts))
    except SwarmMergeError as exc:
        LOG.warning("comparison: no task arithmetic / TIES / DARE baselines (%s)", exc)
        return []
    dtype = evaluate.torch_dtype(recipe.dtype)
    # As swarm.json publishes them: Hub models pinned to their commit, local folders relative to the recipe's.
    paths = [merge.model_ref(e, portable=True, relative_to=recipe.base_dir) for e in experts]
    found = []
    for name, (method, grid) in baselines.MERGEKIT_GRID.items():
        for seed in (seeds if method.startswith("dare") else [None]):
            start = time.monotonic()
            best = None

            def maker(point, method=method, seed=seed):
                def tensor_of(tensor):
                    if seed is not None:  # DARE drops at random: the same draw for every tensor of a seed
                        torch.manual_seed(seed + zlib.crc32(tensor.encode()))
                    info = base.tensors[tensor]
                    b = weights.read_stacked(reader, [base], tensor, dtype)[0].view(info.shape)
                    rows = evaluator.expert_rows(tensor).to("cpu")
                    return baselines.mergekit_tensor(method, point, b, [r.view(info.shape) for r in rows])
                return tensor_of

            def score(point, name=name, seed=seed):
                LOG.info("comparison: %s %s%s", name, point, f" seed {seed}" if seed is not None else "")
                return evaluator.evaluate_weights(maker(point), dev, objective)

            # The grid points spread over the ranks; the best is picked in grid order, as one process would.
            for point, got in zip(grid, (ranks or distributed.Ranks()).map(score, grid)):
                if best is None or (got.utility == got.utility and not best[1].utility >= got.utility):
                    best = (point, got, maker(point))
            config = baselines.mergekit_config(method, best[0], merge.model_ref(base, portable=True,
                                                                                relative_to=recipe.base_dir),
                                               paths, recipe.dtype)
            found.append((name, seed, best[0], config, best[1], best[2], time.monotonic() - start))
    return found


def _analysis(recipe, objective, experts, result, scores, test_rows, test, comparison) -> report_mod.Analysis:
    """The paper's analyses of this run: weak-to-strong, correctness emergence, dev/test gaps."""
    from swarm_merge import baselines

    initial = [getattr(result.lookup(x), "utility", float("nan")) for x in result.initial]
    w2s = baselines.weak_to_strong(result.state, initial, [e.name for e in experts], seed_soup=recipe.swarm.seed_soup)
    emergence = None
    if test is not None and objective.type in ("exact_match", "multiple_choice"):
        found = baselines.emergence([test_rows.get(("expert", i)) for i in range(len(experts))],
                                    test_rows.get(("winner", 0)), [ex.group for ex in test])
        emergence = report_mod.Emergence(**found) if found else None

    def gap(dev, tst):
        return None if dev is None or tst is None else dev - tst

    winner = scores.winner
    others = [(r.name, r.dev.utility, r.test.utility if r.test else None) for r in scores.rows if r.kind != "winner"]
    if comparison is not None:
        others += [(f"{r.method} (seed {r.seed})", r.dev.utility, r.test.utility if r.test else None)
                   for r in comparison.runs if r.method != "swarm"]
    others = [o for o in others if o[1] is not None]
    best = max(others, key=lambda o: o[1]) if others else None
    noise, warnings = _selection_noise(objective, scores, len(result.memo))
    return report_mod.Analysis(
        weak_to_strong=report_mod.WeakToStrong(**w2s), emergence=emergence,
        winner_gap=gap(winner.dev.utility, winner.test.utility if winner.test else None),
        best_baseline=best[0] if best else None, best_baseline_gap=gap(best[1], best[2]) if best else None,
        selection_noise=noise, warnings=warnings)


def _selection_noise(objective, scores, evaluations: int):
    """The winner's curse on a small dev set: the best of E noisy scores sits above its true value by
    about sd/sqrt(N) * sqrt(2 ln E) (the expected maximum of E normal draws) even when no position is
    better than another. For accuracy objectives sd = sqrt(p (1 - p)) at the winner's dev accuracy p.
    Returns (that figure or None, warnings): a warning when the winner's dev gain over the uniform
    average is within it."""
    if getattr(objective, "type", None) not in ("exact_match", "multiple_choice") or evaluations < 2:
        return None, []
    winner = scores.winner
    uniform = next((r for r in scores.rows if r.kind == "uniform"), None)
    n, p = winner.dev.n, winner.dev.utility
    if not n or p is None or not math.isfinite(p):
        return None, []
    sd = max(math.sqrt(p * (1 - p)), 1.0 / n)
    noise = sd / math.sqrt(n) * math.sqrt(2 * math.log(evaluations))
    warnings = []
    if uniform is not None and uniform.dev.utility is not None:
        gain = p - uniform.dev.utility
        if gain <= noise:
            warnings.append(
                f"the winner's dev gain over the uniform average ({gain:+.3f}) is within what the best of "
                f"{evaluations} scores on {n} dev rows shows by chance alone (about {noise:.3f}): judge it by the "
                "test column, and add dev rows to make the search's choice trustworthy")
    return round(noise, 6), warnings


def _report(recipe, experts, digests, base, result, scores, group_labels, device, started, *, dev, test,
            test_in_dev, bank=None, base_digest=None, analysis=None, comparison=None,
            objective_models=()) -> Report:
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
        # Rows as scored (an lm-eval task's documents are counted by the harness).
        data=report_mod.DataRecord(dev_rows=scores.winner.dev.n,
                                   test_rows=scores.winner.test.n if scores.winner.test is not None else None,
                                   test_rows_in_dev=test_in_dev,
                                   benchmarks_searched=objectives.benchmarks_searched(recipe)),
        search=report_mod.SearchRecord(
            iterations=state.iteration,
            evaluations=state.evaluations,
            distinct_positions_scored=len(result.memo) + (result.raced["dropped"] if result.raced else 0),
            items=result.items,
            racing=(report_mod.RacingRecord(slice_rows=result.raced["slice_rows"], rows=result.raced["rows"],
                                            confidence=recipe.swarm.race_confidence,
                                            dropped=result.raced["dropped"], finished=result.raced["finished"])
                    if result.raced else None),
            stop_reason=result.stop_reason,
            chosen_by=f"the best dev utility of the {len(result.memo)} distinct positions the swarm scored on "
                      "every dev row",
            resumed=result.resumed,
            seconds=round(result.seconds, 3),
            history=result.history,
        ),
        analysis=analysis,
        comparison=comparison,
        objective_models=[report_mod.BaseModelRecord(
            model=ref.model if not ref.is_local else _relative(recipe, path), revision=commit)
            for ref, path, commit, _ in objective_models],
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
                options: RunOptions = RunOptions(), *, bank=None, base=None, objective=None,
                objective_models=(), ranks=None, race=None) -> None:
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
    if s.stop == "budget":  # iterations follow from the budget and the particles that move
        moving = s.size - (k if s.anchors else 0)
        how = f"{moving} moving particle(s){', the experts as fixed anchors' if s.anchors else ''}, until the budget"
    else:
        how = f"at most {s.max_iterations} iterations"
    print(f"swarm: size {s.size}, granularity {s.granularity} ({len(group_labels)} group(s), "
          f"{len(group_labels) * k} coefficients), {s.update} update, {how}", file=out)
    from swarm_merge.swarm import budget

    print(f"evaluations: at most {budget(s)} on {objectives.row_count(dev)} dev rows ({objective.type})"
          + (f"; then {k + 2} on {objectives.row_count(test)} test rows" if test else ""), file=out)
    estimate = _estimate(recipe, experts, bank=bank, base=base)
    budget_bytes = _process_budget(device, options, ranks)
    if ranks is not None and ranks.distributed:
        print(f"processes: {ranks.world} ({ranks.local_world} on this machine); each iteration's evaluations are "
              "spread over them; memory below is per process", file=out)
    held = sum(m[3] for m in objective_models)
    if held:
        print(f"objective models held for the run: {hb(held)} ("
              + ", ".join(f"{m[0]}" + (f" @ {m[2][:12]}" if m[2] else "") for m in objective_models)
              + "); taken off the budget", file=out)
        budget_bytes -= held
    mode = evaluate.choose_mode(options.eval_mode, estimate, budget_bytes)
    race = _streaming_race(race, mode, recipe)
    if race is not None:
        seen = " -> ".join(str(len(race.seen(j))) for j in range(len(race.parts)))
        print(f"racing: each moving particle is scored on {seen} dev rows, stopping where it cannot beat the "
              f"global best ({race.confidence:g} confidence)", file=out)
    elif s.racing is not False:
        why = (f"{objective.type} scores a whole set at once" if not racing.can_race(objective) else
               "streaming mode" if mode == "streaming" else "too few dev rows")
        print(f"racing: off ({why})", file=out)
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
    print(f"search: {s.iterations} iterations, {s.evaluations} evaluations, {card.cost(s)}, {s.stop_reason}, "
          f"{report.wall_seconds:.0f} s", file=out)
    a = report.analysis
    if a is not None:
        w = a.weak_to_strong
        if w.start_rank is not None:
            print(f"weak-to-strong: the winning particle started as {w.started_as}, ranked {w.start_rank} of "
                  f"{w.size} in the initial swarm", file=out)
        if a.emergence is not None:
            e = a.emergence
            print(f"emergence (test): {e.gained} of {e.items} items solved by the winner and by no expert; "
                  f"{e.lost} solved by some expert but lost by the winner", file=out)
        if a.winner_gap is not None:
            print(f"dev - test gap: winner {a.winner_gap:+.4f}" + (
                f", best other by dev ({a.best_baseline}) {a.best_baseline_gap:+.4f}"
                if a.best_baseline_gap is not None else ""), file=out)
        for warning in a.warnings:
            print(f"warning: {warning}", file=out)
    c = report.comparison
    if c is not None:
        seeds = f"{len(c.seeds)} seeds" if len(c.seeds) > 1 else f"seed {c.seeds[0]}"
        spent = f"{c.items} dev rows" if c.items is not None else f"{c.budget} distinct dev evaluations"
        print(f"\nat equal budget ({spent} per method and seed, {seeds}; mean +- std over seeds):", file=out)
        print(f"{'method':<19}{'dev':>18}{'test':>18}{'evals':>7}{'rows':>8}{'s':>7}", file=out)

        def ms(mean, std):
            return "-" if mean is None else f"{mean:.4f} +- {std:.4f}"

        for m in c.summary:
            print(f"{m.method:<19}{ms(m.dev_mean, m.dev_std):>18}{ms(m.test_mean, m.test_std):>18}"
                  f"{m.evaluations:>7}{'-' if m.items is None else m.items:>8}{m.seconds_mean:>7.0f}", file=out)
