#!/usr/bin/env python
"""Build (once) the third held-out bench of bench/bench_selection.py (issue 22, "How we will check it").

Four skills that no default was tuned on, on the demo's base model (built by ``make demo-models`` first),
with bench2's builder (bench/bench2/build.py, the demo's training); one expert is **weak** (few steps):

    swap   "Swap: tiger horse ->"  -> " horse tiger"
    next   "Next: 41 ->"           -> " 42"
    half   "Half: 246 ->"          -> " 123"
    last   "Last letter: tiger ->" -> " r"      (the weak one: 8 steps)

Dev (18 rows a skill) and test (50 a skill, never searched), from items never trained on; models go to
bench/bench3/models/ (ignored by git), data to bench/bench3/data/ (committed).

    .venv/bin/python bench/bench3/build.py        # ~3 min on 2 CPU cores, instant when built
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "bench2"))

import build as bench2  # noqa: E402  (bench2's builder: the demo's, pointed at new skills)
from builder.skills import WORDS, _split  # noqa: E402


def task_swap(rng, pool):
    a, b = rng.sample(_split(WORDS, pool), 2)
    return f"Swap: {a} {b} ->", f" {b} {a}"


def task_next(rng, pool):
    while True:
        n = rng.randint(10, 998)
        if (n % 3 == 0) == (pool == "train"):
            return f"Next: {n} ->", f" {n + 1}"


def task_half(rng, pool):
    while True:
        n = rng.randint(10, 199)
        if (n % 3 == 0) == (pool == "train"):
            return f"Half: {2 * n} ->", f" {n}"


def task_last(rng, pool):
    w = rng.choice(_split(WORDS, pool))
    return f"Last letter: {w} ->", f" {w[-1]}"


NEW_SKILLS = {"swap": task_swap, "next": task_next, "half": task_half, "last": task_last}
STEPS = {"swap": 30, "next": 30, "half": 30, "last": 8}  # last: the weak expert

if __name__ == "__main__":
    sys.exit(bench2.build(HERE, NEW_SKILLS, STEPS))
