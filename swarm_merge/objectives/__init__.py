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

The scorers live by what they read: rows.py (rows, scores, batching), generation.py (exact_match, greedy
decoding), likelihood.py (multiple_choice, loglik), judges.py (reward, judge), harness.py (lm_eval); this
module holds the registry, suites, custom code and the task a recipe names.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from swarm_merge.objectives import harness, judges
from swarm_merge.objectives.generation import score_exact_match
from swarm_merge.objectives.harness import benchmarks_searched, check_lm_eval, lm_eval_rows, score_lm_eval
from swarm_merge.objectives.judges import judge_model, reward_model, score_judge, score_reward
from swarm_merge.objectives.likelihood import score_loglik, score_multiple_choice
from swarm_merge.objectives.rows import Example, Score, aggregate, load_examples, row_count

__all__ = ["Example", "Score", "Suite", "Custom", "load_code", "load_examples", "score", "task_of", "row_count",
           "aggregate", "release", "benchmarks_searched", "OBJECTIVES", "ObjectiveKind", "kind_of", "reward_model",
           "judge_model", "score_exact_match", "score_multiple_choice", "score_loglik", "score_reward", "score_judge",
           "score_lm_eval"]

LOG = logging.getLogger(__name__)


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


def release() -> None:
    """Forget the reward or judge model and the lm-eval task indexes loaded so far (the end of a run)."""
    judges.release()
    harness.release()
