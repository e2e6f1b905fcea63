"""Racing: score a moving particle on stages of the dev rows, and stop where it cannot beat the global best.

The winner is the global best, so a moving particle's score matters to the result only if it may beat it.
Each new position is scored stage by stage on a fixed draw of the dev rows, made once per run from the
seed and stratified by objective component and row group (the same rows for every particle, so
comparisons are paired): a ``race_slice`` share of every stratum (at least two rows), then twice that,
and so on up to half the rows, then the rows left are halved down to a last stage about as large as the slice
(the default with ``granularity: model`` 0.125: 1/8, 1/4, 1/2, 3/4, 7/8, every row; with layer groups 0.25:
1/4, 1/2, 3/4, every row). After each stage but the last its rows are compared with the same rows of the
global best (scored on every row earlier, its rows kept in the memo):

- ``D`` = the estimated difference of the whole-set utilities: per component, the weighted mean of the
  paired row differences on the rows seen; components combined as the objective combines them (a
  harmonic suite: linearised at the global best).
- ``SE`` = its standard error: per component, the weighted sample deviation of the differences over
  ``sqrt(rows seen)``, times the finite-population factor ``sqrt(1 - seen / rows)``.
- **Dropped** if ``D + z * SE < 0``, ``z`` the normal quantile of ``swarm.race_confidence`` (one-sided:
  at the default 0.95 a particle exactly as good as the global best is dropped at a stage about 5 % of the
  time, at 0.8 about 20 %; bench/RESULTS.md, "Racing at 0.8", for what 0.8 saves and costs). A
  dropped particle's score is the estimate ``g_score + D``: never above the global best, so it never becomes
  the winner, but it may still move its own personal best (the swarm's memory keeps working).
- ``swarm.race_gain: row`` asks more of a particle: ``D + z * SE`` must reach one row's worth (``w / W``,
  through the suite's slope), not 0, where every row value is 0 or 1. The winner has to be strictly better,
  so one row is the least gain that changes it; a particle tied with the global best on every row seen
  (no spread to estimate) is then dropped. Continuous rows (loglik, reward) race as with ``any``.
- Otherwise the next stage is scored; after the last, the stages merge into the whole-set score (the same
  numbers a whole-set evaluation gives, up to batching round-off of log-likelihoods).

**Contested rows** (``swarm.race_neighbours`` K, by default 4 with ``granularity: model`` and 0 with layer groups;
0 turns it off). Late in a run most particles sit
near the global best and give its answers on most rows; the rows where they may differ are the rows where
positions near them already did. So a particle's own plan (:meth:`Race.plan`): the slice, then its *contested*
rows (where one of the K positions nearest it, scored on every row in earlier iterations, gives another value
than the global best; :meth:`Race.contested`), then the later stages' other rows, its *settled* rows. The
estimate is stratified: per component, ``D`` and ``SE`` are computed in each stratum from its rows seen and
weighted by the stratum's share of the rows, so once every contested row is seen that stratum is known exactly
and only the settled rows seen (a random sample of them: the run's stages) carry uncertainty. A particle
that loses a contested row while matching the global best on the settled rows seen is then dropped, where
one random sample of the same size could not tell. The risk is the settled stratum's: where every settled row
seen agrees its spread is 0, so a particle that differs only on settled rows not yet seen is judged by the
contested ones. Replayed on the default's runs, ten seeds (bench/racing_rules.py; bench/RESULTS.md, "Racing
on the rows the neighbours contest"), K = 4 dropped 1 of the 62 moves that improved the global best on the demo
and 0 of 43 on bench2, and scored 61 % and 56 % of the dev rows, against 72 % and 77 % without. With a slice
of 1/8 as well (the default since 2026-12-06), whole runs over twenty seeds scored 63 % and 58 % of the demo's and
bench2's rows, against 70 % and 76 % for the plain stages from a slice of 1/4, with test 0.006 higher on both
(bench/RESULTS.md, "Contested rows after a slice of 1/8"). With
``race_gain: row`` the row asked for applies once every contested row is seen. Where the neighbours contest more than half the
rows (far from the particle, as in 24 dimensions) they say too little, and continuous rows (loglik, reward)
differ everywhere: the plain stages run then.

A decision depends only on scores already in the memo, so a run is as deterministic with racing as
without it, and ``--resume`` replays it. The initial swarm (the experts, the soup, the children) is
scored on every row.

Objectives that race: exact_match, multiple_choice, loglik, reward, judge and suites of them (a
utility is a weighted mean of per-row values). lm_eval and custom objectives score a whole set at
once and are never raced (``racing: auto`` leaves them alone; ``racing: true`` refuses them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from swarm_merge.objectives import Score, Suite, aggregate, kind_of

__all__ = ["Race", "can_race", "layout_of", "neighbours_of", "plan_race", "race_of", "rows_scorer", "slice_of"]


def can_race(objective) -> bool:
    """Whether the objective's utility is a weighted mean of per-row values (so a slice estimates it)."""
    if isinstance(objective, Suite):
        return all(can_race(o) for o in objective.parts)
    kind = kind_of(objective)
    return kind is not None and kind.per_row


def _components(objective, data) -> List[Sequence]:
    return list(data) if isinstance(objective, Suite) else [data]


@dataclass(frozen=True)
class Race:
    """The stages of a race as indices into the dev rows laid end to end (a suite's components one after
    the other): ``parts[0]`` is the slice, each next part doubles the rows seen up to half, then halves the rows
    left; the last ends the set."""

    objective: Any
    data: Any  # the dev rows in the objective's shape (a suite: a list per component)
    parts: Tuple[np.ndarray, ...]
    z: float
    confidence: float
    gain: Literal["any", "row"] = "any"  # swarm.race_gain
    neighbours: int = 0  # swarm.race_neighbours (0: the stages above for every particle)

    def subset(self, idx: np.ndarray) -> Any:
        """The dev rows ``idx`` (indices into the rows laid end to end), in the objective's shape."""
        chosen, parts, start = set(np.asarray(idx).tolist()), [], 0
        for part in _components(self.objective, self.data):
            parts.append([ex for i, ex in enumerate(part) if start + i in chosen])
            start += len(part)
        return parts if isinstance(self.objective, Suite) else parts[0]

    @property
    def sizes(self) -> List[int]:
        return [len(part) for part in _components(self.objective, self.data)]

    @property
    def slice_rows(self) -> int:
        return len(self.parts[0])

    @property
    def total_rows(self) -> int:
        return sum(len(p) for p in self.parts)

    def contested(self, x: np.ndarray, reference_rows, finished: Sequence[Tuple[np.ndarray, Any]]) -> Optional[np.ndarray]:
        """The rows where one of the ``neighbours`` positions nearest ``x`` (the largest coefficient difference;
        ``finished``: positions scored on every row, with their row values) differs from the global best's
        ``reference_rows``. None (race on the plain stages) without neighbours, where no row is contested, or where
        more than half are: the neighbours are then too far from ``x`` to say where it differs (in 24 dimensions
        the contested stage cost more rows than it saved; bench/RESULTS.md, "Racing on the rows the neighbours
        contest"), and continuous row values (loglik's) differ everywhere."""
        if not self.neighbours or reference_rows is None or len(reference_rows) != self.total_rows:
            return None
        ref = np.asarray(reference_rows, dtype=float)
        x = np.asarray(x, dtype=float)
        distance = [float(np.abs(np.asarray(p, dtype=float) - x).max()) for p, _ in finished]
        near = [i for i in np.argsort(distance, kind="stable") if distance[i] > 0][: self.neighbours]
        out = np.zeros(self.total_rows, dtype=bool)
        for i in near:
            rows = np.asarray(finished[i][1], dtype=float)
            if len(rows) == len(ref):
                out |= rows != ref
        return out if 0 < out.sum() <= len(out) / 2 else None

    def plan(self, contested: Optional[np.ndarray] = None) -> Tuple[np.ndarray, ...]:
        """One particle's stages: the slice, then (``contested`` given) the contested rows not in it, then each
        later stage's settled rows (the plain stages without ``contested``)."""
        if contested is None:
            return self.parts
        rest = np.flatnonzero(contested)
        stages = [self.parts[0], rest[~np.isin(rest, self.parts[0])]]
        stages += [idx[~contested[idx]] for idx in self.parts[1:]]
        return tuple(idx for idx in stages if len(idx))

    def seen(self, stage: int) -> np.ndarray:
        """The rows scored once stages 0..``stage`` are, sorted."""
        return np.sort(np.concatenate(self.parts[: stage + 1]))

    def combine(self, scores: Sequence[Score], parts: Optional[Sequence[np.ndarray]] = None) -> Score:
        """The objective's score of the rows stages 0..j cover, from the stage scores ``scores[0..j]``
        (rows in index order; ``parts``: the particle's stages, :meth:`plan`, default the plain ones): after the
        last stage, the whole set's score."""
        if any(s.rows is None or s.weights is None or not math.isfinite(s.utility) for s in scores):
            return Score(float("nan"), {}, sum(s.n for s in scores))  # a failed part fails the whole
        n = self.total_rows
        values, weights, seen = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
        for idx, s in zip(self.parts if parts is None else parts, scores):
            values[idx], weights[idx], seen[idx] = s.rows, s.weights, True
        per_component, start = [], 0
        for part in _components(self.objective, self.data):
            keep = [i for i in range(start, start + len(part)) if seen[i]]
            per_component.append(aggregate(values[keep], weights[keep], [part[i - start] for i in keep]))
            start += len(part)
        return self.objective.combined(per_component) if isinstance(self.objective, Suite) else per_component[0]

    def _component_means(self, values: np.ndarray, weights: np.ndarray) -> List[float]:
        out, start = [], 0
        for size in self.sizes:
            w = weights[start:start + size]
            out.append(float(np.dot(w, values[start:start + size]) / w.sum()) if w.sum() > 0 else math.nan)
            start += size
        return out

    def verdict(self, candidate: Score, seen: np.ndarray, reference: Dict[str, Any],
                contested: Optional[np.ndarray] = None) -> Optional[float]:
        """None: go on with the candidate. A number: it is dropped, with this estimate of its full utility.

        ``candidate``: its score on the rows ``seen`` (sorted indices; :meth:`combine`). ``reference``: the
        memo entry of the position it races (``utility``, ``rows`` and ``weights`` of every dev row).
        ``contested`` (:meth:`contested`): each component's rows are two strata, contested and settled, each
        estimated from its own rows seen (a stratified estimate); ``race_gain: row`` asks for its row only once
        every contested row is seen."""
        if not math.isfinite(candidate.utility):
            return math.nan  # a failed particle is failed on every row: nothing to finish
        ref_u, ref_rows, ref_w = reference.get("utility"), reference.get("rows"), reference.get("weights")
        if ref_u is None or ref_rows is None or ref_w is None or not math.isfinite(ref_u):
            return None  # nothing to race against
        ref_rows, ref_w = np.asarray(ref_rows, dtype=float), np.asarray(ref_w, dtype=float)
        seen = np.asarray(seen)
        if len(ref_rows) != self.total_rows or candidate.rows is None or len(candidate.rows) != len(seen):
            return None
        slopes = self._slopes(ref_u, ref_rows, ref_w)
        if slopes is None:
            return None
        d = np.zeros(self.total_rows)
        w = np.zeros(self.total_rows)
        is_seen = np.zeros(self.total_rows, dtype=bool)
        d[seen], w[seen], is_seen[seen] = np.asarray(candidate.rows, dtype=float) - ref_rows[seen], candidate.weights, True
        strata = np.zeros(self.total_rows, dtype=bool) if contested is None else np.asarray(contested, dtype=bool)
        every_contested_seen = not (strata & ~is_seen).any()
        margin = (self._step(slopes, ref_rows, ref_w, candidate.rows)
                  if self.gain == "row" and every_contested_seen else 0)
        estimate, variance, start = 0.0, 0.0, 0
        for slope, size in zip(slopes, self.sizes):
            component = np.zeros(self.total_rows, dtype=bool)
            component[start:start + size] = True
            start += size
            weight = ref_w[component].sum()
            for stratum in (component & strata, component & ~strata):
                rows, mine = int(stratum.sum()), stratum & is_seen
                m = int(mine.sum())
                if rows == 0:
                    continue
                if (m < 2 and m < rows) or w[mine].sum() <= 0 or weight <= 0:
                    return None  # too few rows seen in a stratum to say anything
                share = ref_w[stratum].sum() / weight  # (1 without strata)
                wc, dc = w[mine], d[mine]
                mean = float(np.dot(wc, dc) / wc.sum())
                var = 0.0 if m == rows else (
                    float(np.dot(wc ** 2, (dc - mean) ** 2) / wc.sum() ** 2) * m / (m - 1) * (1 - m / rows))
                estimate += slope * share * mean
                variance += (slope * share) ** 2 * var
        if estimate + self.z * math.sqrt(variance) < margin and estimate <= 0:  # (ahead so far: finish it)
            return ref_u + estimate
        return None

    def _slopes(self, ref_u: float, ref_rows: np.ndarray, ref_w: np.ndarray) -> Optional[List[float]]:
        """How the whole-set utility moves with each component's mean (a harmonic suite: linearised at the
        reference); None where the harmonic mean is 0 (no slope to linearise along)."""
        if isinstance(self.objective, Suite) and self.objective.combine == "harmonic":
            means = self._component_means(ref_rows, ref_w)
            total = sum(o.weight for o in self.objective.parts)
            if min(means) <= 0:
                return None
            return [o.weight * ref_u ** 2 / (total * m ** 2) for o, m in zip(self.objective.parts, means)]
        if isinstance(self.objective, Suite):
            total = sum(o.weight for o in self.objective.parts)
            return [o.weight / total for o in self.objective.parts]
        return [1.0]

    def paired_error(self, candidate: Dict[str, Any], reference: Dict[str, Any]) -> Optional[float]:
        """The standard error of the difference between two positions' whole-set utilities (memo entries, each
        scored on every dev row), from their paired row differences, with the dev rows taken as a sample of the
        task's rows (no finite-population factor: every row is seen, and the question is whether the difference
        would hold on other rows). None without both positions' rows or a slope."""
        rows = [np.asarray(e.get("rows") if e.get("rows") is not None else [], dtype=float) for e in (candidate, reference)]
        w = np.asarray(reference.get("weights") if reference.get("weights") is not None else [], dtype=float)
        ref_u = reference.get("utility")
        if any(len(r) != self.total_rows for r in rows) or len(w) != self.total_rows or ref_u is None:
            return None
        slopes = self._slopes(float(ref_u), rows[1], w)
        if slopes is None:
            return None
        d, variance, start = rows[0] - rows[1], 0.0, 0
        for slope, size in zip(slopes, self.sizes):
            wc, dc = w[start:start + size], d[start:start + size]
            start += size
            m = int((wc > 0).sum())
            if m < 2:
                return None
            mean = float(np.dot(wc, dc) / wc.sum())
            variance += slope ** 2 * float(np.dot(wc ** 2, (dc - mean) ** 2) / wc.sum() ** 2) * m / (m - 1)
        return math.sqrt(variance)

    def bagged(self, entries: Sequence[Dict[str, Any]], draws: int, seed: int) -> Optional[np.ndarray]:
        """Bagging the argmax (``swarm.average_top: bag``): on each of ``draws`` bootstrap draws of the dev rows
        (with replacement within each objective component, so a suite keeps its parts; ``seed`` draws them),
        which of the positions (memo entries, each scored on every row) has the best utility, the objective's
        combination of its components included; ties share the draw. Returns how often each one wins (weights
        that sum to 1), or None without every position's rows. Written here: the draws are multinomial row counts
        (draws x rows), so the cost is one matrix product, whatever the rows and positions."""
        if not entries:
            return None
        rows = [e.get("rows") for e in entries]
        w = entries[0].get("weights")
        if w is None or len(w) != self.total_rows or any(r is None or len(r) != self.total_rows for r in rows):
            return None
        rows, w = np.asarray(rows, dtype=float), np.asarray(w, dtype=float)
        rng = np.random.default_rng(seed)
        means, start = [], 0
        for size in self.sizes:
            counts = rng.multinomial(size, np.full(size, 1.0 / size), size=draws) * w[start:start + size]
            mass = counts.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                means.append(rows[:, start:start + size] @ counts.T / mass)  # (positions, draws)
            start += size
        utility = means[0]
        if isinstance(self.objective, Suite):
            parts = [o.weight for o in self.objective.parts]
            if self.objective.combine == "harmonic":
                with np.errstate(invalid="ignore", divide="ignore"):
                    utility = sum(parts) / sum(p / m for p, m in zip(parts, means))
                utility = np.where(np.any([m <= 0 for m in means], axis=0), 0.0, utility)
            else:
                utility = sum(p * m for p, m in zip(parts, means)) / sum(parts)
        utility = np.where(np.isfinite(utility), utility, -np.inf)
        best = utility >= utility.max(axis=0, keepdims=True)
        return (best / best.sum(axis=0, keepdims=True)).sum(axis=1) / draws

    def _step(self, slopes, ref_rows: np.ndarray, ref_w: np.ndarray, cand_rows) -> float:
        """The smallest gain of the whole-set utility: one row of weight w in component c moves it by
        ``slope_c * w / W_c`` when every row value is 0 or 1 (exact match, multiple choice); 0 otherwise."""
        values = np.concatenate([ref_rows, np.asarray(cand_rows, dtype=float)])
        if not np.isin(values, (0.0, 1.0)).all():
            return 0.0
        steps, start = [], 0
        for slope, size in zip(slopes, self.sizes):
            w = ref_w[start:start + size]
            if w.sum() > 0:  # (weights are >= 0: some row weighs)
                steps.append(slope * float(w[w > 0].min()) / float(w.sum()))
            start += size
        return min(steps) if steps else 0.0


def plan_race(objective, data, *, fraction: float, confidence: float, seed: int, gain: str = "any",
              neighbours: int = 0) -> Optional[Race]:
    """The run's race: the slice is ``fraction`` of the rows of every (component, group) stratum (at least two),
    each next stage doubles the share seen up to half, then halves the share left while it is at least ``fraction``,
    the last takes the rest; drawn with a generator of its own
    seeded from ``seed`` (the swarm's draws are untouched). None when some component would keep no
    rows outside the slice (too few rows to race)."""
    rng = np.random.default_rng([seed, 0x5ace])
    shares = [fraction]
    while shares[-1] * 2 < 1:
        shares.append(shares[-1] * 2)
    doubling = len(shares)
    # Then halve the rows left, down to a last stage about as large as the slice: most finished particles trail
    # the global best by a row or two, and a trailing one is told apart only late (bench/RESULTS.md, "A stage at
    # three quarters"); 0.25: 1/4, 1/2, 3/4, all.
    while (1 - shares[-1]) / 2 >= fraction - 1e-12:
        shares.append(1 - (1 - shares[-1]) / 2)
    stages: List[List[int]] = [[] for _ in range(len(shares) + 1)]
    start = 0
    for part in _components(objective, data):
        strata: Dict[Any, List[int]] = {}
        for i, ex in enumerate(part):
            strata.setdefault(ex.group, []).append(start + i)
        for key in sorted(strata, key=str):
            order = rng.permutation(strata[key]).tolist()
            done = 0
            for j, share in enumerate(shares):
                if j < doubling:  # (at least two rows more per stage, and a row kept for the last one)
                    upto = min(len(order) - 1, max(2 * (j + 1), round(share * len(order))))
                else:  # (a halving stage keeps a row for the last one)
                    upto = max(done, min(round(share * len(order)), len(order) - 1))
                stages[j] += order[done:upto]
                done = max(done, upto)
            stages[-1] += order[done:]
        start += len(part)
    if not stages[-1]:
        return None
    # (a small row group may be used up before the last stage: a stage that gained no rows is left out)
    parts = tuple(np.array(sorted(s), dtype=np.int64) for s in stages if s)
    if len(parts) < 2:
        return None
    ends = np.cumsum([len(part) for part in _components(objective, data)])
    if len(np.unique(np.searchsorted(ends, parts[-1], side="right"))) < len(ends):
        return None
    return Race(objective=objective, data=data, parts=parts, z=NormalDist().inv_cdf(confidence), confidence=confidence,
                gain=gain, neighbours=neighbours)


def slice_of(settings) -> float:
    """``swarm.race_slice``; "auto": 1/8 with ``granularity: model``, 1/4 with layer groups (bench/RESULTS.md,
    "Contested rows after a slice of 1/8")."""
    value = getattr(settings, "race_slice", 0.25)
    return (0.125 if getattr(settings, "granularity", "model") == "model" else 0.25) if value == "auto" else float(value)


def neighbours_of(settings) -> int:
    """``swarm.race_neighbours``; "auto": 4 with ``granularity: model``, 0 (the plain stages) with layer groups."""
    value = getattr(settings, "race_neighbours", 0)
    return (4 if getattr(settings, "granularity", "model") == "model" else 0) if value == "auto" else int(value)


def layout_of(settings, objective, data) -> Optional[Race]:
    """The dev rows' layout (components, their rows) that ``average_top: bag`` and its standard error read, raced
    or not: the race ``race_of`` would plan with racing on, or None where the utility is not a mean over rows."""
    if not can_race(objective):
        return None
    return plan_race(objective, data, fraction=slice_of(settings), confidence=settings.race_confidence,
                     seed=settings.seed, gain=settings.race_gain, neighbours=neighbours_of(settings))


def race_of(settings, objective, data) -> Optional[Race]:
    """The race a run's ``swarm`` settings ask for on this objective and dev set, or None (no racing).

    Raises:
        RecipeError: ``racing: true`` on an objective that scores a whole set at once (lm_eval, custom).
    """
    from swarm_merge.errors import RecipeError

    if settings.racing is False:
        return None
    if not can_race(objective):
        if settings.racing is True:
            raise RecipeError(f"swarm.racing: true needs a utility that is a mean over dev rows, and {objective.type} "
                              "scores a whole set at once; set swarm.racing: auto (or false)")
        return None
    race = layout_of(settings, objective, data)
    if race is None and settings.racing is True:
        raise RecipeError(f"swarm.racing: true, but a slice of {slice_of(settings):g} of the dev rows (2 or more per "
                          "row group) leaves no rows to finish with; add dev rows or lower swarm.race_slice")
    return race


def rows_scorer(evaluator, race: Optional[Race], objective):
    """Racing's scorer: ``(coefficients, row indices) -> Score`` on those dev rows (None without a race)."""
    if race is None:
        return None
    return lambda x, idx: evaluator.evaluate(x, race.subset(idx), objective)
