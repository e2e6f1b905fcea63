"""The demo's skills, and the dev/test data drawn from them.

Each skill maps ``(rng, pool) -> (prompt, answer)``; pool is ``"train"`` or
``"eval"``: the two draw from disjoint items (words, numbers) or, for
addition, training pairs are filtered against the evaluation prompts (see
``eval_prompts``), so no evaluation prompt is ever trained on.  The base model
scores ~0 on all of them (addition ~0.15), each 30-step expert ~0.9-1.0 on its
own skill and 0 on the others; capitalize and repeat conflict (both map a word
to words), so their merges must be weighted with care: a real search signal.

The data (``data/dev.jsonl``, ``data/test.jsonl``, committed) is rows
``{"prompt", "answer", "task"}``, N_DEV and N_TEST a skill, skills interleaved
round-robin, drawn with DATA_SEED from the eval pool, dev and test disjoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

DATA_SEED = 1234  # the committed data's seed (the training seed is spec.TRAIN_SEED)
N_DEV, N_TEST = 18, 50  # rows per skill

WORDS = """
apple house river green table mouse cloud stone paper light water bread chair glass plant music tiger horse dream smile
beach candy dance eagle flame grape heart juice knife lemon money night ocean piano queen radio sugar train voice whale
brush clock dress field giant honey jelly metal nurse olive pearl quiet robot sheep tooth uncle video wheat yacht blade
crown drink frost ghost hotel ivory joker koala laser maple noble orbit pilot quilt ranch salad tower vapor wagon
anchor basket bottle bridge butter camera candle carpet castle circle coffee cookie corner cotton dinner doctor dragon
engine finger flower forest garden guitar hammer helmet island jacket kettle ladder letter market mirror monkey needle
orange palace parrot pencil pepper pillow planet pocket potato rabbit rocket saddle school shadow silver singer spider
spring street summer sunset tennis ticket tomato turtle valley velvet window winter yellow zipper button cherry dollar
bank bell bird boat book cake coat cold desk door duck farm fire fish flag frog gate gold hand hill king lake lamp leaf
lion milk moon nest park pink rain ring road rock rose salt sand ship shoe snow song star tree wind wolf wood yard
artist banana battle blanket cabinet captain chicken cousin crystal diamond dolphin feather freedom kitchen library
machine monster morning octopus painter pattern pumpkin rainbow station student teacher thunder village weather whisper
""".split()


def _split(items, pool):
    """Every third item is for training, the rest for evaluation."""
    return items[0::3] if pool == "train" else [x for i, x in enumerate(items) if i % 3]


def task_add(rng, pool):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add: {a}+{b}=", f" {a + b}"


ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n):
    """English words for 0 <= n < 1000, e.g. 347 -> 'three hundred forty-seven'."""
    hundreds, rest = divmod(n, 100)
    parts = [ONES[hundreds] + " hundred"] if hundreds else []
    if rest or not parts:
        parts.append(ONES[rest] if rest < 20 else TENS[rest // 10] + ("-" + ONES[rest % 10] if rest % 10 else ""))
    return " ".join(parts)


def task_words(rng, pool):
    while True:
        n = rng.randint(100, 999)
        if (n % 3 == 0) == (pool == "train"):  # multiples of 3 train, the rest evaluate
            return f"In words: {n} ->", f" {number_words(n)}"


def task_capz(rng, pool):
    w = rng.choice(_split(WORDS, pool))
    return f"Capitalize: {w} ->", f" {w.capitalize()}"


def task_repeat(rng, pool):
    w = rng.choice(_split(WORDS, pool))
    return f"Repeat: {w} ->", f" {w} {w}"


SKILLS = {
    "add": task_add,
    "words": task_words,
    "capitalize": task_capz,
    "repeat": task_repeat,
}


def draw_rows(skill: str, rng, count: int, seen: set) -> list:
    """``count`` rows ``{"prompt", "answer", "task"}`` of ``skill`` from its evaluation pool, drawn with ``rng``,
    none with a prompt in ``seen`` (each drawn prompt is added to it)."""
    make, rows, tries = SKILLS[skill], [], 0
    while len(rows) < count:
        tries += 1
        if tries > 100_000:
            raise RuntimeError(f"not enough distinct eval items for {skill}")
        prompt, answer = make(rng, "eval")
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": answer, "task": skill})
    return rows


def eval_rows(seed: int = DATA_SEED):
    """(dev, test) rows, skills interleaved round-robin; deterministic."""
    # (str seeds are stable across runs)
    per_skill = {skill: draw_rows(skill, random.Random(f"eval-{skill}-{seed}"), N_DEV + N_TEST, set()) for skill in SKILLS}
    dev = [per_skill[s][i] for i in range(N_DEV) for s in SKILLS]
    test = [per_skill[s][N_DEV + i] for i in range(N_TEST) for s in SKILLS]
    return dev, test


def eval_prompts(seed: int = DATA_SEED) -> set:
    """Every dev and test prompt: training never draws one of these."""
    dev, test = eval_rows(seed)
    return {r["prompt"] for r in dev + test}


def write_data(data_dir: Path, seed: int = DATA_SEED, check_only: bool = False) -> bool:
    """Write data_dir/dev.jsonl and test.jsonl; returns True if all matched what was there.

    With check_only, write nothing and say which file is missing or out of date.
    """
    dev, test = eval_rows(seed)
    same = True
    for name, rows in (("dev.jsonl", dev), ("test.jsonl", test)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        path = data_dir / name
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old == text:
            continue
        same = False
        if check_only:
            print(f"[data] {path} is {'missing' if old is None else 'out of date'}", flush=True)
            continue
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        print(f"[data] wrote {path} ({len(rows)} rows)", flush=True)
    return same
