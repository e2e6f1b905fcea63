"""The model card: huggingface_hub ModelCard from a packaged template, filled
from the run's report (the content of ``swarm.json``), plus the history plot."""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from swarm_merge.output import PLOT_FILE
from swarm_merge.report import HistoryEntry, Split

if TYPE_CHECKING:
    from swarm_merge.report import Report

__all__ = ["render_card", "render_merged_card", "plot_history", "expert_license", "set_repo_id", "md", "fence", "fmt"]

LOG = logging.getLogger(__name__)
_EMPTY = Split(utility=None, groups={}, n=0)
TAGS = ["merge", "mergekit", "model-swarms", "swarm_merge"]


def expert_license(path: Path) -> Optional[str]:
    """The license in an expert folder's README.md metadata, if any."""
    readme = Path(path) / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        value = ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a malformed card only costs the license field
        LOG.debug("cannot read the card of %s", path, exc_info=True)
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " OR ".join(value) or None  # a card may list several licenses
    return value if isinstance(value, str) and value else None


def fmt(value: Optional[float]) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def cost(search) -> str:
    """What the search spent, in dev rows scored (a report's SearchRecord), for the table and the card."""
    if search.items is None:
        return "dev rows scored not recorded"
    text = f"{search.items} dev rows scored"
    r = search.racing
    if r is not None:
        text += (f" (racing: {r.dropped} of {r.dropped + r.finished} moving positions dropped before their last "
                 f"stage; first stage {r.slice_rows} of {r.rows} rows)")
    return text


def found(search) -> str:
    """When the global best was found, against what the whole search spent ("" when not recorded): how much of
    the budget the result needed, for the table and the card."""
    f = search.found
    if f is None:
        return ""
    rows = (f", {f.items} of {search.items} dev rows" if f.items is not None and search.items is not None else "")
    return (f"iteration {f.iteration} of {search.iterations}: after {f.evaluations} of {search.evaluations} "
            f"evaluations{rows}; nothing after it scored higher")


def plot_history(history: List[HistoryEntry], path: Path, *, title: str = "") -> Optional[Path]:
    """Best / mean / worst dev utility of each iteration, and the global best."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a nicety; the card says nothing of it then
        LOG.warning("matplotlib is not installed; the card has no plot")
        return None
    its = [h.iteration for h in history]

    def series(key):
        return [float("nan") if getattr(h, key) is None else getattr(h, key) for h in history]

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.fill_between(its, series("worst"), series("best"), alpha=0.15, color="tab:blue", label="worst..best this iteration")
    ax.plot(its, series("mean"), color="tab:blue", label="mean")
    ax.plot(its, series("global_best"), color="tab:green", drawstyle="steps-post", label="global best")
    ax.set_xlabel("iteration (0 = initial swarm)")
    ax.set_ylabel("dev utility")
    ax.set_title(title or "Model Swarms search")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def md(text: object) -> str:
    """Text from a recipe or an expert, made inert in markdown: one line, no HTML,
    no link/emphasis/table syntax. Nothing from a recipe reaches the card unescaped."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def fence(content: str) -> str:
    """A code fence longer than any backtick run in ``content``, so it cannot be closed early."""
    longest = max((len(m) for m in re.findall(r"`+", content)), default=0)
    return "`" * max(3, longest + 1)


@dataclass(frozen=True)
class Table:
    """A table of text cells, drawn as Markdown (the card) or as aligned text (the terminal): one renderer,
    so the two never disagree on what the run found."""

    header: List[str]
    rows: List[List[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])

    def text(self) -> str:
        """The first column left-aligned, the others right-aligned, two spaces apart (ASCII: "+-" for "±")."""
        cells = [[c.replace("±", "+-") for c in row] for row in [self.header, *self.rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                         .rstrip() for row in cells)


def results_table(report: "Report", *, markdown: bool = False) -> Table:
    """The experts, the uniform average and the winner on dev and test; in Markdown also one column per
    group (task) of the test set, or of dev when there is no test set, and the winner in bold."""
    scores = report.scores
    esc = md if markdown else str
    split = "test" if scores.has_test else "dev"
    groups = sorted({g for row in scores.rows for g in (getattr(row, split) or _EMPTY).groups}) if markdown else []
    header = ["model", "dev"] + (["test"] if scores.has_test or markdown else [])
    header += [f"{esc(g)} ({split})" for g in groups]
    rows = []
    for row in scores.rows:
        name = esc(row.name)
        cells = [f"**{name}**" if markdown and row.kind == "winner" else name, fmt(row.dev.utility)]
        if scores.has_test or markdown:
            cells.append(fmt(row.test.utility if row.test else None))
        cells += [fmt((getattr(row, split) or _EMPTY).groups.get(g)) for g in groups]
        rows.append(cells)
    return Table(header, rows)


def comparison_table(report: "Report", *, markdown: bool = False) -> Optional[Table]:
    """``--baselines``: each method's mean (± its deviation over seeds) at the swarm's budget; None without."""
    c = report.comparison
    if c is None:
        return None

    def ms(mean, std):
        return "-" if mean is None else f"{mean:.4f} ± {std:.4f}" if len(c.seeds) > 1 else f"{mean:.4f}"

    def gap(g):
        if g is None:
            return "-"
        interval = "" if g.half_width is None else f" ± {g.half_width:.4f}"
        return f"{g.mean:+.4f}{interval} ({g.above} / {g.below} of {g.seeds})"

    esc = md if markdown else str
    has_test = any(m.test_gap is not None for m in c.summary)
    header = ["method", "dev", "test", "evaluations", "dev rows scored", "seconds",
              "swarm - this, dev (seeds above / below)"]
    header += ["swarm - this, test (seeds above / below)"] if has_test else []
    return Table(header, [
        [esc(m.method), ms(m.dev_mean, m.dev_std), ms(m.test_mean, m.test_std), str(m.evaluations),
         "-" if m.items is None else str(m.items), f"{m.seconds_mean:.0f}", gap(m.dev_gap)]
        + ([gap(m.test_gap)] if has_test else []) for m in c.summary])


def render_card(report: "Report", *, recipe_yaml: str, mergekit_yaml: str, repo_id: Optional[str] = None,
                plot: Optional[str] = PLOT_FILE):
    """Build the ModelCard (metadata + body) of a finished run from its report."""
    from urllib.parse import quote

    from huggingface_hub import ModelCard, ModelCardData

    recipe = report.recipe
    name = recipe.name
    experts = report.experts
    licenses = {e.license for e in experts}
    license_kw: Dict[str, Any] = {}
    if len(licenses) == 1 and None not in licenses:
        license_kw["license"] = licenses.pop()
    else:
        license_kw.update(license="other", license_name="mixed-or-unknown")
    hub_ids = [e.model for e in experts if not e.local]
    adapter = report.lora
    base = report.base_model
    base_hub = base is not None and not base.model.startswith((".", "/", "~"))
    utility = recipe.utility_name
    scores = report.scores
    # No evaluation results in the metadata: the Hub shows those (.eval_results/, model-index before it)
    # as benchmark results, and these are the search's own dev utility and a test file of the user's,
    # not a benchmark dataset on the Hub. They are in the card's table.
    if adapter is not None:  # a LoRA adapter for the base; the adapters it came from are listed in the body
        relation = dict(base_model=base.model if base_hub else None, base_model_relation="adapter" if base_hub else None,
                        tags=TAGS + ["lora", "peft"], library_name="peft")
    else:
        relation = dict(base_model=hub_ids or None, base_model_relation="merge" if hub_ids else None, tags=TAGS,
                        library_name="transformers")
    card_data = ModelCardData(
        model_name=name,
        **relation,
        **{k: v for k, v in license_kw.items() if v is not None},
    )

    coefficients = report.coefficients
    expert_rows = []
    for k, e in enumerate(experts):
        link = (f"[{md(e.model)}](https://huggingface.co/{quote(e.model)})" if not e.local
                else f"{md(e.name)} (local)")
        revision = "local"
        if e.revision:
            # The short sha links to the exact commit's files; the full one is in swarm.json
            # and in mergekit_config.yml below.
            revision = f"[{md(e.revision[:12])}](https://huggingface.co/{quote(e.model)}/tree/{quote(e.revision)})"
            if e.requested_revision and e.requested_revision != e.revision:
                revision += f" ({md(e.requested_revision)})"
        expert_rows.append({
            "link": link,
            "short": md(e.name),
            "revision": revision,
            "coefficient": f"{coefficients.model[k]:+.4f}" if coefficients.model is not None else "",
        })
    layer_rows = [{"label": md(label), "cells": [f"{v:+.3f}" for v in vals]}
                  for label, vals in zip(coefficients.groups or [], coefficients.per_group or [])]
    notes = []
    moving = [e for e in experts if e.revision and e.requested_revision != e.revision]
    if "license_name" in license_kw:
        notes.append("License: the experts' licenses differ or are unknown; check each expert's license before use.")
    data = report.data
    if not scores.has_test:
        held_out = ("There is no test set: every number above is on the dev set the search optimised, "
                    "so it overstates how the merge does on new data.")
    elif data.test_rows_in_dev:
        held_out = (f"**{data.test_rows_in_dev} of the {data.test_rows} test rows also appear in the dev set**, "
                    "which the search optimised: the test column is not a held-out measure.")
    else:
        held_out = "The dev set was used by the search; the test set never was."
    if data.benchmarks_searched:
        held_out += (" **The search tuned on public benchmarks** (allowed with --allow-benchmark-tasks): "
                     + "; ".join(md(b) for b in data.benchmarks_searched)
                     + ". Their scores are not held out and are no benchmark results.")
    search = report.search
    template = resources.files("swarm_merge").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        name=md(name),
        experts=expert_rows,
        dev_rows=scores.winner.dev.n,
        objective=f"`{utility}`",
        objective_note=" ".join(notes + [f"Utility: `{utility}` (higher is better)."]),
        held_out=held_out,
        pinned_note=bool(moving),
        results=results_table(report, markdown=True).markdown(),
        granularity=recipe.swarm.granularity,
        group_labels=coefficients.groups or [],
        layer_rows=layer_rows,
        swarm=recipe.swarm,
        iterations=search.iterations,
        stop_reason=md(search.stop_reason),
        chosen_by=md(search.chosen_by or "the best dev utility"),
        init=(f"around the uniform soup (soup + N(0, {recipe.swarm.init_spread}) per coefficient)"
              if recipe.swarm.init == "soup" else "the paper's (random inter/extrapolations of pairs)"),
        evaluations=search.evaluations,
        cost=cost(search),  # (our own words and numbers: nothing from the recipe)
        found=found(search),
        wall_time=f"{report.wall_seconds:.0f} s",
        hardware=md(report.hardware),
        plot=plot,
        repo_id=repo_id or name,
        recipe_yaml=recipe_yaml.rstrip(),
        recipe_fence=fence(recipe_yaml),
        mergekit_yaml=(mergekit_yaml or "").rstrip(),
        mergekit_fence=fence(mergekit_yaml or ""),
        lora=adapter,
        analysis=_analysis_lines(report),
        comparison=(lambda t: t.markdown() if t else "")(comparison_table(report, markdown=True)),
        comparison_note=_comparison_note(report),
        base_id=(base.model if base is not None else "").replace('"', ""),
        base_link=(f"[{md(base.model)}](https://huggingface.co/{quote(base.model)})" if base_hub
                   else md(base.model) if base is not None else ""),
    )
    return card


def _analysis_lines(report: "Report") -> List[str]:
    a = report.analysis
    if a is None:
        return []
    lines = []
    w = a.weak_to_strong
    if w.start_rank is not None:
        how = (" Its winning position was the Gaussian-process surrogate's proposal for it (`swarm.surrogate`), "
               "not a move of the swarm's update." if w.surrogate else "")
        lines.append(f"Weak to strong: the particle that found the global best started as {md(w.started_as)}, ranked "
                     f"{w.start_rank} of {w.size} by dev utility in the initial swarm (the paper: only 10.4% of "
                     "winners started as the best expert)." + how)
    elif w.started_as == "scout":
        lines.append("Weak to strong: the global best is a scout (`swarm.scouts`: a draw of the initial children "
                     "scored at the start), which no particle beat.")
    if a.emergence is not None:
        e = a.emergence
        per = "; ".join(f"{md(g)}: +{v['gained']} / -{v['lost']}" for g, v in sorted(e.groups.items()))
        lines.append(f"Correctness emergence on the test set: the winner solves {e.gained} of {e.items} items that "
                     f"no expert solves, and misses {e.lost} that some expert solves" + (f" ({per})" if per else "")
                     + ".")
    if a.winner_gap is not None:
        lines.append(f"Dev minus test utility: the winner {a.winner_gap:+.4f}" + (
            f"; the best other model by dev ({md(a.best_baseline)}) {a.best_baseline_gap:+.4f}"
            if a.best_baseline_gap is not None else "") + ".")
    if a.selection_noise is not None:
        lines.append(f"Chance alone lets the best of {report.search.evaluations} dev scores on {report.data.dev_rows} "
                     f"rows sit about {a.selection_noise:.3f} above its true value (the winner's curse).")
    for warning in a.warnings:
        lines.append(f"**Warning:** {md(warning)}.")
    return lines


def comparison_budget(c) -> str:
    """What every method was given (``report.comparison``): the swarm's dev rows at each seed."""
    if c.items is None:
        return f"{c.budget} distinct positions scored on dev"
    rows = [next((r.items for r in c.runs if r.method == "swarm" and r.seed == s), None) for s in c.seeds]
    if len(set(rows)) <= 1 or None in rows:
        return f"{c.items} dev rows scored, {c.budget} whole-dev-set evaluations"
    return f"at each seed, the dev rows the swarm scored there ({' / '.join(map(str, rows))})"


def _comparison_note(report: "Report") -> str:
    c = report.comparison
    if c is None:
        return ""
    seeds = (f"mean ± standard deviation over seeds {', '.join(map(str, c.seeds))}" if len(c.seeds) > 1
             else f"seed {c.seeds[0]}")
    budget = comparison_budget(c)
    text = (f"Random search, CMA-ES, a Gaussian-process optimiser (Optuna) and NGOpt (Nevergrad) searched the swarm's "
            f"coefficients with the swarm's budget: {budget} ({seeds}). Random search draws positions the way the "
            "swarm draws its initial particles; the others start at the uniform average. Every method picked its "
            "winner by dev utility. The last columns pair the seeds: the swarm's utility minus the method's, their "
            "mean over the seeds ± the half-width of its 95 % interval, and at how many seeds the swarm was above "
            "and below; an interval that spans 0 means these seeds do not tell the two apart.")
    if any(r.config for r in c.runs):
        text += (" Task arithmetic, TIES and DARE are mergekit's own methods against the base model, each tried at a "
                 "small grid of its hyperparameters (the evaluations column) and chosen on dev; swarm.json holds "
                 "the mergekit config of each chosen point.")
    return text


def render_merged_card(report: "Report", *, repo_id: Optional[str] = None):
    """The card of ``merged/`` (``output.merge_adapter``): the base with the winning adapter merged in."""
    from huggingface_hub import ModelCard, ModelCardData

    base = report.base_model
    hub = not base.model.startswith((".", "/", "~"))
    data = ModelCardData(model_name=f"{report.recipe.name} (merged)", base_model=base.model if hub else None,
                         base_model_relation="merge" if hub else None, tags=TAGS, library_name="transformers")
    repo = repo_id or report.recipe.name
    body = (f"# {md(report.recipe.name)}, merged\n\nThe base model {md(base.model)} with the Model Swarms LoRA "
            f"adapter of the parent folder merged in (PEFT `merge_and_unload`). The search, the scores and the "
            f"coefficients are in the parent folder's README.md and swarm.json.\n\n"
            f"```python\nfrom huggingface_hub import snapshot_download\nfrom transformers import AutoModelForCausalLM\n\n"
            f'path = snapshot_download("{repo}", allow_patterns="merged/*")\n'
            f'model = AutoModelForCausalLM.from_pretrained(f"{{path}}/merged")\n```\n')
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def set_repo_id(card_text: str, repo_id: str) -> str:
    """Point the card's usage snippet at ``repo_id`` (for a push to another repo than the run named)."""
    return re.sub(r'((?:\.from_pretrained\((?:base, )?|snapshot_download\()")[^"\n]*(")',
                  lambda m: m.group(1) + repo_id + m.group(2), card_text)
