"""The search loop: the pure optimiser (:mod:`swarm_merge.swarm`) driven against
an evaluator, with memoisation, a crash-safe checkpoint and a progress bar.

With several processes (:mod:`swarm_merge.distributed`) each batch of
positions (the initial swarm, one iteration's particles) is split over the
ranks and the scores gathered to all, so every rank runs the same optimiser on
the same memo; only the main rank writes the checkpoint, after each batch, and
on resume it reads it and broadcasts it. Raced positions go whole to one rank
each (all their stages, one build), and every rank books the gathered stages in
the same order.

The checkpoint (``swarm-state.json``) holds the swarm state and the random
generator's state after the last finished iteration, plus every utility
computed so far (memo). It is rewritten atomically after every evaluation, so
a run killed at any point resumes without re-scoring anything and, since
evaluation is deterministic, ends with the same result as an uninterrupted run.

With racing (:mod:`swarm_merge.racing`) a moving particle is scored stage by
stage against the global best; the checkpoint also holds the positions in the
middle of a race (``partial``: the stages scored so far) and the dev rows scored
(``items``: the search's cost, reported in swarm.json). A dropped particle's
utility is the race's estimate: it can move its particle's personal best, never
the global best, which is always scored on every row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from swarm_merge import distributed, swarm
from swarm_merge.racing import Race
from swarm_merge.errors import EvaluationError, OutputError
from swarm_merge.objectives import Score
from swarm_merge.output import write_json_atomic
from swarm_merge.report import finite

__all__ = ["SearchResult", "run_search", "position_key"]

LOG = logging.getLogger(__name__)
# 2: strict JSON (null for a failed utility), wall time; 3: items, raced slices; 4: the state's archive (every
# position scored, the surrogate's data: a run resumed without it would not be the uninterrupted run); 5: racing's
# stages go on past half the rows (a stage index saved by 4 names other rows); 6: a particle's stages follow its
# contested rows (swarm.race_neighbours)
CHECKPOINT_VERSION = 6


def position_key(x: np.ndarray) -> str:
    """Identity of a position for memoisation (exact, up to float64 round-off)."""
    return hashlib.sha1(np.round(np.asarray(x, dtype=np.float64), 12).tobytes()).hexdigest()


@dataclass
class SearchResult:
    best: np.ndarray  # (G, K) coefficients of the winner
    best_score: Score
    state: swarm.SwarmState
    initial: np.ndarray  # (size + scouts, G, K) the initial swarm, then the scouts (swarm.scouts)
    history: List[Dict[str, Any]]
    memo: Dict[str, Dict[str, Any]]
    seconds: float
    resumed: bool = False
    stop_reason: str = ""
    wall_before: float = 0.0  # wall time of the earlier sessions of a resumed run
    items: int = 0  # dev rows scored (a full evaluation costs every row; a raced-out one its stages' rows)
    raced: Optional[Dict[str, int]] = None  # racing: slice rows, positions dropped and finished
    # average_top: the average of the top positions against the global best (utilities, the standard error of
    # their paired difference, which one is the winner); None where nothing was averaged
    pick: Optional[Dict[str, Any]] = None

    def lookup(self, x: np.ndarray) -> Optional[Score]:
        hit = self.memo.get(position_key(x))
        return Score.from_dict(hit) if hit else None


@dataclass
class _Run:
    """Mutable bookkeeping of one search, saved as the checkpoint."""

    path: Path
    fingerprint: str
    memo: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # Racing: positions not scored on every row (mid-race, or dropped: at the end, every one of them),
    # their stages' scores, rows included; and the positions raced to the last stage.
    partial: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    items: int = 0
    finished: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    state: Optional[swarm.SwarmState] = None
    rng_state: Optional[dict] = None
    seconds_before: float = 0.0
    started: float = field(default_factory=time.monotonic)
    wall_before: float = 0.0
    wall_started: float = field(default_factory=time.monotonic)
    resumed: bool = False

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    @property
    def wall(self) -> float:
        return self.wall_before + time.monotonic() - self.wall_started

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "version": CHECKPOINT_VERSION,
                "fingerprint": self.fingerprint,
                "seconds": self.seconds,
                "wall_seconds": self.wall,
                "rng": self.rng_state,
                "state": _strict(self.state.to_dict()) if self.state is not None else None,
                "history": self.history,
                "memo": self.memo,
                "partial": self.partial,
                "items": self.items,
                "finished": self.finished,
            },
        )

    @classmethod
    def parse(cls, text: str, path: Path, fingerprint: str, wall_started: float) -> "_Run":
        """The run saved in ``text`` (the checkpoint file's content, read from ``path``)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise OutputError(f"cannot read checkpoint {path} ({type(exc).__name__}); pass --force to start over") from None
        if not isinstance(data, dict):
            raise OutputError(f"checkpoint {path} is not a swarm_merge checkpoint; pass --force to start over")
        if data.get("version") != CHECKPOINT_VERSION or data.get("fingerprint") != fingerprint:
            raise OutputError(
                f"{path} was written for different inputs (the recipe, a model's weights, config or tokenizer "
                "files, the reward or judge model, the dev data) or by another swarm_merge version; restore them "
                "to resume, or pass --force to start over"
            )

        def damaged(what: str) -> OutputError:
            return OutputError(f"checkpoint {path} is damaged ({' '.join(what.split())[:80]}); pass --force to start over")

        try:
            saved = Checkpoint.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise damaged(f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
        run = cls(path=path, fingerprint=fingerprint, memo=saved.memo, history=saved.history, partial=saved.partial,
                  wall_started=wall_started, items=saved.items, finished=saved.finished,
                  seconds_before=saved.seconds, wall_before=saved.wall_seconds)
        if saved.state is not None:
            try:
                run.state = swarm.SwarmState.from_dict(_unstrict(saved.state))
                run.rng_state = saved.rng
                np.random.default_rng(0).bit_generator.state = run.rng_state  # validates it
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise damaged(f"{type(exc).__name__}: {exc}") from None
        return run


class Checkpoint(BaseModel):
    """``swarm-state.json`` as read back: validated whole, so a damaged or foreign file is refused with one
    line before anything uses it (a checkpoint lies in a folder others can write). _Run.save writes it."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[CHECKPOINT_VERSION]  # an older one is refused (by _Run.parse, before this), never misread
    fingerprint: str
    seconds: float = 0.0
    wall_seconds: float = 0.0
    rng: Optional[Dict[str, Any]] = None  # the generator's state after the last finished iteration
    state: Optional[Dict[str, Any]] = None  # swarm.SwarmState.to_dict (checked by _check_state on use)
    history: List[Dict[str, Any]]  # one record per iteration
    memo: Dict[str, Dict[str, Any]]  # position key -> Score.to_dict
    partial: Dict[str, Dict[str, Any]]  # racing: positions mid-race or dropped, their stages' scores
    items: StrictInt = Field(ge=0)
    finished: StrictInt = Field(ge=0)

    @field_validator("history")
    @classmethod
    def _records(cls, history):
        if not all(isinstance(h.get("iteration"), int) and not isinstance(h.get("iteration"), bool) for h in history):
            raise ValueError("a history entry is not an iteration's record")
        return history

    @field_validator("memo", "partial")
    @classmethod
    def _scores(cls, entries):
        for hit in entries.values():
            if not _is_score(hit):
                raise ValueError("a memo entry is not a position and a score")
        return entries


# In the swarm state a failed evaluation scores -inf (ranked worst); strict
# JSON has no infinities, so the checkpoint writes null and reads it back.
_SCORE_FIELDS = ("score", "p_score", "g_score", "gw_score", "archive_s")


@dataclass
class _Heat:
    """One iteration's race: the positions raced (by key), each one's contested rows and stages, the global best's
    memo entry they race, and the estimates of those dropped."""

    going: Dict[str, np.ndarray]
    contested: Dict[str, Optional[np.ndarray]]
    plans: Dict[str, Tuple[np.ndarray, ...]]
    reference: Dict[str, Any]
    estimates: Dict[str, float] = field(default_factory=dict)


def _contested_rows(race: Race, going: Dict[str, np.ndarray], state: swarm.SwarmState, memo: Dict[str, Any],
                    partial: Dict[str, Any]) -> Dict[str, Optional[np.ndarray]]:
    """Each raced position's contested rows (:meth:`Race.contested`; None: the plain stages): its neighbours are
    the positions of earlier iterations (the state's archive) scored on every row, the global best aside; a race
    begun before (a resumed iteration, an earlier one) keeps the rows its checkpoint entry names."""
    finished: Dict[str, Tuple[np.ndarray, Any]] = {}
    if race.neighbours and state.archive_x is not None:
        for a in state.archive_x:
            key = position_key(a)
            if key in memo and memo[key].get("rows") is not None and key != position_key(state.g):
                finished.setdefault(key, (a, memo[key]["rows"]))
    reference = memo.get(position_key(state.g), {}).get("rows")
    return {key: race.contested(x, reference, list(finished.values())) if key not in partial
            else _contested_of(partial[key], race) for key, x in going.items()}


def _contested_of(entry: Dict[str, Any], race: Race) -> Optional[np.ndarray]:
    """The contested rows a raced position's plan was made with (its checkpoint entry), as a mask."""
    rows = entry.get("contested")
    return None if rows is None else np.isin(np.arange(race.total_rows), rows)


def _strict(state: Dict[str, Any]) -> Dict[str, Any]:
    def clean(v):
        if isinstance(v, list):
            return [clean(u) for u in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    for key, value in state.items():
        if not math.isfinite(np.sum(np.asarray(value, dtype=float))) and key not in _SCORE_FIELDS:
            raise EvaluationError(f"the swarm state {key} is not finite; lower swarm.step_length")
    return {k: clean(v) if k in _SCORE_FIELDS else v for k, v in state.items()}


def _unstrict(state: Dict[str, Any]) -> Dict[str, Any]:
    def back(v):
        if isinstance(v, list):
            return [back(u) for u in v]
        return -math.inf if v is None else v

    return {k: back(v) if k in _SCORE_FIELDS else v for k, v in state.items()}


def _load_or_start(checkpoint: Path, fingerprint: str, started: float, resume: bool,
                   ranks: distributed.Ranks) -> "_Run":
    """The run to continue (``resume`` and a checkpoint there) or a fresh one. With several
    processes the main rank reads the checkpoint and sends it to the others, errors included."""
    found = None
    if ranks.is_main and resume and checkpoint.exists():
        try:
            found = ("ok", checkpoint.read_text(encoding="utf-8"))
        except OSError as exc:
            found = ("error", f"cannot read checkpoint {checkpoint} ({type(exc).__name__}); pass --force to start over")
    found = ranks.broadcast(found)
    if found is None:
        run = _Run(path=checkpoint, fingerprint=fingerprint, wall_started=started)
        run.resumed = False
        return run
    if found[0] == "error":
        raise OutputError(found[1])
    run = _Run.parse(found[1], checkpoint, fingerprint, started)
    run.resumed = True
    return run


def _check_state(state: swarm.SwarmState, path: Path, *, n: int, groups: int, experts: int, limit: int) -> None:
    """A resumed swarm state has this search's shapes, finite positions and sane counters:
    a checkpoint is a file in a folder others can write, and a malformed one must be
    refused here with one line, not crash the update or a JSON write many evaluations later."""
    def bad(what: str) -> OutputError:
        return OutputError(f"checkpoint {path} is damaged ({what}); pass --force to start over")

    shapes = {"x": (n, groups, experts), "v": (n, groups, experts), "p": (n, groups, experts),
              "g": (groups, experts), "gw": (groups, experts), "score": (n,), "p_score": (n,), "stale": (n,)}
    for name, shape in shapes.items():
        value = getattr(state, name)
        if not isinstance(value, np.ndarray) or value.shape != shape:
            raise bad(f"{name} is not an array of shape {list(shape)}")
        if name not in ("score", "p_score") and not np.isfinite(value).all():
            raise bad(f"{name} is not finite")
    for name in ("g_score", "gw_score", "step_length"):
        value = getattr(state, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise bad(f"{name} is not a number")
    if not 0 < state.step_length < math.inf:
        raise bad("step_length is not a positive number")
    if isinstance(state.rho, bool) or not isinstance(state.rho, (int, float)) or not 0 <= state.rho < math.inf:
        raise bad("rho is not a radius")
    for name in ("iteration", "since_global", "evaluations"):
        value = getattr(state, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(f"{name} is not a count")
    if (state.stale < 0).any():
        raise bad("stale is not a count")
    problem = _archive_problem(state, groups=groups, experts=experts, limit=limit)
    if problem:
        raise bad(problem)


def _archive_problem(state: swarm.SwarmState, *, groups: int, experts: int, limit: int) -> Optional[str]:
    """What is wrong with a resumed state's archive (the surrogate's data), or None. Its length is bounded by
    the budget: the surrogate's GP costs O(m^2) in it."""
    m = len(state.archive_s) if isinstance(state.archive_s, np.ndarray) and state.archive_s.ndim == 1 else -1
    if not 0 <= m <= min(state.evaluations, limit):
        return "archive_s is not one score per evaluation"
    if not isinstance(state.archive_x, np.ndarray) or state.archive_x.shape != (m, groups, experts):
        return f"archive_x is not an array of shape [{m}, {groups}, {experts}]"
    if not np.isfinite(state.archive_x).all():
        return "archive_x is not finite"
    if not isinstance(state.g_by_surrogate, bool):
        return "g_by_surrogate is not true or false"
    return None


def _is_score(entry: Any) -> bool:
    try:
        Score.from_dict(entry)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return True


def _stats(values: np.ndarray) -> Dict[str, Optional[float]]:
    """Best / mean / worst of the finite utilities (None when there are none: strict JSON)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"best": None, "mean": None, "worst": None}
    return {"best": float(finite.max()), "mean": float(finite.mean()), "worst": float(finite.min())}


def run_search(  # noqa: C901, PLR0913 (the loop and the closures that share its bookkeeping; keyword arguments)
    settings: Any,
    *,
    num_experts: int,
    num_groups: int,
    evaluate: Callable[[np.ndarray], Score],
    checkpoint: Path,
    fingerprint: str,
    resume: bool = False,
    progress: bool = True,
    started: Optional[float] = None,
    ranks: Optional[distributed.Ranks] = None,
    race: Optional[Race] = None,
    evaluate_rows: Optional[Callable[[np.ndarray, np.ndarray], Score]] = None,
    rows_layout: Optional[Race] = None,
) -> SearchResult:
    """Run Model Swarms over coefficient arrays of shape ``(num_groups, num_experts)``.

    Args:
        settings: the recipe's ``swarm`` section.
        evaluate: scores one position (coefficients) on the dev set.
        checkpoint: the ``swarm-state.json`` path, written after every evaluation.
        fingerprint: identifies the recipe; a checkpoint of another recipe is refused.
        resume: continue from ``checkpoint`` when it exists.
        started: ``time.monotonic()`` when the run began (its wall time is checkpointed).
        ranks: the processes sharing the evaluations (default: this one alone).
        race: racing (:mod:`swarm_merge.racing`): a moving particle is scored stage by stage
            (``evaluate_rows(x, rows)``, row indices: the slice first) while it may still beat the global best.
            None: every position is scored on every row.
        rows_layout: without ``race``, the dev rows' layout (racing.layout_of): the memo then keeps each
            position's rows, so ``average_top: bag`` and its standard error work unraced too.

    Raises:
        EvaluationError: no particle of the initial swarm scored a finite utility,
            or an evaluation raised.
    """
    from tqdm.auto import tqdm

    ranks = ranks or distributed.Ranks()
    layout = race if race is not None else rows_layout  # the rows' layout: racing's, or average_top's alone
    checkpoint = Path(checkpoint)
    started = time.monotonic() if started is None else started
    run = _load_or_start(checkpoint, fingerprint, started, resume, ranks)
    resumed = run.resumed
    progress = progress and ranks.is_main

    def save() -> None:
        if ranks.is_main:
            run.save()

    def scores_of(xs) -> List[float]:
        """Utilities of ``xs``; the positions not in the memo are scored, spread over the ranks."""
        todo: Dict[str, np.ndarray] = {}
        for x in xs:
            key = position_key(x)
            if key not in run.memo and key not in todo:
                todo[key] = x
        keys = list(todo)

        def done(i: int, score: Score) -> None:
            run.memo[keys[i]] = score.to_dict(rows=layout is not None)
            run.items += score.n
            save()
            bar.update()

        spread(evaluate, [todo[k] for k in keys], done)
        return [Score.from_dict(run.memo[position_key(x)]).utility for x in xs]

    def spread(fn, items, done) -> None:
        try:
            ranks.map(fn, items, on_done=done)
        except EvaluationError as exc:
            # The one advice that helps: --resume only once a checkpoint holds progress.
            saved = bool(run.memo) or run.state is not None
            then = ("then run again with --resume to continue from the checkpoint" if saved else
                    "then run the same command again (nothing was saved yet)")
            raise EvaluationError(f"{str(exc).rstrip('; ')}, {then}") from exc

    def raced_scores(xs, state: swarm.SwarmState) -> List[float]:
        """Utilities of ``xs``, each raced against the global best ``state.g`` (scored on every row): scored
        stage by stage (its plan: the slice first) until it is dropped (then its estimate) or every row is
        scored. The plans come from the state and the memo as they were when the iteration began (positions
        of earlier iterations), so a resumed iteration plans the same stages. Each position is raced through
        all its stages on one process (its weights built once: evaluate.remembered): one process races them
        in turn; several take them round-robin, then every rank books every race in the same order."""
        going: Dict[str, np.ndarray] = {}
        for x in xs:
            key = position_key(x)
            if key not in run.memo:
                going.setdefault(key, x)
        contested = _contested_rows(race, going, state, run.memo, run.partial)
        heat = _Heat(going=going, contested=contested, plans={k: race.plan(contested[k]) for k in going},
                     reference=run.memo.get(position_key(state.g), {}))
        keys = list(going)
        if ranks.world == 1:  # (through spread: a failed evaluation says how to resume)
            spread(lambda key: race_one(heat, key, live), keys, None)
        else:
            spread(lambda key: rehearsed(heat, key), keys, lambda i, made: booked(heat, keys[i], made))
        out = []
        for x in xs:
            key = position_key(x)
            out.append(Score.from_dict(run.memo[key]).utility if key in run.memo else heat.estimates[key])
        return out

    def live(heat: _Heat, key: str, stage: int) -> Score:
        return evaluate_rows(heat.going[key], heat.plans[key][stage])

    def race_one(heat: _Heat, key: str, score_stage: Callable[[_Heat, str, int], Score], book: bool = True) -> List[Score]:
        """Race ``key`` to its verdict from where the checkpoint left it: each stage ``score_stage(heat, key,
        stage)``, then booked (partial or memo, items; with ``book`` the checkpoint and the bar too), then judged
        (a dropped position's estimate goes to ``heat.estimates``). Returns the stage scores it made. A decision
        reads only the position's own rows and the global best's, so the order of the positions changes nothing."""
        plan, contested, made = heat.plans[key], heat.contested[key], []
        entry = run.partial.get(key)
        parts = [Score.from_dict(p) for p in entry["parts"]] if entry else []
        while key not in run.memo:
            if parts:
                seen = np.sort(np.concatenate(plan[: len(parts)]))
                verdict = race.verdict(Score.from_dict(run.partial[key]), seen, heat.reference, contested)
                if verdict is not None:  # (counted at the end: a replayed iteration decides again)
                    heat.estimates[key] = verdict
                    if book:
                        bar.update()
                    break
            score = score_stage(heat, key, len(parts))
            made.append(score)
            parts.append(score)
            combined = race.combine(parts, plan)
            run.items += score.n
            if len(parts) == len(plan):
                run.partial.pop(key, None)
                run.memo[key] = combined.to_dict(rows=True)
                run.finished += 1
            else:
                run.partial[key] = {**combined.to_dict(rows=True), "stage": len(parts) - 1,
                                    "parts": [p.to_dict(rows=True) for p in parts],
                                    "contested": None if contested is None else np.flatnonzero(contested).tolist()}
            if book:
                if key in run.memo:
                    bar.update()
                save()
        return made

    def rehearsed(heat: _Heat, key: str) -> List[Score]:
        """On the rank that owns ``key``: its race scored here, then forgotten (every rank books it: booked)."""
        before = (run.partial.get(key), run.items, run.finished)
        made = race_one(heat, key, live, book=False)
        run.memo.pop(key, None)
        heat.estimates.pop(key, None)
        if before[0] is None:
            run.partial.pop(key, None)
        else:  # (in its place: the checkpoint keeps one process's order)
            run.partial[key] = before[0]
        run.items, run.finished = before[1], before[2]
        return made

    def booked(heat: _Heat, key: str, made: List[Score]) -> None:
        """On every rank: the race of ``key`` booked from the stage scores its owner made."""
        stages = iter(made)

        def replayed(_heat: _Heat, _key: str, _stage: int) -> Score:
            got = next(stages, None)
            if got is None:
                raise EvaluationError(f"position {key[:12]}: its race went otherwise on another process")
            return got

        race_one(heat, key, replayed)
        if next(stages, None) is not None:
            raise EvaluationError(f"position {key[:12]}: its race went otherwise on another process")

    # The initial swarm is drawn again from the seed on resume (same positions),
    # and its utilities come back from the memo.
    rng = np.random.default_rng(settings.seed)
    # (the scouts' rows follow the initial swarm's: the same draws as without them, then theirs)
    x0 = swarm.initial_positions(num_experts, settings.size + swarm.scouts(settings, num_groups), groups=num_groups,
                                 seed_soup=settings.seed_soup, rng=rng, init=settings.init, spread=settings.init_spread)
    # One bar, in evaluations (a raced-out position counts when it is dropped): the initial swarm, then
    # every iteration, up to the budget (the patience stop may end it sooner).
    bar = tqdm(total=swarm.budget(settings), desc="swarm", unit="eval", disable=not progress)
    if run.state is None:
        scores = scores_of(list(x0))
        if not np.isfinite(scores).any():
            raise EvaluationError(
                "no particle of the initial swarm (the experts themselves included) scored a finite utility on "
                "the dev set; check the objective and the data (run with -v), then start over with --force")
        state = swarm.init_state(x0, np.array(scores), settings, rng)
        run.state, run.rng_state = state, rng.bit_generator.state
        run.history = [{"iteration": 0, **_stats(np.array(scores)), "global_best": finite(state.g_score),
                        "evaluations": state.evaluations, "items": run.items, "seconds": round(run.seconds, 3)}]
        save()
    state = run.state
    # (budget(): the most evaluations any run makes, under either stop rule)
    _check_state(state, checkpoint, n=settings.size, groups=num_groups, experts=num_experts,
                 limit=swarm.budget(settings))
    for entry in run.partial.values():  # (their scores were checked by _Run.parse)
        stage, parts, rows = entry.get("stage"), entry.get("parts"), entry.get("contested")
        plan = race.plan(_contested_of(entry, race)) if race is not None and (rows is None or (
            isinstance(rows, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < race.total_rows
                                           for i in rows))) else ()
        if (isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < len(plan) - 1
                or not isinstance(parts, list) or len(parts) != stage + 1 or not all(_is_score(p) for p in parts)
                or any(len(p["rows"]) != len(idx) if p.get("rows") is not None else p.get("utility") is not None
                       for p, idx in zip(parts, plan))):  # (a failed stage has no rows: its position is dropped)
            raise OutputError(f"checkpoint {checkpoint} is damaged (a raced position's stages); pass --force to start over")
    rng.bit_generator.state = run.rng_state

    planned = settings.max_iterations
    if getattr(settings, "stop", "patience") == "budget":  # (drop-K/N aside) the iterations the budget buys
        moving = settings.size - (num_experts if getattr(settings, "anchors", False) else 0)
        planned = math.ceil(max(swarm.budget(settings) - len(x0), 0) / max(moving, 1))
    bar.n = state.evaluations
    bar.set_postfix(best=f"{state.g_score:.4f}")
    while not swarm.finished(state, settings):
        proposal = swarm.propose(state, settings, rng)
        scores = np.full(len(proposal.x), np.nan)
        chosen = np.flatnonzero(proposal.evaluate)
        if race is not None:
            scores[chosen] = raced_scores([proposal.x[i] for i in chosen], state)
        else:
            scores[chosen] = scores_of([proposal.x[i] for i in chosen])
        state = swarm.update(state, proposal, scores, settings)
        evaluated = scores[proposal.evaluate]
        stats = _stats(evaluated)
        run.history.append({"iteration": state.iteration, **stats, "global_best": finite(state.g_score),
                            "evaluations": state.evaluations, "items": run.items, "seconds": round(run.seconds, 3)})
        run.state, run.rng_state = state, rng.bit_generator.state
        save()
        bar.n = state.evaluations  # (memo hits and drop-K/N skips too)
        mean = stats["mean"]
        bar.set_postfix(best=f"{state.g_score:.4f}", mean="-" if mean is None else f"{mean:.4f}")
        if not progress and ranks.is_main:
            LOG.info("iteration %d/%d: best %.4f, mean %s, %d evaluations", state.iteration, planned,
                     state.g_score, "-" if mean is None else f"{mean:.4f}", state.evaluations)
    best, pick = state.g.copy(), None
    scored = len(run.memo)  # (the positions scored on every row, before the average)
    average, averaged, rule = _top_average(state, run.memo, getattr(settings, "average_top", 1), layout,
                                           int(getattr(settings, "seed", 0)))
    if average is not None:
        bar.total += 1
        u_avg, u_best = scores_of([average])[0], state.g_score
        avg_entry, best_entry = run.memo[position_key(average)], run.memo[position_key(state.g)]
        se = layout.paired_error(avg_entry, best_entry) if layout is not None else None
        keep = not math.isfinite(u_avg) or u_best - u_avg > swarm.AVERAGE_Z * (se or 0.0)
        if not keep:
            best = np.asarray(average, dtype=float)
        pick = {"rule": rule, "top": averaged, "positions": scored, "average": finite(u_avg),
                "global_best": finite(u_best), "standard_error": se,
                "chosen": "global best" if keep else "average"}
        if ranks.is_main:
            LOG.info("%s: %s against the global best's %.4f (standard error %s): the %s is the winner",
                     f"the bagged average of {averaged} positions" if rule == "bag" else f"average of the top {averaged}",
                     "-" if pick["average"] is None else f"{u_avg:.4f}", u_best,
                     "-" if se is None else f"{se:.4f}", pick["chosen"])
    bar.total = bar.n
    bar.close()
    if getattr(settings, "stop", "patience") == "budget":
        reason = f"budget of {swarm.budget(settings)} evaluations spent"
    else:
        reason = "max_iterations reached" if state.iteration >= settings.max_iterations else (
            f"global best unchanged for {settings.patience} iterations")
    return SearchResult(
        best=best,
        best_score=Score.from_dict(run.memo[position_key(best)]),
        state=state,
        initial=x0,
        history=run.history,
        memo=run.memo,
        seconds=run.seconds,
        resumed=resumed,
        stop_reason=reason,
        wall_before=run.wall_before,
        items=run.items,
        raced=None if race is None else {"slice_rows": race.slice_rows, "rows": race.total_rows,
                                         "neighbours": race.neighbours, "dropped": len(run.partial),
                                         "finished": run.finished},
        pick=pick,
    )


def _top_average(state: swarm.SwarmState, memo: Dict[str, Dict[str, Any]], setting: Any, layout: Optional[Race],
                 seed: int) -> Tuple[Optional[np.ndarray], int, str]:
    """``average_top``: the average of the distinct positions the run scored on every dev row (the archive's order
    breaks ties), how many it averages, and the rule ("bag" or "top"); (None, 0, rule) with ``average_top`` 1 or
    fewer than two such positions. "bag" (:meth:`Race.bagged`) weighs each position by how often it is the best on
    bootstrap draws of the dev rows (``layout``: racing's rows); without per-row scores (lm_eval, custom) it falls
    back to the top swarm.BAG_FALLBACK_TOP. An integer K: the mean of the K best."""
    rule = "bag" if setting == "bag" else "top"
    k = swarm.BAG_FALLBACK_TOP if setting == "bag" else int(setting)
    if k < 2 or state.archive_x is None:
        return None, 0, rule
    xs, entries, seen = [], [], set()
    for x in state.archive_x:
        key = position_key(x)
        if key in memo and key not in seen:
            seen.add(key)
            xs.append(np.asarray(x, dtype=float))
            entries.append(memo[key])
    scores = np.array([float("nan") if e.get("utility") is None else e["utility"] for e in entries], dtype=float)
    ok = np.flatnonzero(np.isfinite(scores))  # (a failed position has no rows to draw from)
    if rule == "bag" and layout is not None and len(ok) >= 2:
        weights = layout.bagged([entries[i] for i in ok], swarm.BAG_DRAWS, seed)
        if weights is not None:
            if (weights > 0).sum() < 2:  # one position wins every draw: it is the global best, nothing to average
                return None, 0, rule
            return np.tensordot(weights, np.asarray(xs)[ok], axes=1), int((weights > 0).sum()), rule
    average = swarm.top_average(np.asarray(xs), scores, k) if xs else None
    return average, 0 if average is None else min(k, int(np.isfinite(scores).sum())), "top"
