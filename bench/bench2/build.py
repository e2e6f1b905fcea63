#!/usr/bin/env python
"""Build (once) the second held-out bench of bench/bench_selection.py (issue 12).

Four new skills on the demo's base model (SmolLM2-135M-Instruct, built by
recipes/demo/build_experts.py first), each a LoRA expert merged to a full
model, trained with the demo's builder (same cache, same determinism); one
expert is **weak** (few training steps):

    upper   "Upper: tiger ->"        -> " TIGER"
    plural  "Plural: tiger ->"       -> " tigers"
    double  "Double: 123 ->"         -> " 246"
    first   "First letter: tiger ->" -> " t"      (the weak one: 6 steps)

Dev (18 rows a skill) and test (50 a skill, never searched) are drawn like the
demo's, from items never trained on; models go to bench/bench2/models/
(ignored by git), data to bench/bench2/data/ (committed).

    .venv/bin/python bench/bench2/build.py        # ~3 min on 2 CPU cores, instant when built
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "recipes" / "demo"))

import build_experts  # noqa: E402  (the demo's entry point: runtime setup)
from builder import layout, skills  # noqa: E402
from builder.skills import WORDS, _split  # noqa: E402
from builder.spec import ExpertSpec  # noqa: E402
from builder.train import build_expert, expert_status  # noqa: E402

REGULAR = [w for w in WORDS if not w.endswith(("s", "x", "z", "ch", "sh", "y", "f", "fe", "o"))]


def task_upper(rng, pool):
    w = rng.choice(_split(WORDS, pool))
    return f"Upper: {w} ->", f" {w.upper()}"


def task_plural(rng, pool):
    w = rng.choice(_split(REGULAR, pool))
    return f"Plural: {w} ->", f" {w}s"


def task_double(rng, pool):
    while True:
        n = rng.randint(10, 199)
        if (n % 3 == 0) == (pool == "train"):
            return f"Double: {n} ->", f" {2 * n}"


def task_first(rng, pool):
    w = rng.choice(_split(WORDS, pool))
    return f"First letter: {w} ->", f" {w[0]}"


NEW_SKILLS = {"upper": task_upper, "plural": task_plural, "double": task_double, "first": task_first}
STEPS = {"upper": 30, "plural": 30, "double": 30, "first": 6}  # first: the weak expert


def build(here: Path, new_skills: dict, steps: dict) -> int:
    """Write ``here``/data and build one expert a skill of ``new_skills`` (``steps`` training steps each) in
    ``here``/models, on the demo's base; a bench of new skills (bench3 and bench4 use it too)."""
    # The demo builder's functions read its SKILLS table: point it at the new skills.
    skills.SKILLS.clear()
    skills.SKILLS.update(new_skills)
    skills.write_data(here / "data")
    build_experts.setup_runtime(2)
    demo_models = REPO / "recipes" / "demo" / "models"
    out = here / "models"
    out.mkdir(exist_ok=True)
    base = layout.base_dir(out)
    if not base.exists():
        base.symlink_to(layout.base_dir(demo_models).resolve())  # the demo's base, built by `make demo-models`
    forbidden = skills.eval_prompts()
    for skill in new_skills:
        spec = ExpertSpec.for_skill(skill, steps=steps[skill])
        if expert_status(out, spec) == "ok":
            print(f"[{skill}] complete, skipped", flush=True)
            continue
        t0 = time.time()
        stats = build_expert(out, spec, forbidden)
        print(f"[{skill}] {spec.steps} steps, loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f} "
              f"in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(build(HERE, NEW_SKILLS, STEPS))
