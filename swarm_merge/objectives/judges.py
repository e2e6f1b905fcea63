"""Objectives scored by another model: a reward model's score, or a judge's expected rating, of the greedy
responses. The model is loaded once per run (:func:`release` forgets it)."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch


from swarm_merge.objectives.generation import greedy
from swarm_merge.objectives.likelihood import continuation_logprobs
from swarm_merge.objectives.rows import Score, aggregate

LOG = logging.getLogger(__name__)


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
    responses = greedy(model, tokenizer, examples, objective, device, batch_size, one_line=False)
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
    responses = greedy(model, tokenizer, examples, objective, device, batch_size, one_line=False)
    judge, judge_tok = judge_model(objective.judge_model.model, device)
    low, high = objective.scale
    ratings = list(range(low, high + 1))
    pairs = []
    for ex, response in zip(examples, responses):
        context = judge_prompt(judge_tok, objective.rubric, ex.prompt, response.strip())
        pairs += [(context, str(r)) for r in ratings]
    scored = continuation_logprobs(judge, judge_tok, pairs, batch_size or objective.batch_size, device)
    values = []
    for i in range(len(examples)):
        logp = torch.tensor([lp for lp, _ in scored[i * len(ratings):(i + 1) * len(ratings)]], dtype=torch.float64)
        probs = torch.softmax(logp, dim=0)
        values.append(float((probs * torch.tensor(ratings, dtype=torch.float64)).sum()))
    return aggregate(values, [1.0] * len(examples), examples)


_TASK_MANAGERS: Dict[Optional[str], Any] = {}


def release() -> None:
    """Forget the reward or judge model loaded so far (the end of a run)."""
    _OBJECTIVE_MODELS.clear()
