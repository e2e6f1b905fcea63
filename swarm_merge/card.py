"""The model card: huggingface_hub ModelCard from a packaged template, filled
from the run's report (the content of ``swarm.json``), plus the history plot."""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["render_card", "plot_history", "expert_license", "set_repo_id"]

LOG = logging.getLogger(__name__)
PLOT_NAME = "swarm_history.png"
TAGS = ["merge", "mergekit", "model-swarms", "swarm_merge"]


def expert_license(path: Path) -> Optional[str]:
    """The license in an expert folder's README.md metadata, if any."""
    readme = Path(path) / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a malformed card only costs the license field
        LOG.debug("cannot read the card of %s", path, exc_info=True)
        return None


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def plot_history(history: List[Dict[str, Any]], path: Path, *, title: str = "") -> Optional[Path]:
    """Best / mean / worst dev utility of each iteration, and the global best."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a nicety; the card says nothing of it then
        LOG.warning("matplotlib is not installed; the card has no plot")
        return None
    its = [h["iteration"] for h in history]

    def series(key):
        return [float("nan") if h.get(key) is None else h[key] for h in history]

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


def render_card(report: Dict[str, Any], *, recipe_yaml: str, mergekit_yaml: str, repo_id: Optional[str] = None,
                plot: Optional[str] = PLOT_NAME):
    """Build the ModelCard (metadata + body) of a finished run."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    recipe = report["recipe"]
    name = recipe["name"]
    experts = report["experts"]
    licenses = {e.get("license") for e in experts}
    license_kw: Dict[str, Any] = {}
    if len(licenses) == 1 and None not in licenses:
        license_kw["license"] = licenses.pop()
    else:
        license_kw.update(license="other", license_name="mixed-or-unknown")
    hub_ids = [e["model"] for e in experts if not e["local"]]
    objective = recipe["objective"]
    metric = f"{objective['type']} utility"
    results = report["scores"]
    eval_results = []
    for split in ("dev", "test"):
        value = results["winner"].get(split)
        if value is not None:
            eval_results.append(EvalResult(
                task_type="text-generation", dataset_type=name + f"-{split}", dataset_name=f"{name} {split} set",
                dataset_split=split, metric_type=objective["type"], metric_name=metric, metric_value=round(value["utility"], 6),
            ))
    card_data = ModelCardData(
        model_name=name,
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        tags=TAGS,
        library_name="transformers",
        eval_results=eval_results or None,
        **{k: v for k, v in license_kw.items() if v is not None},
    )

    # Per-group columns on the held-out test set, or on dev when there is none.
    group_split = "test" if any(row.get("test") for row in results["rows"]) else "dev"
    groups = sorted({g for row in results["rows"] for g in (row.get(group_split) or {}).get("groups", {})})
    rows = []
    for row in results["rows"]:
        split = row.get(group_split) or {}
        rows.append({
            "name": f"**{row['name']}**" if row.get("kind") == "winner" else row["name"],
            "dev": _fmt((row.get("dev") or {}).get("utility")),
            "test": _fmt((row.get("test") or {}).get("utility")),
            "groups": [_fmt(split.get("groups", {}).get(g)) for g in groups],
        })
    coefficients = report["coefficients"]
    expert_rows = []
    for k, e in enumerate(experts):
        link = f"[{e['model']}](https://huggingface.co/{e['model']})" if not e["local"] else f"`{e['name']}` (local)"
        revision = "local"
        if e.get("revision"):
            # The short sha links to the exact commit's files; the full one is in swarm.json
            # and in mergekit_config.yml below.
            revision = f"[`{e['revision'][:12]}`](https://huggingface.co/{e['model']}/tree/{e['revision']})"
            if e.get("requested_revision") and e["requested_revision"] != e["revision"]:
                revision += f" (`{e['requested_revision']}`)"
        expert_rows.append({
            "link": link,
            "short": e["name"],
            "revision": revision,
            "coefficient": f"{coefficients['model'][k]:+.4f}" if coefficients.get("model") else "",
        })
    layer_rows = [{"label": label, "cells": [f"{v:+.3f}" for v in vals]}
                  for label, vals in zip(coefficients.get("groups", []), coefficients.get("per_group", []))]
    notes = []
    moving = [e for e in experts if e.get("revision") and e.get("requested_revision") != e["revision"]]
    if "license_name" in license_kw:
        notes.append("License: the experts' licenses differ or are unknown; check each expert's license before use.")
    search = report["search"]
    template = resources.files("swarm_merge").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        name=name,
        experts=expert_rows,
        dev_rows=results["winner"]["dev"]["n"],
        objective=f"`{objective['type']}`",
        objective_note=" ".join(notes + [f"Utility: `{objective['type']}` (higher is better)."]),
        group_names=groups,
        group_split=group_split,
        pinned_note=bool(moving),
        results=rows,
        granularity=recipe["swarm"]["granularity"],
        group_labels=coefficients.get("groups", []),
        layer_rows=layer_rows,
        swarm=recipe["swarm"],
        iterations=search["iterations"],
        stop_reason=search["stop_reason"],
        evaluations=search["evaluations"],
        wall_time=f"{report['wall_seconds']:.0f} s",
        hardware=report["hardware"],
        plot=plot,
        repo_id=repo_id or name,
        recipe_yaml=recipe_yaml.rstrip(),
        mergekit_yaml=mergekit_yaml.rstrip(),
    )
    return card


def set_repo_id(card_text: str, repo_id: str) -> str:
    """Point the card's usage snippet at ``repo_id`` (for a push to another repo than the run named)."""
    return re.sub(r'(\.from_pretrained\(")[^"\n]*("\))', lambda m: m.group(1) + repo_id + m.group(2), card_text)
