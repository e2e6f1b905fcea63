"""Rows and scores: an objective's JSONL rows as :class:`Example`, a particle's :class:`Score`, and the
batching every scorer shares."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from swarm_merge.errors import DataError
from swarm_merge.report import finite

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


def prepare_prompt(tokenizer, objective, text: str) -> str:
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


def batches(order: Sequence[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


def left_padded(seqs: Sequence[Sequence[int]], pad: int):
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


def row_count(data) -> int:
    """Rows in one objective's examples, or in all of a suite's components."""
    return sum(len(part) for part in data) if data and isinstance(data[0], list) else len(data)
