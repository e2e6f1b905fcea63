#!/usr/bin/env python
"""Write the dev rows of bench/demo200: the demo at the paper's dev size (issue 22's racing goal).

The demo's four experts and test rows, and a dev set of 200 rows (50 a skill) where the demo has 72 (18 a
skill): the demo's 18 dev rows of each skill, then 32 more drawn by the same generator from the evaluation
pool (recipes/demo/builder/skills.py), never one of the demo's test rows and never a prompt an expert was
trained on (the add expert's training batches are drawn again from its seed and left out). Model Swarms
scores 200 dev rows, the other benches 72; racing saves more on more rows (bench/RESULTS.md, "Racing's floor on
72 dev rows, and racing at the paper's dev size"). Needs the demo's models (make demo-models); writes
data/dev.jsonl (committed).

    .venv/bin/python bench/demo200/build.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "recipes" / "demo"))

from builder import skills  # noqa: E402
from builder.spec import ExpertSpec  # noqa: E402
from builder.train import training_batches  # noqa: E402

PER_SKILL = 50


def trained_prompts(forbidden: set) -> set:
    """Every prompt the demo's experts trained on (their batches drawn again from their specs' seeds)."""
    return {prompt for skill in skills.SKILLS for batch in training_batches(ExpertSpec.for_skill(skill), forbidden)
            for prompt, _ in batch}


def dev_rows() -> list:
    dev, test = skills.eval_rows()
    used = {r["prompt"] for r in dev + test}
    banned = used | trained_prompts(used)
    per_skill = {s: [r for r in dev if r["task"] == s] for s in skills.SKILLS}
    for skill, rows in per_skill.items():
        rows += skills.draw_rows(skill, random.Random(f"demo200-{skill}"), PER_SKILL - len(rows), banned)
    return [per_skill[s][i] for i in range(PER_SKILL) for s in skills.SKILLS]


def main() -> None:
    rows = dev_rows()
    out = HERE / "data" / "dev.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
