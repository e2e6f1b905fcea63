"""Objectives scored on log-likelihoods: multiple_choice and loglik (a batch's common prefix computed once)."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch


from swarm_merge.objectives.rows import Score, aggregate, batches, left_padded, prepare_prompt

LOG = logging.getLogger(__name__)


MIN_SHARED_PREFIX = 16


def _common_prefix(rows: Sequence[Sequence[int]], limit: int) -> int:
    n = 0
    first = rows[0]
    while n < limit and all(len(r) > n and r[n] == first[n] for r in rows):
        n += 1
    return n


def _forward_with_shared_prefix(model, rows: List[List[int]], shared: int, pad: int, keep: int, device):
    """Logits of the last ``keep`` positions of every row, the ``shared`` leading
    tokens (the same in every row) computed once.

    The prefix runs as one row; its key/value cache is repeated for the batch;
    the rest of each row follows, left-padded, so the mask has a hole between
    prefix and suffix and positions continue from the prefix. Exact: the same
    attention over the same keys and values, to float rounding.
    """
    import inspect

    prefix = torch.tensor([rows[0][:shared]], device=device)
    out = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(len(rows))
    ids, mask, positions = left_padded([r[shared:] for r in rows], pad)
    mask = torch.cat([torch.ones((len(rows), shared), dtype=mask.dtype), mask], dim=1)
    # transformers 5.x renames the forward's `past_key_values` to `cache` (the old name warns, then goes).
    forward = getattr(model, "forward", model)
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=(positions + shared).to(device),
                 logits_to_keep=keep, use_cache=True, **{name: cache}).logits


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, pairs: Sequence[Tuple[str, str]], batch_size: int, device,
                           share_prefix: bool = True) -> List[Tuple[float, int]]:
    """Sum of log-probabilities of each continuation given its context, and its token count.

    ``share_prefix``: compute a prefix common to a batch's rows once (see
    :data:`MIN_SHARED_PREFIX`); off in streaming mode, where the extra forward
    would rebuild every weight once more.
    """
    seqs = []
    for context, continuation in pairs:
        ctx = tokenizer(context)["input_ids"] if context else []
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ctx:  # a bare text: score every token after the first
            ctx, cont = cont[:1], cont[1:]
        seqs.append((ctx, cont))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    results: List[Tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for batch in batches(order, batch_size):
        # Left padding puts every continuation at the end of its row, so only the
        # last `keep` positions need logits: the (large) vocabulary projection
        # runs on the continuation tokens alone.
        rows = [seqs[i][0] + seqs[i][1] for i in batch]
        keep = max(len(seqs[i][1]) for i in batch) + 1
        # Every logit that is read sits after the shared part: stop it one token
        # before the shortest context ends.
        shared = _common_prefix(rows, min(len(seqs[i][0]) for i in batch) - 1) if share_prefix and len(rows) > 1 else 0
        if shared >= MIN_SHARED_PREFIX:
            logits = _forward_with_shared_prefix(model, rows, shared, pad, keep, device)
        else:
            ids, mask, positions = left_padded(rows, pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           logits_to_keep=keep, use_cache=False).logits
        # fp32 log-softmax: bf16 logits lose the small differences between choices.
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(batch):
            cont = seqs[i][1]
            if not cont:
                results[i] = (0.0, 0)
                continue
            # kept index j is position width-keep+j; the logit at position t predicts token t+1.
            first = keep - len(cont) - 1
            picked = logprobs[row, torch.arange(first, first + len(cont)), torch.tensor(cont)]
            results[i] = (float(picked.sum()), len(cont))
    return results


@torch.inference_mode()
def score_multiple_choice(model, tokenizer, examples, objective, device, batch_size=None, share_prefix=True) -> Score:
    pairs, owner = [], []
    for idx, ex in enumerate(examples):
        for choice in ex.choices:
            pairs.append((prepare_prompt(tokenizer, objective, ex.prompt), choice))
            owner.append(idx)
    scored = continuation_logprobs(model, tokenizer, pairs, batch_size or objective.batch_size, device,
                                    share_prefix=share_prefix)
    per_example: Dict[int, List[float]] = defaultdict(list)
    for idx, (logprob, count) in zip(owner, scored):
        # Length-normalised: longer choices are not penalised for their length.
        per_example[idx].append(logprob / max(count, 1))
    hits = [float(max(range(len(v)), key=v.__getitem__) == examples[i].answer) for i, v in sorted(per_example.items())]
    return aggregate(hits, [1.0] * len(examples), examples)


@torch.inference_mode()
def score_loglik(model, tokenizer, examples, objective, device, batch_size=None, share_prefix=True) -> Score:
    pairs = [(prepare_prompt(tokenizer, objective, ex.prompt), ex.answer) for ex in examples]
    scored = continuation_logprobs(model, tokenizer, pairs, batch_size or objective.batch_size, device,
                                    share_prefix=share_prefix)
    # Utility = minus mean NLL per token, pooled over tokens (and per group).
    values = [lp / n if n else 0.0 for lp, n in scored]
    weights = [float(n) for _, n in scored]
    result = aggregate(values, weights, examples)
    if not math.isfinite(result.utility):
        return Score(float("nan"), result.groups, result.n)
    return result
