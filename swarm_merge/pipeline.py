"""The whole run: :func:`prepare` reads and checks every input into a :class:`Plan`, :func:`run` carries it out.

recipe -> output folder checked (output.py) -> pull experts and their kind (experts/, kinds.py) ->
search space (space.py) -> inputs checked: data, tokenizer, finite weights (objectives/, evaluate.py,
weights.py) -> swarm search, each particle built and scored, raced on stages of the dev rows (search.py,
swarm.py, racing.py, weights.py, evaluate.py, objectives/) -> the experts, the soup and the winner scored,
the baselines (results.py, compare.py) -> the winner written (kinds.py: mergekit, or a LoRA adapter) ->
report (report.py) -> card (publish/card.py) -> publish (output.py) -> push (publish/push.py).

Every check that can fail on bad input runs in :func:`prepare`, before the output folder is claimed, so
bad input writes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from swarm_merge import compare, distributed, evaluate, experts as experts_mod, kinds, objectives, output
from swarm_merge import racing, report as report_mod, results, search, space, weights
from swarm_merge.errors import ExpertError
from swarm_merge.options import RunOptions
from swarm_merge.publish import card, push
from swarm_merge.recipe import Recipe
from swarm_merge.report import Report

__all__ = ["Plan", "prepare", "run"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, read and checked: nothing here has written a file."""

    recipe: Recipe
    options: RunOptions
    started: float  # time.monotonic() when the run began
    ranks: distributed.Ranks
    out_dir: Path
    push_to: Optional[str]
    kind: kinds.ExpertKind  # the experts (full models or LoRA adapters) and their base
    groups: Dict[str, int]  # tensor -> coefficient row
    group_labels: List[str]
    objective: Any  # an objective, or a Suite of several
    dev: Any  # its dev rows (a Suite: one list per component)
    test: Any
    race: Optional[racing.Race]  # racing's stages (before the eval mode: streaming turns it off)
    objective_models: List[tuple]  # reward / judge models: (ref, folder, commit or None, bytes)
    device: Any  # torch.device
    test_in_dev: int  # test rows that are also dev rows (warned about)

    @property
    def experts(self) -> List[experts_mod.Expert]:
        return self.kind.experts

    def memory_budget(self) -> int:
        """The memory this process may give to weights: the machine's RAM is shared by its processes (each
        GPU is its own; ``--max-memory`` is per process), less the objective models held for the run."""
        return _process_budget(self.device, self.options, self.ranks) - sum(m[3] for m in self.objective_models)

    def eval_mode(self) -> str:
        """The fastest mode whose weight memory fits the budget (see evaluate.choose_mode)."""
        return self.kind.choose_mode(self.options.eval_mode, self.memory_budget())

    def race_in(self, mode: str) -> Optional[racing.Race]:
        """Streaming rebuilds every weight on each forward: a raced stage would cost another pass over the
        experts' weights, so ``racing: auto`` races only in the modes that build a particle once."""
        if self.race is not None and mode == "streaming" and self.recipe.swarm.racing == "auto":
            return None
        return self.race


def run(recipe: Recipe, options: RunOptions = RunOptions(), *, out=None) -> Optional[Report]:
    """Run a recipe end to end; returns the report (``swarm.json``), or None for a dry run.

    ``out`` receives the plan and the final table (default: the current sys.stdout).
    """
    try:
        plan = prepare(recipe, options)
        out = out or sys.stdout
        if not plan.ranks.is_main:  # only the main rank prints and writes
            out = io.StringIO()
        if options.dry_run:
            _print_plan(plan, out)
            return None
        return _execute(plan, out)
    finally:  # a reward or judge model and lm-eval's task index are this run's: no memory held after it,
        objectives.release()  # and a later run in this process (ci run, a library user) reads its own files


def prepare(recipe: Recipe, options: RunOptions = RunOptions()) -> Plan:
    """Read and check every input of a run (a dry run's whole work): the flags, the output folder, the
    experts and their base (pulled; a dry run reads Hub experts' headers only), the search space, the
    objective and its rows, the reward and judge models, the tokenizer. Writes nothing."""
    started = time.monotonic()
    evaluate.check_device(options.device)
    # Several processes (accelerate launch / --num-processes): every rank runs this
    # function; the evaluations are spread, only the main rank prints and writes.
    ranks = distributed.current(evaluate.resolve_device(options.device).type)
    if not ranks.is_main:
        LOG.setLevel(logging.WARNING)
        logging.getLogger("swarm_merge").setLevel(logging.WARNING)
    output.check_flags(resume=options.resume, force=options.force)
    push_to = options.push_to_hub or recipe.output.push_to_hub
    out_dir = output.check_path(options.out_dir or recipe.output_dir, inputs=_inputs(recipe, options),
                                recipe_dir=recipe.base_dir)
    # Read-only checks, a dry run's too: it validates everything it can without the weights.
    output.check_contents(out_dir, resume=options.resume, force=options.force)
    if push_to and options.check_token:
        push.require_token(push_to)  # fail now, not after the search
    with ranks.local_main_first():  # one download per machine, into the shared cache
        experts = experts_mod.pull_experts(recipe.experts, cache_dir=options.cache_dir,
                                           allow_pickle=recipe.allow_pickle, download=not options.dry_run)
        kind = kinds.pull(recipe, experts, options, out_dir)
    groups, group_labels = space.tensor_groups(kind.tensor_names(), granularity=recipe.swarm.granularity,
                                               layer_groups=recipe.swarm.layer_groups)
    # One objective and its rows, or a Suite of several and each one's rows.
    code = objectives.load_code(options.objective_code) if options.objective_code else None
    objective, dev, test = objectives.task_of(recipe, code, allow_task_code=options.allow_task_code,
                                              allow_benchmark=options.allow_benchmark_tasks)
    race = racing.race_of(recipe.swarm, objective, dev)
    with ranks.local_main_first():
        objective, objective_models = _pull_objective_models(objective, options)
    device = evaluate.resolve_device(options.device)
    if device.type == "cuda":  # one GPU per process on its machine
        import torch

        device = distributed.device_for(device, ranks, torch.cuda.device_count())
    for component in recipe.components:
        evaluate.check_tokenizer(kind.tokenizer_path, component)
    return Plan(recipe=recipe, options=options, started=started, ranks=ranks, out_dir=out_dir, push_to=push_to,
                kind=kind, groups=groups, group_labels=group_labels, objective=objective, dev=dev, test=test,
                race=race, objective_models=objective_models, device=device, test_in_dev=_overlap(dev, test))


def _execute(plan: Plan, out) -> Optional[Report]:
    """Search, score, write, publish and push what ``plan`` describes (not a dry run)."""
    recipe, ranks, kind = plan.recipe, plan.ranks, plan.kind
    # Non-finite weights are bad input; the content goes into the fingerprint (read once, by the main rank).
    digests = ranks.broadcast(weights.scan_experts(kind.weighed()) if ranks.is_main else None)
    # Only the main rank claims and writes the output folder.
    claimed = (output.OutputFolder(plan.out_dir, resume=plan.options.resume, force=plan.options.force)
               if ranks.is_main else contextlib.nullcontext(output.Unclaimed(plan.out_dir)))
    with claimed as folder:
        mode = ranks.broadcast(plan.eval_mode())  # the main rank's choice, on every rank
        LOG.info("evaluation: %s on %s", mode, plan.device)
        evaluator = kind.evaluator(mode, plan.groups, plan.device)
        try:
            result, scores, test_rows, comparison = _search(plan, evaluator, mode, folder, digests)
            analysis = results.analysis(plan, result, scores, test_rows, comparison)
        finally:  # the expert files it reads stay open until here (on error too)
            evaluator.close()
        if not ranks.is_main:  # the main rank writes, publishes and pushes
            return None
        # The evaluator's memory (K experts in memory mode, one model in one-model mode) is not needed to
        # write: free it first.
        del evaluator
        _free(plan.device)
        report = results.build_report(plan, digests, result, scores, analysis, comparison)
        folder.publish(_write(plan, folder.new_stage(), result, report, mode))
    _print_table(report, out)
    print(f"wrote {plan.out_dir}  (winner dev {card.fmt(report.scores.winner.dev.utility)})", file=out)
    if plan.push_to:
        url = push.push(plan.out_dir, plan.push_to, private=recipe.output.private, report=report)
        print(f"pushed to {plan.push_to}: {url}", file=out)
    return report


def _search(plan: Plan, evaluator, mode: str, folder, digests: List[str]):
    """The swarm search over coefficient arrays (G, K), then the experts, the soup and the winner scored
    (dev from the memo), then the baselines when asked. Returns (result, scores, test rows, comparison)."""
    recipe, objective, dev, test = plan.recipe, plan.objective, plan.dev, plan.test
    race = plan.race_in(mode)
    if race is None and plan.race is not None:
        LOG.info("racing: off in streaming mode (each stage would read every weight again)")
    evaluator.max_rows = objectives.row_count(dev)
    result = search.run_search(
        recipe.swarm,
        num_experts=len(plan.experts),
        num_groups=len(plan.group_labels),
        evaluate=functools.partial(evaluator.evaluate, examples=dev, objective=objective),
        checkpoint=folder.state_path,
        fingerprint=_fingerprint(recipe, digests, plan.options, folders=plan.kind.folders,
                                 objective_models=[(m[1], m[2]) for m in plan.objective_models]),
        resume=plan.options.resume,
        progress=plan.options.progress,
        started=plan.started,
        ranks=plan.ranks,
        race=race,
        evaluate_rows=racing.rows_scorer(evaluator, race, objective),
        rows_layout=racing.layout_of(recipe.swarm, objective, dev),
    )
    LOG.info("scoring the experts, the uniform average and the winner%s", " on the test set" if test else "")
    scores, test_rows = results.score_candidates(plan, result, evaluator)
    comparison = None
    if plan.options.baselines:
        comparison = compare.compare(plan, result, evaluator, race)
    return result, scores, test_rows, comparison


def _write(plan: Plan, stage: Path, result, report: Report, mode: str) -> Path:
    """The winner (kinds.py: mergekit or a LoRA adapter), swarm.json, the card and its plot, into the
    staging folder ``stage`` (published whole by output.py: atomic as a user sees it)."""
    recipe = plan.recipe
    mergekit_yaml = plan.kind.write(stage, result.best, plan.groups, mode=mode, device=plan.device)
    pinned = [*report.experts, *([report.base_model] if report.base_model else []), *report.objective_models]
    pins = {m.model: m.revision for m in pinned if m.revision}
    recipe_yaml = yaml.safe_dump(recipe.as_written(pins), sort_keys=False)
    plot = card.plot_history(report.search.history, stage / output.PLOT_FILE, title=recipe.name)
    card.render_card(report, recipe_yaml=recipe_yaml, mergekit_yaml=mergekit_yaml, repo_id=plan.push_to,
                     plot=output.PLOT_FILE if plot else None).save(stage / output.CARD_FILE)
    plan.kind.extra_cards(stage, report, repo_id=plan.push_to)
    report_mod.write(stage / output.REPORT_FILE, report)
    return stage


# ------------------------------------------------------------------ inputs


def _inputs(recipe: Recipe, options: RunOptions) -> List[tuple]:
    """What the output folder must stay clear of: every local input and the Hub cache."""
    from huggingface_hub import constants

    found = recipe.local_inputs()
    found.append(("the Hub cache", options.cache_dir or constants.HF_HUB_CACHE))
    return found


def _process_budget(device, options: RunOptions, ranks: Optional[distributed.Ranks]) -> int:
    """The memory one process may use: the machine's RAM is shared by its processes
    (each GPU is its own); ``--max-memory`` is per process."""
    budget = evaluate.memory_budget(device, options.max_memory)
    if options.max_memory is None and device.type == "cpu" and ranks is not None and ranks.local_world > 1:
        budget //= ranks.local_world
    return budget


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
        path, commit = experts_mod.pull_model_files(ref, cache_dir=options.cache_dir, what=f"{kind} model",
                                                    patterns=experts_mod.SMALL_PATTERNS + ["*.safetensors"])
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
        raise ExpertError(f"reward model {str(ref)!r}: model_type {model_type!r} has no sequence "
                                      "classification class in transformers (remote code is never run); use a "
                                      "reward model of a supported architecture")
    if not any(Path(path).glob("*.safetensors")):
        raise ExpertError(f"reward model {str(ref)!r} has no *.safetensors weights; save it with "
                                      "safe_serialization")
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2  # transformers' default: 2
    if labels != 1:
        raise ExpertError(f"reward model {str(ref)!r} has {labels} outputs; use a reward model with one "
                                      "(num_labels: 1, a scalar reward head)")
    # Its score head and every other tensor its architecture needs (transformers would make up a missing one).
    label = f"reward model {str(ref)!r}"
    experts_mod.check_weights(Path(path), experts_mod.read_headers(Path(path), label), label,
                              task="sequence-classification")


def _free(device) -> None:
    import gc

    gc.collect()
    evaluate.trim_heap()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


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


# ----------------------------------------------------------------- printing


def _print_plan(plan: Plan, out) -> None:
    """A dry run's output: what the run would pull, search, hold in memory and write."""
    recipe, experts, ranks, objective, dev, test = plan.recipe, plan.experts, plan.ranks, plan.objective, plan.dev, plan.test
    k = len(experts)
    model_bytes = max(e.nbytes for e in experts)
    hb = experts_mod.human_bytes
    print(plan.kind.headline(), file=out)
    for e in experts:
        if e.ref.is_local:
            shape = plan.kind.shape(e)
            print(f"  {e.ref.model}  " + ("pickled weights (allow_pickle): converted and checked on the run"
                                          if e.pickled else f"{shape}weights {hb(e.nbytes)}"), file=out)
            continue
        asked = f" (asked {e.ref.revision})" if e.ref.revision and e.ref.revision != e.revision else ""
        size = f"weights {hb(e.nbytes)}, " if not e.pickled else ""
        shape = plan.kind.shape(e)
        print(f"  {e.ref.model} @ {e.revision}{asked}  {shape}{size}download {hb(e.download_bytes or 0)}", file=out)
        if e.pickled:
            print("    pickled weights (allow_pickle): assumed to match the others; checked after the download", file=out)
    s = recipe.swarm
    if s.stop == "budget":  # iterations follow from the budget and the particles that move
        moving = s.size - (k if s.anchors else 0)
        how = f"{moving} moving particle(s){', the experts as fixed anchors' if s.anchors else ''}, until the budget"
    else:
        how = f"at most {s.max_iterations} iterations"
    g = len(plan.group_labels)
    print(f"swarm: size {s.size}, granularity {s.granularity} ({g} group(s), {g * k} coefficients), {s.update} update, {how}", file=out)
    from swarm_merge.swarm import budget

    print(f"evaluations: at most {budget(s)} on {objectives.row_count(dev)} dev rows ({objective.type})"
          + (f"; then {k + 2} on {objectives.row_count(test)} test rows" if test else ""), file=out)
    estimate = plan.kind.estimate()
    if ranks.distributed:
        print(f"processes: {ranks.world} ({ranks.local_world} on this machine); each iteration's evaluations are "
              "spread over them; memory below is per process", file=out)
    held = sum(m[3] for m in plan.objective_models)
    if held:
        print(f"objective models held for the run: {hb(held)} ("
              + ", ".join(f"{m[0]}" + (f" @ {m[2][:12]}" if m[2] else "") for m in plan.objective_models)
              + "); taken off the budget", file=out)
    budget_bytes, mode = plan.memory_budget(), plan.eval_mode()
    race = plan.race_in(mode)
    if race is not None:
        seen = " -> ".join(str(len(race.seen(j))) for j in range(len(race.parts)))
        contested = (f", the rows where one of the {race.neighbours} scored positions nearest it differs from the "
                     "global best right after the slice" if race.neighbours else "")
        print(f"racing: each moving particle is scored on {seen} dev rows{contested}, stopping where it cannot beat "
              f"the global best{' by a whole row' if race.gain == 'row' else ''} ({race.confidence:g} confidence)",
              file=out)
    elif s.racing is not False:
        why = (f"{objective.type} scores a whole set at once" if not racing.can_race(objective) else
               "streaming mode" if mode == "streaming" else "too few dev rows")
        print(f"racing: off ({why})", file=out)
    print(f"device: {plan.device}; dtype {recipe.dtype}; experts on disk {hb(k * model_bytes)}", file=out)
    print(f"estimated weight memory: in-memory {hb(estimate['in-memory'])}, one-model {hb(estimate['one-model'])}, "
          f"streaming {hb(estimate['streaming'])} (+ activations); budget {hb(budget_bytes)} -> eval mode: {mode}"
          + (" (auto)" if plan.options.eval_mode == "auto" else ""), file=out)
    print(f"output: {plan.out_dir}" + (f"; push to {plan.push_to}" if plan.push_to else ""), file=out)
    print("dry run: nothing was written (the run also reads every weight once, refusing NaN or inf)", file=out)


def _print_table(report: Report, out) -> None:
    """The run's results on the terminal: publish/card.py's tables as text, then the search's figures."""
    print("\n" + card.results_table(report).text(), file=out)
    c = report.coefficients
    if c.model is not None:
        print("coefficients: " + ", ".join(f"{e.name} {a:+.4f}" for e, a in zip(report.experts, c.model)), file=out)
    if report.data.test_rows_in_dev:
        print(f"warning: {report.data.test_rows_in_dev} of the {report.data.test_rows} test rows are also dev rows: "
              "the test column is not held out", file=out)
    s = report.search
    # (the search's own time: a compare run's whole wall time is mostly its baselines)
    print(f"search: {s.iterations} iterations, {s.evaluations} evaluations, {card.cost(s)}, {s.stop_reason}, "
          f"{s.seconds:.0f} s (the whole run: {report.wall_seconds:.0f} s)", file=out)
    if s.found is not None:
        print(f"global best found at {card.found(s)}", file=out)
    if s.average is not None:
        print(f"winner: {s.chosen_by}", file=out)
    a = report.analysis
    if a is not None:
        w = a.weak_to_strong
        if w.start_rank is not None:
            how = " (its winning position was the surrogate's proposal)" if w.surrogate else ""
            print(f"weak-to-strong: the particle that found the global best started as {w.started_as}, ranked {w.start_rank} of "
                  f"{w.size} in the initial swarm{how}", file=out)
        elif w.started_as == "scout":
            print("weak-to-strong: the global best is a scout (swarm.scouts), which no particle beat", file=out)
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
        spread = "; mean +- std over seeds" if len(c.seeds) > 1 else ""
        print(f"\nat equal budget (every method: {card.comparison_budget(c)}; {seeds}{spread}):", file=out)
        print(card.comparison_table(report).text(), file=out)
