"""Objectives scored on what the model writes: exact_match (greedy completion, cut at its line), and the
greedy decoding the reward and judge objectives share."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch


from swarm_merge.objectives.rows import Score, aggregate, batches, left_padded, prepare_prompt

LOG = logging.getLogger(__name__)


class _LineDone:
    """Stops generation once every row has written a non-blank line and a newline
    after it (or EOS): the first non-blank line is all that is scored. With ``answers``
    (exact_match), a row also stops once its match is decided whatever it writes next."""

    def __init__(self, tokenizer, start: int, eos: Optional[int], answers: Optional[List[str]] = None,
                 how: str = "prefix"):
        self.tokenizer, self.start, self.eos = tokenizer, start, eos
        self.answers, self.how = answers, how

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=False)
        done = []
        for i, (row, text) in enumerate(zip(input_ids, texts)):
            stripped = text.lstrip()
            ended = self.eos is not None and bool((row[self.start :] == self.eos).any())
            done.append(ended or ("\n" in stripped and stripped.split("\n", 1)[0].strip() != "")
                        or (self.answers is not None and _decided(stripped, self.answers[i], self.how)))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _decided(line: str, answer: str, how: str) -> bool:
    """Whether the match of a first line that begins with ``line`` (more text may follow on it) is
    already fixed: for prefix, once the line is as long as the answer or departs from it; for exact,
    once it departs from it (trailing blanks aside). Never on a partly decoded character (U+FFFD)
    or a special token's text, which later tokens may still change."""
    want = answer.strip()
    if not line or "\ufffd" in line or "<" in line or how == "contains":
        return False
    if how == "prefix" and len(line) >= len(want):
        return True
    head = line.rstrip()  # (exact: trailing blanks may still be followed by more of the answer)
    return len(head) > len(want) or not want.startswith(head)


@torch.inference_mode()
def greedy(model, tokenizer, examples, objective, device, batch_size=None, *, one_line: bool,
            until_decided: bool = False) -> List[str]:
    """Each row's greedy completion (``objective.max_new_tokens`` at most; with ``one_line``,
    generation stops once every row has finished its first non-blank line, and with
    ``until_decided`` once every row's exact match is decided: its completion may then be cut
    short, but scores as the whole one would)."""
    from transformers import StoppingCriteriaList

    prompts = [prepare_prompt(tokenizer, objective, ex.prompt) for ex in examples]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    # Longest first, so batches hold prompts of similar length (less padding).
    order = sorted(range(len(examples)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions = [""] * len(examples)
    for batch in batches(order, batch_size or objective.batch_size):
        # Left padding: every row's last prompt token sits at the same position.
        ids, mask, _ = left_padded([encoded[i] for i in batch], pad)
        width = ids.shape[1]
        answers = [examples[i].answer for i in batch] if until_decided else None
        stop = StoppingCriteriaList([_LineDone(tokenizer, width, tokenizer.eos_token_id, answers,
                                               getattr(objective, "match", "prefix"))]) if one_line else None
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=objective.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            stopping_criteria=stop,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            completions[i] = text
    return completions


def score_exact_match(model, tokenizer, examples, objective, device, batch_size=None) -> Score:
    completions = greedy(model, tokenizer, examples, objective, device, batch_size, one_line=True,
                          until_decided=True)
    hits = [float(_matches(text, ex.answer, objective.match)) for text, ex in zip(completions, examples)]
    return aggregate(hits, [1.0] * len(examples), examples)


# The objective's own model (a reward model or a judge), loaded once per run: (folder, device) -> (model, tokenizer).
_OBJECTIVE_MODELS: Dict[Tuple[str, str], Tuple[Any, Any]] = {}


def _matches(completion: str, answer: str, how: str) -> bool:
    # Compare the first non-blank line: answers are one line, models ramble on.
    lines = [line.strip() for line in completion.split("\n") if line.strip()]
    got = lines[0] if lines else ""
    want = answer.strip()
    if how == "exact":
        return got == want
    if how == "contains":
        return want in got
    return got.startswith(want)


# A batch whose rows share at least this many leading tokens (few-shot
# examples, a system prompt) runs them once and reuses their keys and values.
