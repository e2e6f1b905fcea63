#!/usr/bin/env python
"""Build (once) the fourth held-out bench of bench/bench_selection.py (issue 22, "How we will check it").

Four skills of four different shapes (a word, a count, a number, two letters), so that a merge can keep more than
two of them (on bench3 no merge kept `half` beside `next`); on the demo's base model (``make demo-models``
first), with bench2's builder; one expert is **weak** (few steps):

    lower  "Lower: TIGER ->"        -> " tiger"
    count  "Letters in tiger ->"    -> " 5"
    digits "Digit sum: 123 ->"      -> " 6"
    initials "Initials: tiger horse ->" -> " TH"  (the weak one: 8 steps)

Dev (18 rows a skill) and test (50 a skill, never searched), from items never trained on; models go to
bench/bench4/models/ (ignored by git), data to bench/bench4/data/ (committed).

    .venv/bin/python bench/bench4/build.py        # ~1 min on 2 CPU cores, instant when built
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "bench2"))

import build as bench2  # noqa: E402  (bench2's builder: the demo's, pointed at new skills)
from builder.skills import WORDS, _split  # noqa: E402


def task_lower(rng, pool):
    w = rng.choice(_split(WORDS, pool))
    return f"Lower: {w.upper()} ->", f" {w}"


def task_count(rng, pool):
    w = rng.choice(_split(WORDS, pool))
    return f"Letters in {w} ->", f" {len(w)}"


def task_digits(rng, pool):
    while True:
        n = rng.randint(100, 999)
        if (n % 3 == 0) == (pool == "train"):
            return f"Digit sum: {n} ->", f" {sum(int(d) for d in str(n))}"


def task_initials(rng, pool):
    a, b = rng.sample(_split(WORDS, pool), 2)
    return f"Initials: {a} {b} ->", f" {a[0].upper()}{b[0].upper()}"


NEW_SKILLS = {"lower": task_lower, "count": task_count, "digits": task_digits, "initials": task_initials}
STEPS = {"lower": 30, "count": 30, "digits": 30, "initials": 8}  # initials: the weak expert

if __name__ == "__main__":
    sys.exit(bench2.build(HERE, NEW_SKILLS, STEPS))
