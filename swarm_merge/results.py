"""What a run found, as the report holds it: the experts, the soup and the winner scored on dev and test,
the paper's analyses (weak-to-strong, emergence, dev/test gaps, the winner's curse) and swarm.json's
:class:`~swarm_merge.report.Report`."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from swarm_merge import baselines, evaluate, objectives, report as report_mod
from swarm_merge.options import VERSION
from swarm_merge.publish import card
from swarm_merge.recipe import portable_path
from swarm_merge.report import Report

__all__ = ["score_candidates", "analysis", "selection_noise", "build_report", "chosen_by", "hardware"]


def score_candidates(plan, result, evaluator):
    """The experts, the uniform soup and the winner on dev (from the search's memo where it has them) and
    test; returns (the report's Scores, each one's per-row test values for the analyses)."""
    objective, dev, test, ranks = plan.objective, plan.dev, plan.test, plan.ranks
    k, num_groups = len(plan.experts), len(plan.group_labels)
    candidates = [(e.name, "expert", np.tile(np.eye(k)[i], (num_groups, 1))) for i, e in enumerate(plan.experts)]
    candidates.append(("uniform average", "uniform", np.full((num_groups, k), 1.0 / k)))
    candidates.append(("swarm winner", "winner", result.best))
    if not np.array_equal(result.best, result.state.g):  # (average_top: the average won; how the best fares)
        candidates.append(("swarm global best", "global_best", result.state.g))
    jobs = [(x, dev) for _, _, x in candidates if result.lookup(x) is None]
    jobs += [(x, test) for _, _, x in candidates] if test is not None else []
    found = iter(evaluate.score_all(evaluator, objective, jobs, ranks))
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


def analysis(plan, result, scores, test_rows, comparison) -> report_mod.Analysis:
    """The paper's analyses of this run: weak-to-strong, correctness emergence, dev/test gaps."""
    recipe, objective, experts, test = plan.recipe, plan.objective, plan.experts, plan.test
    initial = [getattr(result.lookup(x), "utility", float("nan")) for x in result.initial]
    w2s = baselines.weak_to_strong(result.state, initial, [e.name for e in experts], seed_soup=recipe.swarm.seed_soup)
    emergence = None
    if test is not None and getattr(objectives.kind_of(objective), "accuracy", False):
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
    noise, warnings = selection_noise(objective, scores, len(result.memo))
    return report_mod.Analysis(
        weak_to_strong=report_mod.WeakToStrong(**w2s), emergence=emergence,
        winner_gap=gap(winner.dev.utility, winner.test.utility if winner.test else None),
        best_baseline=best[0] if best else None, best_baseline_gap=gap(best[1], best[2]) if best else None,
        selection_noise=noise, warnings=warnings)


def selection_noise(objective, scores, evaluations: int):
    """The winner's curse on a small dev set: the best of E noisy scores sits above its true value by
    about sd/sqrt(N) * sqrt(2 ln E) (the expected maximum of E normal draws) even when no position is
    better than another. For accuracy objectives sd = sqrt(p (1 - p)) at the winner's dev accuracy p.
    Returns (that figure or None, warnings): a warning when the winner's dev gain over the uniform
    average is within it."""
    if not getattr(objectives.kind_of(objective), "accuracy", False) or evaluations < 2:
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


def build_report(plan, digests, result, scores, analysis, comparison) -> Report:
    """swarm.json for the run ``plan`` (:class:`swarm_merge.pipeline.Plan`): ``digests`` of the weights the
    run read (kinds.ExpertKind.weighed: the experts, in order, then the adapters' base)."""
    import mergekit
    import torch
    import transformers

    recipe, experts, objective_models = plan.recipe, plan.experts, plan.objective_models

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
        **plan.kind.records(digests),
        coefficients=report_mod.Coefficients.of(result.best, plan.group_labels),
        scores=scores,
        # Rows as scored (an lm-eval task's documents are counted by the harness).
        data=report_mod.DataRecord(dev_rows=scores.winner.dev.n,
                                   test_rows=scores.winner.test.n if scores.winner.test is not None else None,
                                   test_rows_in_dev=plan.test_in_dev,
                                   benchmarks_searched=objectives.benchmarks_searched(recipe)),
        search=report_mod.SearchRecord(
            iterations=state.iteration,
            evaluations=state.evaluations,
            distinct_positions_scored=len(result.memo) + (result.raced["dropped"] if result.raced else 0),
            items=result.items,
            racing=(report_mod.RacingRecord(slice_rows=result.raced["slice_rows"], rows=result.raced["rows"],
                                            confidence=recipe.swarm.race_confidence,
                                            gain=recipe.swarm.race_gain,
                                            neighbours=result.raced["neighbours"],
                                            dropped=result.raced["dropped"], finished=result.raced["finished"])
                    if result.raced else None),
            stop_reason=result.stop_reason,
            found=report_mod.FoundRecord.of(result.history),
            chosen_by=chosen_by(result),
            average=report_mod.AverageRecord(**result.pick) if result.pick else None,
            resumed=result.resumed,
            seconds=round(result.seconds, 3),
            history=result.history,
        ),
        analysis=analysis,
        comparison=comparison,
        objective_models=[report_mod.BaseModelRecord(
            model=ref.model if not ref.is_local else portable_path(Path(path).resolve(), recipe.base_dir),
            revision=commit)
            for ref, path, commit, _ in objective_models],
        # This session's wall time plus the earlier sessions' (from the checkpoint).
        wall_seconds=round(result.wall_before + time.monotonic() - plan.started, 3),
        hardware=hardware(plan.device),
        versions={"swarm_merge": VERSION, "mergekit": getattr(mergekit, "__version__", "0.1.x"),
                  "torch": torch.__version__, "transformers": transformers.__version__},
    )


def chosen_by(result) -> str:
    """How the winner was chosen, for swarm.json and the card."""
    pick = result.pick
    if pick is None:
        return f"the best dev utility of the {len(result.memo)} distinct positions the swarm scored on every dev row"
    full = pick["positions"]
    se = "" if pick["standard_error"] is None else f", standard error {pick['standard_error']:.4f}"

    def u(value):
        return "-" if value is None else f"{value:.4f}"

    average = (f"the average of {pick['top']} positions weighted by how often each is the best on bootstrap draws of "
               f"the dev rows" if pick.get("rule") == "bag" else f"the average of the top {pick['top']}")
    if pick["chosen"] == "average":
        return (f"{average}, of the {full} distinct positions the swarm scored on every dev row (swarm.average_top): "
                f"dev {u(pick['average'])}, the global best {u(pick['global_best'])}{se}")
    if pick["average"] is None:
        return (f"the best dev utility of the {full} distinct positions the swarm scored on every dev row: {average} "
                "failed to score")
    return (f"the best dev utility of the {full} distinct positions the swarm scored on every dev row: {average} "
            f"scored {u(pick['average'])} against its {u(pick['global_best'])}{se}, more than one standard error below")


def hardware(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
