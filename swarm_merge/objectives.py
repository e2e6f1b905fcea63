"""Utilities: what a particle scores on the dev set (higher is better).

One registry, :data:`OBJECTIVES`, maps a recipe's ``objective.type`` to its
:class:`ObjectiveKind`: the scoring function ``(model, tokenizer, examples,
objective, device) -> Score`` and what the rest of the tool may assume of its
utility (racing slices it, the analyses read 0/1 rows). Adding a type is one
entry here, its scorer, and its name in recipe.OBJECTIVE_TYPES.
Each function makes few, large batches: in streaming mode every forward call
rebuilds the weights, so the number of forward calls is the cost that counts.

JSONL rows:
- exact_match: ``{"prompt", "answer"}``: greedy completion (cut at its first
  newline, stripped) compared with the stripped answer (``match``: prefix,
  exact or contains).
- multiple_choice: ``{"prompt", "choices", "answer": index}``: the choice with
  the highest mean log-likelihood per token wins.
- loglik: ``{"prompt", "answer"}`` or ``{"text"}``: utility is minus the mean
  token NLL of the answer (or of the whole text after its first token).
Other fields are kept; the one named by ``objective.group_by`` (default
``task``) breaks scores down per group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from swarm_merge.errors import DataError
from swarm_merge.report import finite

__all__ = ["Example", "Score", "Suite", "Custom", "load_code", "load_examples", "score", "task_of", "row_count", "OBJECTIVES",
           "ObjectiveKind", "kind_of"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: Any = None
    choices: Optional[Tuple[str, ...]] = None
    group: Optional[str] = None
    raw: Optional[dict] = field(default=None, compare=False, repr=False)  # the JSONL row (custom objectives)


@dataclass(frozen=True)
class Score:
    utility: float
    groups: Dict[str, float] = field(default_factory=dict)
    n: int = 0
    # Each row's value (accuracy objectives: 0 or 1) and weight (loglik: its answer's tokens; else 1), in the
    # data's order (a suite: its components' rows one after the other); not in to_dict (racing memoises them).
    rows: Optional[List[float]] = field(default=None, repr=False, compare=False)
    weights: Optional[List[float]] = field(default=None, repr=False, compare=False)

    def to_dict(self, *, rows: bool = False) -> Dict[str, Any]:
        """Strict-JSON form: a utility that is not finite is None. ``rows``: with each row's value and
        weight too (racing's memo), where the utility is finite (then so are they)."""
        out = {"utility": finite(self.utility), "groups": {g: finite(v) for g, v in self.groups.items()}, "n": self.n}
        if rows and out["utility"] is not None and self.rows is not None and self.weights is not None:
            if all(math.isfinite(v) for v in self.rows) and all(math.isfinite(w) for w in self.weights):
                out["rows"], out["weights"] = list(self.rows), list(self.weights)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Score":
        def num(v):
            return float("nan") if v is None else float(v)

        rows, weights = data.get("rows"), data.get("weights")
        if rows is not None or weights is not None:  # (a checkpoint is input: check what racing will read)
            if not isinstance(rows, list) or not isinstance(weights, list) or len(rows) != len(weights):
                raise TypeError("rows and weights are not two lists of the same length")
            rows, weights = [float(v) for v in rows], [float(w) for w in weights]
        return cls(num(data["utility"]), {g: num(v) for g, v in data.get("groups", {}).items()}, int(data.get("n", 0)),
                   rows=rows, weights=weights)




# ----------------------------------------------------------------------- data


def load_examples(path: str, objective_type: str, group_by: Optional[str] = "task") -> List[Example]:
    """Read and check a JSONL data file; errors name the file and line."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {path!r} not found; check objective.dev / objective.test in the recipe")
    if not p.is_file():
        # A FIFO or a device would block the run (or never end): regular files only.
        raise DataError(f"data file {path!r} is not a regular file; point objective.dev / objective.test at a JSONL file")
    examples = []
    try:
        fh = p.open("rb")
    except OSError as exc:
        raise DataError(f"data file {path!r} cannot be read ({exc.strerror or type(exc).__name__}); "
                        "check its permissions") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); write one JSON object per line") from None
            except (ValueError, RecursionError) as exc:  # an integer too long to convert, nesting too deep
                raise DataError(f"{path}:{lineno}: unreadable JSON value ({str(exc)[:80]}); fix that row") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: a row must be a JSON object, not {type(row).__name__}")
            examples.append(_example(row, objective_type, group_by, f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"data file {path!r} is empty; add JSONL rows")
    return examples


def _need_str(row: dict, key: str, where: str, shape: str, *, nonempty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string (rows look like {shape})")
    if nonempty and not value.strip():
        # An empty prompt has nothing to generate from or to condition the choices on.
        raise DataError(f"{where}: {key!r} is empty; give every row a prompt (rows look like {shape})")
    return value


def _example(row: dict, kind: str, group_by: Optional[str], where: str) -> Example:
    group = row.get(group_by) if group_by else None
    group = None if group is None else str(group)
    if kind == "exact_match":
        shape = '{"prompt": ..., "answer": ...}'
        prompt = _need_str(row, "prompt", where, shape, nonempty=True)
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{where}: 'answer' must be a non-empty string (rows look like {shape})")
        return Example(prompt=prompt, answer=answer, group=group)
    if kind == "multiple_choice":
        shape = '{"prompt": ..., "choices": [...], "answer": index}'
        prompt = _need_str(row, "prompt", where, shape, nonempty=True)
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of two or more non-empty strings (rows look like {shape})")
        answer = row.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: 'answer' must be the index of the right choice, 0..{len(choices) - 1}")
        return Example(prompt=prompt, answer=answer, choices=tuple(choices), group=group)
    if kind == "loglik":
        if "text" in row:
            text = _need_str(row, "text", where, '{"text": ...}')
            if not text.strip():
                raise DataError(f"{where}: 'text' is empty")
            return Example(prompt="", answer=text, group=group)
        shape = '{"prompt": ..., "answer": ...} or {"text": ...}'
        prompt = _need_str(row, "prompt", where, shape)
        answer = _need_str(row, "answer", where, shape)
        if not answer:
            raise DataError(f"{where}: 'answer' is empty")
        return Example(prompt=prompt, answer=answer, group=group)
    if kind in ("reward", "judge"):
        prompt = _need_str(row, "prompt", where, '{"prompt": ...}', nonempty=True)
        return Example(prompt=prompt, group=group)
    if kind == "custom":  # the row as written, for the --objective-code function
        prompt = row.get("prompt")
        return Example(prompt=prompt if isinstance(prompt, str) else "", answer=row.get("answer"), group=group, raw=row)
    raise DataError(f"unknown objective type {kind!r}")


# -------------------------------------------------------------------- scoring


def _prepare(tokenizer, objective, text: str) -> str:
    if objective.chat_template and text:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def aggregate(values: Sequence[float], weights: Sequence[float], examples: Sequence[Example]) -> Score:
    """The utility of per-row ``values`` with ``weights`` (the weighted mean, also per row group)."""
    total = sum(w * v for v, w in zip(values, weights))
    mass = sum(weights)
    groups: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0])
    for v, w, ex in zip(values, weights, examples):
        if ex.group is not None:
            groups[ex.group][0] += w * v
            groups[ex.group][1] += w
    return Score(
        utility=total / mass if mass else float("nan"),
        groups={g: s / m for g, (s, m) in sorted(groups.items()) if m},
        n=len(examples),
        rows=[float(v) for v in values],
        weights=[float(w) for w in weights],
    )


def _batches(order: Sequence[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _left_padded(seqs: Sequence[Sequence[int]], pad: int):
    """Left-padded ids, attention mask and position ids (positions count real tokens only)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


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
def _greedy(model, tokenizer, examples, objective, device, batch_size=None, *, one_line: bool,
            until_decided: bool = False) -> List[str]:
    """Each row's greedy completion (``objective.max_new_tokens`` at most; with ``one_line``,
    generation stops once every row has finished its first non-blank line, and with
    ``until_decided`` once every row's exact match is decided: its completion may then be cut
    short, but scores as the whole one would)."""
    from transformers import StoppingCriteriaList

    prompts = [_prepare(tokenizer, objective, ex.prompt) for ex in examples]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    # Longest first, so batches hold prompts of similar length (less padding).
    order = sorted(range(len(examples)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions = [""] * len(examples)
    for batch in _batches(order, batch_size or objective.batch_size):
        # Left padding: every row's last prompt token sits at the same position.
        ids, mask, _ = _left_padded([encoded[i] for i in batch], pad)
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
    completions = _greedy(model, tokenizer, examples, objective, device, batch_size, one_line=True,
                          until_decided=True)
    hits = [float(_matches(text, ex.answer, objective.match)) for text, ex in zip(completions, examples)]
    return aggregate(hits, [1.0] * len(examples), examples)


# The objective's own model (a reward model or a judge), loaded once per run: (folder, device) -> (model, tokenizer).
_OBJECTIVE_MODELS: Dict[Tuple[str, str], Tuple[Any, Any]] = {}


def _refuse_made_up_weights(info: dict, who: str) -> None:
    """transformers' own report of a load (``output_loading_info``): a tensor the checkpoint lacks, or holds
    in another shape, was filled with random values (it only logs that, and the CLI silences the log)."""
    from swarm_merge.errors import ExpertError

    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExpertError(f"{who}: transformers found no tensor {missing[0]!r}{more} in it and would score with "
                          "random values; use the complete checkpoint (every shard, saved with save_pretrained)")
    if mismatched:
        name = mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
        raise ExpertError(f"{who}: tensor {name!r} does not have the shape its config.json gives it; use the "
                          "config.json the weights were saved with")


def reward_model(path: str, device, dtype=None):
    """The reward model in ``path`` (AutoModelForSequenceClassification with one output), loaded once."""
    key = (str(path), str(device))
    if key not in _OBJECTIVE_MODELS:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from swarm_merge.errors import InputError

        model, info = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=False, dtype=dtype,
                                                                         output_loading_info=True)
        _refuse_made_up_weights(info, f"reward model {str(path)!r}")
        model = model.to(device).eval()
        if model.config.num_labels != 1:
            raise InputError(f"reward model {str(path)!r} has {model.config.num_labels} outputs; use a reward model "
                             "with one (num_labels: 1, a scalar reward head)")
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        _OBJECTIVE_MODELS.clear()  # one objective model at a time
        _OBJECTIVE_MODELS[key] = (model, tokenizer)
    return _OBJECTIVE_MODELS[key]


@torch.inference_mode()
def score_reward(model, tokenizer, examples, objective, device, batch_size=None) -> Score:
    """Mean reward of the greedy responses (the raw score of the reward head, not normalised)."""
    responses = _greedy(model, tokenizer, examples, objective, device, batch_size, one_line=False)
    judge, judge_tok = reward_model(objective.reward_model.model, device)
    texts = []
    for ex, response in zip(examples, responses):
        if getattr(judge_tok, "chat_template", None):
            texts.append(judge_tok.apply_chat_template(
                [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": response.strip()}],
                tokenize=False))
        else:
            texts.append(ex.prompt + response)
    rewards: List[float] = []
    for start in range(0, len(texts), batch_size or objective.batch_size):
        batch = judge_tok(texts[start:start + (batch_size or objective.batch_size)], return_tensors="pt",
                          padding=True, truncation=True)
        logits = judge(**{k: v.to(device) for k, v in batch.items()}).logits
        rewards += logits[:, 0].float().cpu().tolist()
    return aggregate(rewards, [1.0] * len(examples), examples)


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
    ids, mask, positions = _left_padded([r[shared:] for r in rows], pad)
    mask = torch.cat([torch.ones((len(rows), shared), dtype=mask.dtype), mask], dim=1)
    # transformers 5.x renames the forward's `past_key_values` to `cache` (the old name warns, then goes).
    forward = getattr(model, "forward", model)
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=(positions + shared).to(device),
                 logits_to_keep=keep, use_cache=True, **{name: cache}).logits


@torch.inference_mode()
def _continuation_logprobs(model, tokenizer, pairs: Sequence[Tuple[str, str]], batch_size: int, device,
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
    for batch in _batches(order, batch_size):
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
            ids, mask, positions = _left_padded(rows, pad)
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
            pairs.append((_prepare(tokenizer, objective, ex.prompt), choice))
            owner.append(idx)
    scored = _continuation_logprobs(model, tokenizer, pairs, batch_size or objective.batch_size, device,
                                    share_prefix=share_prefix)
    per_example: Dict[int, List[float]] = defaultdict(list)
    for idx, (logprob, count) in zip(owner, scored):
        # Length-normalised: longer choices are not penalised for their length.
        per_example[idx].append(logprob / max(count, 1))
    hits = [float(max(range(len(v)), key=v.__getitem__) == examples[i].answer) for i, v in sorted(per_example.items())]
    return aggregate(hits, [1.0] * len(examples), examples)


@torch.inference_mode()
def score_loglik(model, tokenizer, examples, objective, device, batch_size=None, share_prefix=True) -> Score:
    pairs = [(_prepare(tokenizer, objective, ex.prompt), ex.answer) for ex in examples]
    scored = _continuation_logprobs(model, tokenizer, pairs, batch_size or objective.batch_size, device,
                                    share_prefix=share_prefix)
    # Utility = minus mean NLL per token, pooled over tokens (and per group).
    values = [lp / n if n else 0.0 for lp, n in scored]
    weights = [float(n) for _, n in scored]
    result = aggregate(values, weights, examples)
    if not math.isfinite(result.utility):
        return Score(float("nan"), result.groups, result.n)
    return result


def judge_model(path: str, device):
    """The judge (a causal LM) in ``path``, loaded once (one judge at a time)."""
    key = (str(path), str(device))
    if key not in _OBJECTIVE_MODELS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, info = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, output_loading_info=True)
        _refuse_made_up_weights(info, f"judge model {str(path)!r}")
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        _OBJECTIVE_MODELS.clear()
        _OBJECTIVE_MODELS[key] = (model, tokenizer)
    return _OBJECTIVE_MODELS[key]


def judge_prompt(tokenizer, rubric: str, prompt: str, response: str) -> str:
    """The rubric with the prompt and response filled in, as the judge's user turn (its chat
    template when it has one), ending where the judge's answer (the rating) begins."""
    text = rubric.replace("{prompt}", prompt).replace("{response}", response)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text.rstrip() + "\n"


@torch.inference_mode()
def score_judge(model, tokenizer, examples, objective, device, batch_size=None) -> Score:
    """Mean expected rating of the greedy responses: for each response, the judge's probability
    of every rating string on the scale (the log-likelihood of each as its answer, normalised
    over the scale), and the rating they average to. Deterministic and smooth; there is no
    text to parse, so no rating is ever unparseable or dropped."""
    responses = _greedy(model, tokenizer, examples, objective, device, batch_size, one_line=False)
    judge, judge_tok = judge_model(objective.judge_model.model, device)
    low, high = objective.scale
    ratings = list(range(low, high + 1))
    pairs = []
    for ex, response in zip(examples, responses):
        context = judge_prompt(judge_tok, objective.rubric, ex.prompt, response.strip())
        pairs += [(context, str(r)) for r in ratings]
    scored = _continuation_logprobs(judge, judge_tok, pairs, batch_size or objective.batch_size, device)
    values = []
    for i in range(len(examples)):
        logp = torch.tensor([lp for lp, _ in scored[i * len(ratings):(i + 1) * len(ratings)]], dtype=torch.float64)
        probs = torch.softmax(logp, dim=0)
        values.append(float((probs * torch.tensor(ratings, dtype=torch.float64)).sum()))
    return aggregate(values, [1.0] * len(examples), examples)


_TASK_MANAGERS: Dict[Optional[str], Any] = {}
LM_EVAL_INSTALL = "pip install 'swarm-merge[lm-eval]'"


def release() -> None:
    """Forget the reward or judge model and the lm-eval task indexes loaded so far (the end of a run)."""
    _OBJECTIVE_MODELS.clear()
    _TASK_MANAGERS.clear()


def lm_eval_tasks(include_path: Optional[str]):
    """lm-evaluation-harness's TaskManager (built-in tasks plus ``include_path``), made once per run."""
    from swarm_merge.errors import InputError

    if include_path not in _TASK_MANAGERS:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise InputError(f"objective type lm_eval needs lm-evaluation-harness: {LM_EVAL_INSTALL}") from None
        _TASK_MANAGERS[include_path] = TaskManager(include_path=include_path, verbosity="ERROR")
    return _TASK_MANAGERS[include_path]


@contextlib.contextmanager
def _in_task_folder(include_path: Optional[str]):
    """Run the harness from ``include_path``, so a task YAML's relative ``data_files`` are read
    relative to its own folder (the harness reads them relative to the working directory,
    which would tie a recipe to the folder it is run from). Restored afterwards."""
    if not include_path:
        yield
        return
    here = os.getcwd()
    os.chdir(include_path)
    try:
        yield
    finally:
        os.chdir(here)


class _TaskCode:
    """A task YAML value under a tag that is not plain data (``!function utils.x``,
    ``!!python/name:...``): lm-evaluation-harness's loader would import and run it."""

    def __init__(self, tag: str, text: str):
        self.tag, self.text = tag.replace("tag:yaml.org,2002:", "!!"), text

    def __str__(self) -> str:
        return f"{self.tag} {self.text}".strip()


def _task_yaml_loader():
    """yaml's safe loader on the parser the harness uses (libyaml when present, as in
    lm_eval/tasks/_yaml_loader.py, so both read the same tree), keeping any other tag as
    :class:`_TaskCode` data instead of resolving it."""
    import yaml

    class Loader(yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader):
        pass

    def tagged(loader, node):
        return _TaskCode(node.tag, loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else "")

    Loader.add_constructor(None, tagged)  # None: every tag the safe loader does not know
    return Loader


# Task config keys that make the harness run code other than its own (lm_eval/tasks/_factory.py,
# lm_eval/api/task.py, datasets, transformers' generate), whatever their value...
_CODE_KEYS = {
    "class": "class (a Python task class)",
    "custom_dataset": "custom_dataset (a Python function building the dataset)",
    "custom_generate": "custom_generate (generation code from a repository)",
}
# ...and the ones that do when true.
_CODE_SWITCHES = {
    "trust_remote_code": "trust_remote_code (a dataset's or model's own code)",
    "unsafe_code": "unsafe_code (runs the code the model writes)",
    "hf_evaluate": "hf_evaluate (HF evaluate downloads and runs the metric's script)",
}


def _is_dataset_script(value: str, folders: Sequence[Path]) -> bool:
    """``dataset_path`` naming a loading script: a .py file, or a folder holding one
    (datasets resolves it from the working directory: include_path while scoring)."""
    if value.endswith(".py"):
        return True
    return any((folder / Path(value).expanduser()).is_dir() and any((folder / Path(value).expanduser()).glob("*.py"))
               for folder in folders)


def _hook_in(value, key: str, folders: Sequence[Path], metrics, seen: set) -> Optional[str]:  # noqa: C901 (one case per hook)
    """The first code hook in a task config ``value`` (at ``key``), described; None when it is all data."""
    if isinstance(value, _TaskCode):
        return f"{key}: {value}"
    if isinstance(value, (dict, list)):
        if id(value) in seen:  # YAML aliases share objects: walk each once
            return None
        seen.add(id(value))
    if isinstance(value, list):
        return next(filter(None, (_hook_in(v, key, folders, metrics, seen) for v in value)), None)
    if not isinstance(value, dict):
        return None
    for k, v in value.items():
        if isinstance(k, _TaskCode):
            return f"the key {k}"
        if k in _CODE_KEYS:
            return _CODE_KEYS[k]
        if k in _CODE_SWITCHES and v:
            return _CODE_SWITCHES[k]
        if k == "metric_list" and isinstance(v, list):
            for m in v:
                # A name the harness does not know goes to evaluate.load(name): a metric script, run.
                if isinstance(m, dict) and isinstance(m.get("metric"), str) and m["metric"] not in metrics:
                    return (f"metric: {m['metric']} (not one of the harness's own metrics, so HF evaluate would "
                            "load and run its script)")
        if k == "dataset_path" and isinstance(v, str) and _is_dataset_script(v, folders):
            return f"dataset_path: {v} (a dataset loading script)"
        if k == "use_prompt" and isinstance(v, str) and ".yaml" in v.split(":")[0]:
            return f"use_prompt: {v} (a prompt file read with PyYAML's full loader)"
        found = _hook_in(v, str(k), folders, metrics, seen)
        if found:
            return found
    return None


def _refuse_task_code(include_path: str) -> None:
    """Refuse a task folder that would make lm-evaluation-harness run code: every *.yaml/*.yml
    under ``include_path`` (the harness indexes them all) and what they ``include:``, read as data.

    Raises:
        InputError: a code hook (named with its file), an include outside ``include_path`` and
            the harness's own tasks folder, or a file that does not parse.
    """
    import yaml

    from swarm_merge.errors import InputError

    try:
        import lm_eval
        import lm_eval.api.metrics  # noqa: F401  (registers the harness's metrics)
        from lm_eval.api.registry import metric_registry
    except ImportError:
        raise InputError(f"objective type lm_eval needs lm-evaluation-harness: {LM_EVAL_INSTALL}") from None
    root = Path(include_path).resolve()
    builtin = (Path(lm_eval.__file__).parent / "tasks").resolve()  # the installed package's own tasks: its code
    loader = _task_yaml_loader()
    done: set = set()

    def refuse(path: Path, hook: str):
        return InputError(f"lm-eval task file {path} uses {hook}; a recipe's task folder runs no code of its own: "
                          "drop it, or pass --allow-task-code if you trust this folder")

    def scan(path: Path) -> None:
        path = path.expanduser().resolve()  # as lm_eval's load_yaml: includes are relative to the real file
        if path in done:
            return
        done.add(path)
        try:
            with path.open("rb") as fh:
                cfg = yaml.load(fh, Loader=loader)  # noqa: S506 (a safe loader: other tags stay data)
            hook = _hook_in(cfg, "", (root, path.parent), metric_registry, set())
        except (OSError, yaml.YAMLError, RecursionError) as exc:
            detail = " ".join(str(exc).split())[:160]
            raise InputError(f"lm-eval task file {path} cannot be read as YAML ({detail}); fix or remove it") from None
        if hook:
            raise refuse(path, hook.lstrip(": "))
        includes = cfg.get("include") if isinstance(cfg, dict) else None
        for inc in includes if isinstance(includes, list) else [] if includes is None else [includes]:
            if not isinstance(inc, str):
                continue  # the harness cannot follow it either
            target = (Path(inc) if Path(inc).is_absolute() else path.parent / inc).expanduser().resolve()
            if target.is_relative_to(root):
                scan(target)
            elif not target.is_relative_to(builtin):
                raise refuse(path, f"include: {inc} (a file outside include_path, unchecked)")

    if root.is_relative_to(builtin):
        return  # the harness's own tasks folder
    for found in sorted({p for pattern in ("**/*.yaml", "**/*.yml") for p in Path(include_path).glob(pattern)}):
        scan(found)


@contextlib.contextmanager
def _sandboxed_templates():
    """Task templates (doc_to_text, doc_to_target, doc_to_choice, description, ...) rendered in
    jinja2's immutable sandbox while the harness scores: a template can read the row's fields,
    not reach Python internals (``cycler.__init__.__globals__.os``).

    The harness renders every task template through ``lm_eval.utils.apply_template``, which
    reads the module-level ``lm_eval.utils.env`` at each call; that Environment is swapped for
    a sandboxed one with the same options and filters for the duration, then put back, so the
    harness is unchanged for anything else in the process. Flag or no flag: templates are data.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval import utils as harness

    plain = harness.env
    options = ("block_start_string", "block_end_string", "variable_start_string", "variable_end_string",
               "comment_start_string", "comment_end_string", "line_statement_prefix", "line_comment_prefix",
               "trim_blocks", "lstrip_blocks", "newline_sequence", "keep_trailing_newline", "undefined", "finalize",
               "autoescape", "loader")
    sandbox = ImmutableSandboxedEnvironment(**{name: getattr(plain, name) for name in options})
    sandbox.filters.update(plain.filters)  # the harness's regex_replace
    sandbox.tests.update(plain.tests)
    harness.env = sandbox
    try:
        yield
    finally:
        harness.env = plain


# datasets' generic builders: what they read is in data_files, not in the name.
GENERIC_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "xml", "sql"})


def benchmark_of(manager, task: str) -> Optional[str]:
    """Why searching on lm-eval ``task`` would tune on a public benchmark's scored split (None: it would not).

    A benchmark is one of the harness's own tasks (its tasks folder holds public benchmarks), a tag or
    group with one among its members, or a task of one's own that reads the dataset and split one of
    the harness's own tasks scores (``cais/mmlu``'s ``test`` under another name). Like mergekit-evolve's
    check, by what the task is, not by its name alone.
    """
    import lm_eval

    builtin = (Path(lm_eval.__file__).parent / "tasks").resolve()
    index = manager.task_index

    def own(entry) -> bool:
        return entry.yaml_path is not None and Path(entry.yaml_path).resolve().is_relative_to(builtin)

    def source(cfg):
        # A Hub dataset by its id; a generic builder (json, csv, ...) by the files it reads.
        dataset = cfg.get("dataset_path")
        if dataset in GENERIC_BUILDERS:
            kwargs = cfg.get("dataset_kwargs")
            return dataset, repr(kwargs.get("data_files") if isinstance(kwargs, dict) else None)
        return dataset, None

    def scored_split(cfg) -> Optional[str]:
        return cfg.get("test_split") or cfg.get("validation_split")

    def reason(name: str, seen: set) -> Optional[str]:
        entry = index.get(name)
        if entry is None or name in seen:
            return None
        seen.add(name)
        if own(entry):
            return f"{name} is one of lm-evaluation-harness's own tasks (a public benchmark)"
        cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
        members = [e.name for e in index.values() if name in e.tags] if entry.kind.name == "TAG" else [
            t for t in (cfg.get("task") or []) if isinstance(t, str)] if isinstance(cfg.get("task"), list) else []
        for member in members:
            found = reason(member, seen)
            if found:
                return f"{name} includes {found}"
        dataset, split = cfg.get("dataset_path"), scored_split(cfg)
        if isinstance(dataset, str) and split:
            for other in sorted(index.values(), key=lambda e: e.name):
                ocfg = other.cfg if isinstance(other.cfg, dict) else {}
                if own(other) and source(ocfg) == source(cfg) and scored_split(ocfg) == split:
                    return (f"{name} reads the {split} split of {dataset}, which lm-evaluation-harness's own "
                            f"{other.name} scores (a public benchmark)")
        return None

    return reason(task, set())


def check_lm_eval(objective, allow_code: bool = False, allow_benchmark: bool = False) -> None:
    """The harness is installed and knows the task names (before the search), the task
    folder runs no code unless ``allow_code`` (``--allow-task-code``), and the task searched on
    is no public benchmark's scored split unless ``allow_benchmark`` (``--allow-benchmark-tasks``)."""
    from swarm_merge.errors import InputError

    if objective.include_path and not Path(objective.include_path).is_dir():
        raise InputError(f"objective include_path {objective.include_path!r} is not a folder; point at the folder "
                         "holding your task YAML files")
    if objective.include_path and not allow_code:
        # Before the TaskManager reads the folder (its index reads YAML without importing, but
        # nothing of the folder should reach the harness's own loader before this check).
        _refuse_task_code(objective.include_path)
    manager = lm_eval_tasks(objective.include_path)
    for task in filter(None, (objective.task, objective.test_task)):
        if task not in manager.all_tasks:
            raise InputError(f"lm-eval task {task!r} is unknown to lm-evaluation-harness (include_path: "
                             f"{objective.include_path or 'none'}); check the name, or add its YAML to include_path")
    found = benchmark_of(manager, objective.task)
    if found and not allow_benchmark:
        raise InputError(f"objective task {found}: searching on it would tune the merge to the very numbers people "
                         "compare; search on data of your own (or a train split), or pass --allow-benchmark-tasks "
                         "(the card then says the search saw it)")


@contextlib.contextmanager
def _quiet_harness():
    """While the harness scores: no environment report and no progress bars.

    ``simple_evaluate`` collects a report of the machine (torch's collect_env: subprocesses, about 2 s)
    and runs ``git describe`` on every call, for metadata this tool discards, and draws three bars per
    evaluation; it has no switch for either. So its module-level helpers and the ``tqdm`` each of its
    modules imported are swapped for silent ones for the duration and put back after (bars stay with
    ``-v``, that is a root logger at DEBUG).
    """
    import sys

    from lm_eval import evaluator
    from tqdm import tqdm as bar

    class Silent(bar):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    swaps = [(evaluator, "add_env_info", lambda storage: None), (evaluator, "get_git_commit_hash", lambda: None)]
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        swaps += [(module, "tqdm", Silent) for name, module in list(sys.modules.items())
                  if name.startswith("lm_eval") and getattr(module, "tqdm", None) is bar]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, value in swaps:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@torch.inference_mode()
def score_lm_eval(model, tokenizer, examples, objective, device, batch_size=None) -> Score:
    """The task's metric, computed by lm-evaluation-harness on the live model (nothing written or reloaded)."""
    import lm_eval
    from jinja2.exceptions import SecurityError
    from lm_eval.models.huggingface import HFLM

    from swarm_merge.errors import EvaluationError

    task = examples[0].raw["task"]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or objective.batch_size)
    manager = lm_eval_tasks(objective.include_path)
    with _in_task_folder(objective.include_path), _sandboxed_templates(), _quiet_harness():
        try:
            result = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=manager, num_fewshot=objective.num_fewshot,
                limit=objective.limit, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
        except SecurityError as exc:
            raise EvaluationError(f"lm-eval task {task!r}: a template reached outside jinja2's sandbox "
                                  f"({' '.join(str(exc).split())[:160]}); task templates render sandboxed (the row's "
                                  "fields, no Python internals): fix the template") from None
    found = result["results"][task]
    key = objective.metric if "," in objective.metric else f"{objective.metric},none"
    if key not in found:
        metrics = sorted(k for k, v in found.items() if isinstance(v, (int, float)) and "stderr" not in k)
        raise EvaluationError(f"lm-eval task {task!r} reports no metric {key!r} (it reports {', '.join(metrics)}); "
                              "set objective.metric to one of them")
    n = int(result.get("n-samples", {}).get(task, {}).get("effective", 0))
    return Score(float(found[key]), {}, n)


@dataclass(frozen=True)
class ObjectiveKind:
    """One objective type: its scorer and what the rest of the tool may assume of its utility."""

    score: Callable[..., Score]  # (model, tokenizer, examples, objective, device, batch_size=None) -> Score
    per_row: bool  # the utility is a weighted mean of per-row values: a slice of rows estimates it (racing)
    accuracy: bool  # each row scores 0 or 1 (emergence, the winner's-curse estimate)
    shares_prefix: bool = False  # the scorer takes share_prefix (a batch's common prefix computed once)


OBJECTIVES: Dict[str, ObjectiveKind] = {
    "exact_match": ObjectiveKind(score_exact_match, per_row=True, accuracy=True),
    "multiple_choice": ObjectiveKind(score_multiple_choice, per_row=True, accuracy=True, shares_prefix=True),
    "loglik": ObjectiveKind(score_loglik, per_row=True, accuracy=False, shares_prefix=True),
    "reward": ObjectiveKind(score_reward, per_row=True, accuracy=False),
    "judge": ObjectiveKind(score_judge, per_row=True, accuracy=False),
    # The harness scores a whole task at once.
    "lm_eval": ObjectiveKind(score_lm_eval, per_row=False, accuracy=False),
}


def kind_of(objective) -> Optional[ObjectiveKind]:
    """The registry's entry for a single objective (None for a Suite or custom code)."""
    return None if isinstance(objective, (Suite, Custom)) else OBJECTIVES.get(getattr(objective, "type", None))


@dataclass(frozen=True)
class Suite:
    """Several objectives scored together (``objectives:`` in a recipe), combined by
    their weights: ``mean`` (weighted arithmetic) or ``harmonic`` (weighted harmonic
    mean, the paper's multi-task utility: 0 as soon as one component is 0)."""

    parts: Tuple[Any, ...]  # the recipe's Objective components, named
    combine: str = "mean"

    @property
    def type(self) -> str:  # a label; never one of the single objectives' types
        return f"{self.combine} of " + ", ".join(f"{o.name} ({o.type})" for o in self.parts)

    def load(self, split: str) -> Optional[List[List[Example]]]:
        """Each component's rows of ``split`` ("dev" or "test"); None when a component has no test set."""
        paths = [getattr(o, split) if o.type != "lm_eval" else (o.task if split == "dev" else o.test_task)
                 for o in self.parts]
        if split == "test" and not all(paths):
            if any(paths):
                LOG.warning("only some objectives have a test set: no test column")
            return None
        return [lm_eval_rows(p) if o.type == "lm_eval" else load_examples(p, o.type, o.group_by)
                for p, o in zip(paths, self.parts)]

    def score(self, model, tokenizer, data: Sequence[Sequence[Example]], device, **kwargs) -> Score:
        scores = [score(model, tokenizer, rows, o, device, **kwargs) for o, rows in zip(self.parts, data)]
        return self.combined(scores)

    def combined(self, scores: Sequence[Score]) -> Score:
        weights = [o.weight for o in self.parts]
        values = [s.utility for s in scores]
        if any(not math.isfinite(v) for v in values):
            utility = float("nan")
        elif self.combine == "harmonic":
            utility = 0.0 if any(v <= 0 for v in values) else sum(weights) / sum(w / v for w, v in zip(weights, values))
        else:
            utility = sum(w * v for w, v in zip(weights, values)) / sum(weights)
        # Each component's utility, and its row groups as "component/group".
        groups: Dict[str, float] = {}
        for o, s in zip(self.parts, scores):
            groups[o.name] = s.utility
            groups.update({f"{o.name}/{g}": v for g, v in s.groups.items()})
        whole = all(s.rows is not None and s.weights is not None for s in scores)
        return Score(utility, groups, sum(s.n for s in scores),
                     rows=[v for s in scores for v in s.rows] if whole else None,
                     weights=[w for s in scores for w in s.weights] if whole else None)


class Custom:
    """A ``type: custom`` objective with the function ``--objective-code`` named:
    ``function(model, tokenizer, rows, device) -> float`` (rows: the JSONL rows as dicts).
    Attributes other than ``function`` are the recipe objective's."""

    def __init__(self, objective, function: Callable):
        self.objective, self.function = objective, function

    def __getattr__(self, name: str):
        return getattr(self.__dict__["objective"], name)

    @torch.inference_mode()
    def score(self, model, tokenizer, examples: Sequence[Example], device) -> Score:
        value = self.function(model, tokenizer, [dict(e.raw) for e in examples], device)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"the --objective-code function returned {type(value).__name__}, not a number")
        return Score(float(value), {}, len(examples))


def load_code(spec: str) -> Callable:
    """``path.py:function`` (the ``--objective-code`` flag) as a callable.

    Raises:
        InputError: no such file or function, or the file fails to import.
    """
    import importlib.util

    from swarm_merge.errors import InputError

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise InputError(f"--objective-code {spec!r} is not path.py:function; write e.g. my_utility.py:score")
    if not Path(path).is_file():
        raise InputError(f"--objective-code: {path!r} not found; give the Python file that defines {name}")
    module_spec = importlib.util.spec_from_file_location(f"swarm_merge_objective_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"--objective-code: importing {path!r} failed ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]}); fix that file") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"--objective-code: {path!r} defines no function {name!r}; name one it defines")
    return function


def score(model, tokenizer, examples: Sequence[Example], objective, device, *, batch_size: Optional[int] = None,
          share_prefix: bool = True) -> Score:
    """Score ``model`` on ``examples`` with the recipe's objective.

    ``batch_size`` overrides ``objective.batch_size`` (streaming mode scores all
    rows in one batch: each forward call rebuilds the weights). ``share_prefix``
    computes a prefix common to a batch once (log-likelihood objectives). With a
    :class:`Suite`, ``examples`` holds each component's rows.
    """
    if isinstance(objective, Suite):
        return objective.score(model, tokenizer, examples, device, batch_size=batch_size, share_prefix=share_prefix)
    if isinstance(objective, Custom):
        return objective.score(model, tokenizer, examples, device)
    kind = OBJECTIVES[objective.type]
    kwargs = {"share_prefix": share_prefix} if kind.shares_prefix else {}
    return kind.score(model, tokenizer, examples, objective, device, batch_size=batch_size, **kwargs)


def task_of(recipe, code: Optional[Callable] = None, *, allow_task_code: bool = False,
            allow_benchmark: bool = False):
    """What the evaluator scores: ``(objective, dev rows, test rows or None)``: the recipe's
    objective and its rows, or, for an ``objectives:`` list, a :class:`Suite` and each
    component's rows. ``type: custom`` objectives get ``code`` (``--objective-code``);
    ``allow_task_code`` (``--allow-task-code``) lets lm_eval task folders run their hooks;
    ``allow_benchmark`` (``--allow-benchmark-tasks``) lets lm_eval objectives search on public benchmarks.

    Raises:
        InputError: a custom objective without ``--objective-code``, or the flag without one; an
            lm_eval task folder with code hooks (see :func:`check_lm_eval`).
    """
    from swarm_merge.errors import InputError

    customs = [o for o in recipe.components if o.type == "custom"]
    if customs and code is None:
        raise InputError("objective type custom needs the Python function to score with: pass --objective-code "
                         "path.py:function (a recipe can never name code itself)")
    if code is not None and not customs:
        raise InputError("--objective-code is given but no objective has type: custom; drop the flag or set the "
                         "objective's type to custom")

    def runtime(o):
        return Custom(o, code) if o.type == "custom" else o

    if recipe.objectives is None:
        o = recipe.objective
        if o.type == "lm_eval":
            check_lm_eval(o, allow_task_code, allow_benchmark)
            return o, lm_eval_rows(o.task), lm_eval_rows(o.test_task) if o.test_task else None
        return runtime(o), load_examples(o.dev, o.type, o.group_by), (load_examples(o.test, o.type, o.group_by)
                                                                      if o.test else None)
    for o in recipe.components:
        if o.type == "lm_eval":
            check_lm_eval(o, allow_task_code, allow_benchmark)
    suite = Suite(tuple(runtime(o) for o in recipe.components), recipe.combine)
    return suite, suite.load("dev"), suite.load("test")


def benchmarks_searched(recipe) -> List[str]:
    """The public benchmarks the recipe's lm_eval objectives search on (allowed by --allow-benchmark-tasks),
    each as :func:`benchmark_of` says why; checked before (:func:`task_of`), so the harness is there."""
    return [found for o in recipe.components if o.type == "lm_eval"
            for found in [benchmark_of(lm_eval_tasks(o.include_path), o.task)] if found]


def lm_eval_rows(task: str) -> List[Example]:
    """What the evaluator passes for an lm_eval objective: one stand-in row naming the task
    (the harness loads the task's own documents)."""
    return [Example(prompt=f"lm_eval:{task}", raw={"task": task})]


def row_count(data) -> int:
    """Rows in one objective's examples, or in all of a suite's components."""
    return sum(len(part) for part in data) if data and isinstance(data[0], list) else len(data)
