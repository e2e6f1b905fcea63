"""The whole run, top to bottom, one stage per module:

recipe -> pull experts (experts.py) -> index their tensors and group them
(evaluate.py) -> swarm search, each particle built and scored (search.py,
swarm.py, objectives.py) -> write the winner with mergekit (merge.py) -> model
card (card.py) -> push (hub.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import yaml

from swarm_merge import card, evaluate, experts as experts_mod, merge, objectives, search
from swarm_merge.errors import OutputError
from swarm_merge.options import RunOptions
from swarm_merge.recipe import Recipe

__all__ = ["run"]

LOG = logging.getLogger(__name__)

STATE_FILE = "swarm-state.json"
REPORT_FILE = "swarm.json"
MERGEKIT_FILE = "mergekit_config.yml"
STAGING = ".staging"


def run(recipe: Recipe, options: RunOptions = RunOptions(), *, out=None) -> Optional[Dict[str, Any]]:
    """Run a recipe end to end; returns the report (``swarm.json``), or None for a dry run.

    ``out`` receives the plan and the final table (default: the current sys.stdout).
    """
    out = out or sys.stdout
    started = time.monotonic()
    out_dir = Path(options.out_dir or recipe.output_dir).expanduser()
    push_to = options.push_to_hub or recipe.output.push_to_hub
    if not options.dry_run:
        _check_out_dir(out_dir, resume=options.resume, force=options.force)
        if push_to:
            from swarm_merge import hub

            hub.require_token(push_to)  # fail now, not after the search

    # 1. Pull the experts and check them from their headers.
    # A dry run resolves Hub experts (commit, sizes, headers) without downloading weights.
    experts = experts_mod.pull_experts(recipe.experts, cache_dir=options.cache_dir,
                                       allow_pickle=recipe.allow_pickle, download=not options.dry_run)
    k = len(experts)
    names = sorted(experts[0].tensors)
    groups, group_labels = evaluate.tensor_groups(
        names, granularity=recipe.swarm.granularity, layer_groups=recipe.swarm.layer_groups
    )
    base = _pull_base(recipe, options)
    dev = objectives.load_examples(recipe.objective.dev, recipe.objective.type, recipe.objective.group_by)
    test = (
        objectives.load_examples(recipe.objective.test, recipe.objective.type, recipe.objective.group_by)
        if recipe.objective.test
        else None
    )
    device = evaluate.resolve_device(options.device)
    if options.dry_run:
        _print_plan(recipe, experts, group_labels, dev, test, device, out_dir, out, options)
        return None
    _prepare_out_dir(out_dir, resume=options.resume, force=options.force)

    # 2. The swarm search over coefficient arrays (G, K).
    mode = _eval_mode(recipe, experts, device, options)
    LOG.info("evaluation: %s on %s", mode, device)
    evaluator = evaluate.make_evaluator(
        mode, experts, groups, dtype=recipe.dtype, device=device,
        tokenizer_path=base.path if base else experts[0].path,
    )
    result = search.run_search(
        recipe.swarm,
        num_experts=k,
        num_groups=len(group_labels),
        evaluate=lambda x: evaluator.evaluate(x, dev, recipe.objective),
        checkpoint=out_dir / STATE_FILE,
        fingerprint=_fingerprint(recipe, experts),
        resume=options.resume,
        progress=options.progress,
    )

    # 3. Score the experts, the uniform soup and the winner (dev from the memo).
    scores = _baselines(recipe, experts, result, evaluator, dev, test, len(group_labels))

    # 4. Write the winner with mergekit, the card and the report into a staging
    #    folder, then move them in with swarm.json last: a run that dies here
    #    never leaves a model folder that looks complete.
    stage = out_dir / STAGING
    merge.write_merge(
        merge.mergekit_config(experts, result.best, groups, dtype=recipe.dtype, portable=False),
        stage, device=str(device) if device.type == "cuda" else "cpu",
    )
    mergekit_yaml = yaml.safe_dump(
        merge.mergekit_config(experts, result.best, groups, dtype=recipe.dtype, portable=True), sort_keys=False
    )
    (stage / MERGEKIT_FILE).write_text(mergekit_yaml, encoding="utf-8")
    report = _report(recipe, experts, result, scores, group_labels, device, started)
    report["base_model"] = {"model": base.ref.model, "revision": base.revision} if base else None
    recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    plot = card.plot_history(result.history, stage / card.PLOT_NAME, title=recipe.name)
    model_card = card.render_card(report, recipe_yaml=recipe_yaml, mergekit_yaml=mergekit_yaml,
                                  repo_id=push_to, plot=card.PLOT_NAME if plot else None)
    model_card.save(stage / "README.md")
    search.write_json_atomic(stage / REPORT_FILE, report)
    _publish(stage, out_dir)
    _print_table(report, out)
    print(f"wrote {out_dir}  (winner dev {report['scores']['winner']['dev']['utility']:.4f})", file=out)

    # 5. Push.
    if push_to:
        from swarm_merge import hub

        url = hub.push(out_dir, push_to, private=recipe.output.private, report=report)
        print(f"pushed to {push_to}: {url}", file=out)
    return report


# ------------------------------------------------------------------ stages


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


def _fingerprint(recipe: Recipe, experts) -> str:
    """What a checkpoint must match to be resumed: the search inputs, not the output settings."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.model_dump(mode="json", exclude={"output"}), sort_keys=True).encode())
    for e in experts:
        h.update(f"{e.path}@{e.revision}".encode())
    h.update(Path(recipe.objective.dev).read_bytes())
    return h.hexdigest()


def _baselines(recipe, experts, result, evaluator, dev, test, num_groups) -> Dict[str, Any]:
    k = len(experts)
    candidates = [(e.name, "expert", np.tile(np.eye(k)[i], (num_groups, 1))) for i, e in enumerate(experts)]
    candidates.append(("uniform average", "uniform", np.full((num_groups, k), 1.0 / k)))
    candidates.append(("swarm winner", "winner", result.best))
    rows = []
    for name, kind, x in candidates:
        dev_score = result.lookup(x) or evaluator.evaluate(x, dev, recipe.objective)
        test_score = evaluator.evaluate(x, test, recipe.objective) if test is not None else None
        rows.append({"name": name, "kind": kind, "dev": dev_score.to_dict(),
                     "test": test_score.to_dict() if test_score else None})
    return {"rows": rows, "winner": rows[-1], "uniform": rows[-2]}


def _report(recipe, experts, result, scores, group_labels, device, started) -> Dict[str, Any]:
    import torch
    import transformers
    import mergekit

    from swarm_merge import __version__

    best = result.best
    coefficients: Dict[str, Any] = {"sums": best.sum(axis=1).tolist()}
    if best.shape[0] == 1:
        coefficients["model"] = best[0].tolist()
    else:
        coefficients["groups"] = group_labels
        coefficients["per_group"] = best.tolist()
    state = result.state
    return {
        "recipe": recipe.model_dump(mode="json"),
        "experts": [
            {
                "name": e.name,
                "model": e.ref.model,
                "requested_revision": e.ref.revision,
                "revision": e.revision,
                "local": e.ref.is_local,
                "path": str(e.path),
                "parameters": e.num_parameters,
                "license": card.expert_license(e.path),
                "pickled": e.pickled,
            }
            for e in experts
        ],
        "coefficients": coefficients,
        "scores": scores,
        "search": {
            "iterations": state.iteration,
            "evaluations": state.evaluations,
            "distinct_positions_scored": len(result.memo),
            "stop_reason": result.stop_reason,
            "resumed": result.resumed,
            "seconds": round(result.seconds, 3),
            "history": result.history,
        },
        "wall_seconds": round(time.monotonic() - started + (result.seconds if result.resumed else 0.0), 3),
        "hardware": _hardware(device),
        "versions": {"swarm_merge": __version__, "mergekit": getattr(mergekit, "__version__", "0.1.x"),
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _hardware(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ------------------------------------------------------------- output folder

_OURS = (STATE_FILE, REPORT_FILE)


def _check_out_dir(out_dir: Path, *, resume: bool, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputError(f"output {out_dir} is a file; choose a folder with --out")
    content = [p for p in out_dir.iterdir() if p.name != STAGING]
    if not content or force:
        return
    if resume:
        if (out_dir / STATE_FILE).exists():
            return
        raise OutputError(f"--resume: {out_dir} has no {STATE_FILE} to resume; drop --resume, or --force to start over")
    if any((out_dir / n).exists() for n in _OURS):
        raise OutputError(f"{out_dir} holds an earlier run; pass --resume to continue it or --force to start over")
    raise OutputError(f"{out_dir} holds other files; choose an empty folder with --out, or pass --force")


def _prepare_out_dir(out_dir: Path, *, resume: bool, force: bool) -> None:
    if force and out_dir.exists() and not resume:
        resolved = out_dir.resolve()
        if resolved in (Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)):
            raise OutputError(f"--force would delete {resolved}; choose a dedicated --out folder")
        shutil.rmtree(resolved)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / STAGING).exists():
        shutil.rmtree(out_dir / STAGING)


def _publish(stage: Path, out_dir: Path) -> None:
    """Move the staged files into the out dir; swarm.json, the completion mark, last."""
    files = sorted(stage.iterdir(), key=lambda p: p.name == REPORT_FILE)
    for old in out_dir.glob("*.safetensors"):
        if not (stage / old.name).exists():
            old.unlink()  # shards of an earlier write that this one does not have
    for f in files:
        os.replace(f, out_dir / f.name)
    stage.rmdir()


# ----------------------------------------------------------------- printing


def _print_plan(recipe, experts, group_labels, dev, test, device, out_dir, out, options: RunOptions = RunOptions()) -> None:
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
    hb = experts_mod.human_bytes
    print(f"device: {device}; dtype {recipe.dtype}; experts on disk {hb(k * model_bytes)}", file=out)
    print(f"estimated peak memory: in-memory {hb(estimate['in-memory'])}, streaming {hb(estimate['streaming'])} "
          f"(+ activations); budget {hb(budget_bytes)} -> eval mode: {mode}"
          + (" (auto)" if options.eval_mode == "auto" else ""), file=out)
    print(f"output: {out_dir}" + (f"; push to {recipe.output.push_to_hub}" if recipe.output.push_to_hub else ""), file=out)
    print("dry run: nothing was written", file=out)


def _print_table(report, out) -> None:
    rows = report["scores"]["rows"]
    width = max(len(r["name"]) for r in rows) + 2
    has_test = any(r.get("test") for r in rows)
    print(f"\n{'model':<{width}}{'dev':>10}" + (f"{'test':>10}" if has_test else ""), file=out)
    for r in rows:
        line = f"{r['name']:<{width}}{r['dev']['utility']:>10.4f}"
        if has_test:
            line += f"{r['test']['utility']:>10.4f}" if r.get("test") else f"{'-':>10}"
        print(line, file=out)
    c = report["coefficients"]
    if "model" in c:
        print("coefficients: " + ", ".join(f"{e['name']} {a:+.4f}" for e, a in zip(report["experts"], c["model"])), file=out)
    print(f"search: {report['search']['iterations']} iterations, {report['search']['evaluations']} evaluations, "
          f"{report['search']['stop_reason']}, {report['wall_seconds']:.0f} s", file=out)
