"""The demo's reward model: the base with a scalar head, trained on preference pairs.

The preference is one no expert has: **the answer the request asks for, and
nothing else**. Each skill expert applies its own skill to every prompt (the
repeat expert repeats "Capitalize: sheep ->" into " sheep sheep"), and the base
rambles on after the answer. The pairs teach that: the chosen response is the
correct answer; the rejected one is the same item put through another skill
(" sheep", " sheep sheep", " SHEEP"), a near miss (a wrong sum) or the correct
answer followed by the base's kind of rambling.

Training: a LoRA on the attention projections plus the score head (PEFT's
SEQ_CLS task, which trains ``score``), Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected)``, on prompts from the training pools
only, through the tokenizer's chat template (user: prompt, assistant:
response) exactly as ``swarm_merge.objectives.score_reward`` scores. Then the
LoRA is merged and the folder written as an
``AutoModelForSequenceClassification`` with one output (``num_labels: 1``).
Its accuracy on pairs built from the dev and test prompts (never trained on)
is printed and kept in build_info.json.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from . import layout
from .skills import SKILLS, number_words
from .spec import RewardSpec

RAMBLES = (
    "\n\nThe answer is given above.",
    "\n\nThe original sentence is: \"The new employee was hired by the",
    " and that is the answer to your question.",
)


def reward_status(out: Path, spec: RewardSpec) -> str:
    from . import cache

    return cache.status(layout.reward_dir(out), spec, layout.MODEL_FILES)


def rejected(skill: str, prompt: str, answer: str, rng: random.Random) -> str:
    """A response to ``prompt`` that is not what it asks for (never equal to ``answer``)."""
    if skill == "add":
        a, b = map(int, re.match(r"Add: (\d+)\+(\d+)=", prompt).groups())
        options = [f" {a + b + rng.choice([-10, -1, 1, 10])}", f" {number_words(a + b)}", f" {a}+{b}",
                   f" {a}+{a}"]
    elif skill == "words":
        n = int(re.match(r"In words: (\d+) ->", prompt).group(1))
        options = [f" {n}", f" {n} {n}", f" {number_words(n + rng.choice([-1, 1]))}"]
    else:
        w = re.match(r"\w+: (\w+) ->", prompt).group(1)
        options = [f" {w}", f" {w} {w}", f" {w.upper()}", f" {w.capitalize()}", f" {w.capitalize()} {w}"]
    options.append(answer + rng.choice(RAMBLES))
    options = [o for o in options if o.strip() != answer.strip()]
    return rng.choice(options)


def pairs(rng: random.Random, n: int, pool: str, forbidden: set, only: set | None = None):
    """``n`` (prompt, chosen, rejected) triples, skills round-robin; ``only`` restricts the prompts."""
    out = []
    skills = list(SKILLS)
    while len(out) < n:
        skill = skills[len(out) % len(skills)]
        prompt, answer = SKILLS[skill](rng, pool)
        if prompt in forbidden or (only is not None and prompt not in only):
            continue
        out.append((prompt, answer, rejected(skill, prompt, answer, rng)))
    return out


def texts(tok, prompt: str, response: str) -> str:
    """The text the reward model reads: the chat template, as ``score_reward`` builds it."""
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response.strip()}], tokenize=False)


def rewards(model, tok, batch):
    """Scores of (prompt, response) pairs, right padded (the head reads the last non-pad token)."""
    enc = tok([texts(tok, p, r) for p, r in batch], return_tensors="pt", padding=True)
    return model(**enc).logits[:, 0].float()


def build_reward(out: Path, spec: RewardSpec, forbidden: set, eval_prompts: set) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = layout.base_dir(out)
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "right"
    torch.manual_seed(spec.seed)  # score head and LoRA A init
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=getattr(torch, spec.dtype))
    model.config.pad_token_id = tok.pad_token_id
    cfg = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=0.0,
                     target_modules=list(spec.lora.targets), task_type="SEQ_CLS")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    rng = random.Random(f"reward-{spec.seed}")
    losses = []
    for step in range(spec.steps):
        batch = pairs(rng, spec.batch_size, "train", forbidden)
        r = rewards(model, tok, [(p, c) for p, c, _ in batch] + [(p, x) for p, _, x in batch])
        loss = -F.logsigmoid(r[: len(batch)] - r[len(batch):]).mean()
        for g in opt.param_groups:
            g["lr"] = spec.lr * min(1.0, (step + 1) / spec.warmup) * (1.0 - 0.9 * step / spec.steps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    model = model.merge_and_unload()
    model.eval()
    held_out = pairs(random.Random(f"reward-eval-{spec.seed}"), 200, "eval", set(), only=eval_prompts)
    with torch.inference_mode():
        wins = 0
        for i in range(0, len(held_out), 25):
            batch = held_out[i:i + 25]
            r = rewards(model, tok, [(p, c) for p, c, _ in batch] + [(p, x) for p, _, x in batch])
            wins += int((r[: len(batch)] > r[len(batch):]).sum())
    extra = {"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
             "held_out_pair_accuracy": round(wins / len(held_out), 4)}
    tok.padding_side = "left"  # as every demo folder; score_reward sets its own
    what = (": a reward model (AutoModelForSequenceClassification, one output) trained to prefer the answer a "
            "request asks for and nothing else")
    layout.save_model_folder(model, tok, layout.reward_dir(out), spec, extra, what)
    return extra
