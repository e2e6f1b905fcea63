"""``swarm.json``: the report of a finished run, as typed, versioned models.

This module owns the report. The pipeline builds a :class:`Report` and writes
it with :func:`write`; everything else that reads a run (the final table, the
model card, the Hub commit message, ``mergekit-swarm push``) takes a
:class:`Report`, from the pipeline or from :func:`read`, never raw JSON.

The file is strict JSON (no NaN or Infinity): a utility that is not a finite
number (a failed or diverged evaluation) is ``null``. Local paths are written
relative to the recipe's folder (``./experts/add``), Hub experts as repo ids
with their resolved commit: a pushed report carries no local path.

``SCHEMA_VERSION`` changes whenever a field changes meaning or goes away; a
report of another version is refused by :func:`read` with a clear message.
The JSON schema is ``docs/swarm.schema.json`` (``python -m swarm_merge.report``
prints it; a test keeps the file in step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm_merge.errors import OutputError
from swarm_merge.recipe import Recipe

__all__ = [
    "SCHEMA_VERSION", "Split", "ScoreRow", "Scores", "AdapterRecord", "ExpertRecord", "BaseModelRecord", "LoraRecord", "Coefficients",
    "HistoryEntry", "RacingRecord", "FoundRecord", "SearchRecord", "DataRecord", "MethodResult", "MethodSummary", "Comparison",
    "WeakToStrong", "Emergence", "Analysis", "Report", "ReportError", "read", "write", "json_schema", "finite",
]

SCHEMA_VERSION = 2  # 1: swarm_merge 0.1.0 (no schema_version field)


class ReportError(OutputError):
    """A swarm.json that cannot be read as this version's report."""


def finite(value: Any) -> Optional[float]:
    """A float, or None for NaN, infinities and None (strict JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Split(_Model):
    """A model's score on one data split."""

    utility: Optional[float] = Field(description="the objective's utility (higher is better); null if not finite")
    groups: Dict[str, Optional[float]] = Field(default_factory=dict, description="utility per row group")
    n: int = Field(description="rows scored")

    @classmethod
    def of(cls, score) -> "Split":
        """From an :class:`swarm_merge.objectives.Score`."""
        return cls(utility=finite(score.utility), groups={g: finite(v) for g, v in score.groups.items()}, n=score.n)


class ScoreRow(_Model):
    name: str
    kind: Literal["expert", "uniform", "winner", "global_best"] = Field(
        description="global_best: the search's best position, shown where the average of the top ones won "
                    "(swarm.average_top)")
    coefficients: List[List[float]] = Field(description="(groups, experts) coefficients of this model")
    dev: Split
    test: Optional[Split] = None


class Scores(_Model):
    """The experts, the uniform average, the winner (and the global best where it is not the winner), on dev
    (searched) and test (held out)."""

    rows: List[ScoreRow]

    def _kind(self, kind: str) -> ScoreRow:
        return next(r for r in self.rows if r.kind == kind)

    @property
    def winner(self) -> ScoreRow:
        return self._kind("winner")

    @property
    def uniform(self) -> ScoreRow:
        return self._kind("uniform")

    @property
    def has_test(self) -> bool:
        return any(r.test is not None for r in self.rows)


class AdapterRecord(_Model):
    """A LoRA adapter expert's shape (absent for a full-model expert)."""

    r: int
    alpha: float
    rslora: bool = False
    target_modules: List[str] = Field(description="the module names it adapts (leaf names)")
    base_model: Optional[str] = Field(None, description="base_model_name_or_path in its adapter_config.json")


class ExpertRecord(_Model):
    name: str
    model: str = Field(description="Hub repo id, or the folder relative to the recipe's folder")
    local: bool
    requested_revision: Optional[str] = None
    revision: Optional[str] = Field(None, description="the commit that was pulled (Hub experts)")
    parameters: int
    license: Optional[str] = None
    pickled: bool = False
    digest: str = Field(description="digest of the weights' bytes as searched")
    adapter: Optional[AdapterRecord] = Field(None, description="set when the expert is a LoRA adapter")


class BaseModelRecord(_Model):
    model: str
    revision: Optional[str] = None
    digest: Optional[str] = Field(None, description="digest of its weights (LoRA runs, where they were searched)")


class LoraRecord(_Model):
    """The written adapter of a LoRA run: ``adapter_config.json`` + ``adapter_model.safetensors``."""

    space: Literal["factors", "delta"] = Field(description="factors: A and B combined (the paper); delta: s*B*A")
    rank: int = Field(description="the written adapter's rank (delta space: the sum of the experts' ranks)")
    alpha: float
    rslora: bool = False
    target_modules: List[str]
    merged: Optional[str] = Field(None, description="subfolder holding the base with the adapter merged in")


class Coefficients(_Model):
    """The winner: ``sum_k a_k E_k`` per tensor (per layer group with granularity layer)."""

    sums: List[float] = Field(description="each group's coefficient sum (1: an affine merge)")
    model: Optional[List[float]] = Field(None, description="one coefficient per expert (granularity model)")
    groups: Optional[List[str]] = Field(None, description="layer group labels (granularity layer)")
    per_group: Optional[List[List[float]]] = Field(None, description="(groups, experts) (granularity layer)")

    @classmethod
    def of(cls, best: np.ndarray, labels: List[str]) -> "Coefficients":
        best = np.asarray(best, dtype=np.float64)
        if best.shape[0] == 1:
            return cls(sums=best.sum(axis=1).tolist(), model=best[0].tolist())
        return cls(sums=best.sum(axis=1).tolist(), groups=list(labels), per_group=best.tolist())

    def matrix(self) -> np.ndarray:
        return np.array([self.model] if self.model is not None else self.per_group, dtype=np.float64)


class HistoryEntry(_Model):
    iteration: int = Field(description="0: the initial swarm")
    best: Optional[float] = None
    mean: Optional[float] = None
    worst: Optional[float] = None
    global_best: Optional[float] = None
    evaluations: int
    items: Optional[int] = Field(None, description="dev rows scored so far (item-evaluations)")
    seconds: float


class RacingRecord(_Model):
    """Racing (``swarm.racing``): moving particles scored on a slice of the dev rows first."""

    slice_rows: int = Field(description="dev rows in the slice every new moving particle is scored on first")
    rows: int = Field(description="dev rows in all")
    confidence: float = Field(description="one-sided confidence that a dropped particle would not have beaten "
                              "the global best")
    gain: Literal["any", "row"] = Field("any", description="swarm.race_gain: the least gain over the global best a "
                                        "particle must be able to reach to be finished (row: one dev row)")
    neighbours: int = Field(0, description="swarm.race_neighbours: after the slice, a particle is scored on the rows "
                            "where one of this many positions nearest it differs from the global best (0: the plain "
                            "stages)")
    dropped: int = Field(description="particles dropped before their last stage")
    finished: int = Field(description="particles scored on the other rows too")


class FoundRecord(_Model):
    """When the global best was found: what the search had spent by the end of that iteration. What came after
    found nothing better (with ``average_top`` 1 a run that stopped there would have written the same merge)."""

    iteration: int = Field(description="the iteration at whose end the global best was first reached (0: the "
                           "initial swarm)")
    evaluations: int = Field(description="evaluations made by the end of that iteration")
    items: Optional[int] = Field(None, description="dev rows scored by the end of that iteration")

    @classmethod
    def of(cls, history: List[Dict[str, Any]]) -> Optional["FoundRecord"]:
        """From the search's history (one record per iteration, with the global best after it); None without one."""
        final = history[-1].get("global_best") if history else None
        if final is None:
            return None
        first = next(h for h in history if h.get("global_best") == final)
        return cls(iteration=first["iteration"], evaluations=first["evaluations"], items=first.get("items"))


class AverageRecord(_Model):
    """``swarm.average_top``: the average of the best positions, scored on every dev row once the search was over,
    against the global best."""

    rule: Literal["bag", "top"] = Field("top", description="bag: each position weighted by how often it is the best "
                                       "on bootstrap draws of the dev rows; top: the mean of the best ones")
    top: int = Field(description="positions averaged (bag: those with a weight above 0)")
    positions: int = Field(description="the distinct positions scored on every dev row it was chosen from")
    average: Optional[float] = Field(description="the average's dev utility")
    global_best: Optional[float] = Field(description="the global best's dev utility")
    standard_error: Optional[float] = Field(description="the standard error of their difference, from the paired "
                                            "row differences (null without per-row scores)")
    chosen: Literal["average", "global best"] = Field(description="the winner: the average unless the global best "
                                                      "beats it by more than one standard error")


class SearchRecord(_Model):
    iterations: int
    evaluations: int
    distinct_positions_scored: int
    items: Optional[int] = Field(None, description="dev rows scored by the search (item-evaluations): its cost")
    racing: Optional[RacingRecord] = None
    stop_reason: str
    found: Optional[FoundRecord] = Field(None, description="when the global best was found (the rest of the budget "
                                         "found nothing better)")
    average: Optional[AverageRecord] = Field(None, description="swarm.average_top: the average of the best positions "
                                             "against the global best (null: not averaged)")
    chosen_by: Optional[str] = Field(None, description="how the winner was chosen among the positions scored")
    resumed: bool
    seconds: float = Field(description="search time, resumed parts included")
    history: List[HistoryEntry]


class DataRecord(_Model):
    dev_rows: int
    test_rows: Optional[int] = None
    test_rows_in_dev: int = Field(0, description="test rows that also appear in the dev set (0: held out)")
    benchmarks_searched: List[str] = Field(default_factory=list, description=(
        "public benchmarks an lm_eval objective searched on (--allow-benchmark-tasks), each with why it is one"))


class MethodResult(_Model):
    """One search method at one seed (``--baselines``): its winner, chosen on dev."""

    method: Literal["swarm", "random search", "CMA-ES", "GP (Optuna)", "NGOpt (Nevergrad)", "task arithmetic", "TIES",
                    "DARE"]
    seed: Optional[int] = Field(None, description="null for a deterministic method")
    coefficients: Optional[List[List[float]]] = Field(None, description="the winner's (G, K) coefficients "
                                                      "(the coefficient searches)")
    config: Optional[Dict[str, Any]] = Field(None, description="the mergekit config of the chosen grid point "
                                             "(the mergekit baselines)")
    dev: Split
    test: Optional[Split] = None
    evaluations: int = Field(description="distinct positions scored on dev")
    items: Optional[int] = Field(None, description="dev rows scored (item-evaluations; the shared budget)")
    seconds: float = Field(description="wall time of the method (positions another method scored first cost nothing)")


class Gap(_Model):
    """The swarm's winner against another method's, seed by seed: the same seed, budget and rows (paired)."""

    seeds: int = Field(description="seeds where both have a finite utility")
    mean: float = Field(description="the mean over those seeds of the swarm's utility minus this method's")
    half_width: Optional[float] = Field(None, description="half the width of the mean's 95 % Student t interval over "
                                        "the seeds (null with one seed); an interval that spans 0: the seeds do not "
                                        "tell the two apart")
    above: int = Field(description="seeds where the swarm's utility is higher")
    below: int = Field(description="seeds where it is lower")


class MethodSummary(_Model):
    """A method over its seeds: mean and spread (sample standard deviation) of its winners' utilities."""

    method: str
    seeds: int
    dev_mean: Optional[float] = None
    dev_std: Optional[float] = None
    test_mean: Optional[float] = None
    test_std: Optional[float] = None
    evaluations: int
    items: Optional[int] = None
    seconds_mean: float
    dev_gap: Optional[Gap] = Field(None, description="the swarm minus this method on dev, paired by seed (null in "
                                   "the swarm's own row)")
    test_gap: Optional[Gap] = Field(None, description="the same on test")


class Comparison(_Model):
    """Other searches over the same coefficients at the swarm's budget (``--baselines`` / ``compare``)."""

    budget: int = Field(description="whole dev-set evaluations each baseline was given at the run's seed: the "
                        "swarm's item-evaluations over the dev rows (at every other seed, the swarm's there: runs)")
    items: Optional[int] = Field(None, description="dev rows each method was given at the run's seed: the swarm's "
                                 "item-evaluations (at every other seed, the swarm's there: runs)")
    seeds: List[int]
    runs: List[MethodResult]
    summary: List[MethodSummary]


class WeakToStrong(_Model):
    """Where the particle that found the global best started (the paper's weak-to-strong analysis)."""

    particle: Optional[int] = Field(None, description="its index in the initial swarm (null: not traceable)")
    start_rank: Optional[int] = Field(None, description="its initial dev utility's rank in the initial swarm (1: best)")
    started_as: Optional[str] = Field(None, description="an expert's name, 'uniform soup', 'child', or 'scout' "
                                      "(swarm.scouts: a draw scored at the start that no particle beat; particle "
                                      "and start_rank are then null)")
    size: int
    surrogate: bool = Field(False, description="the winning position was the surrogate's proposal for that particle "
                                               "(swarm.surrogate), not a move of the swarm's update")


class Emergence(_Model):
    """Test items only the winner solves, and items it lost (accuracy objectives, with a test set)."""

    items: int
    gained: int = Field(description="solved by the winner and by no expert")
    lost: int = Field(description="solved by some expert but not by the winner")
    solved_by_some_expert: int
    solved_by_winner: int
    groups: Dict[str, Dict[str, int]] = Field(default_factory=dict, description="gained / lost per row group")


class Analysis(_Model):
    weak_to_strong: WeakToStrong
    emergence: Optional[Emergence] = None
    winner_gap: Optional[float] = Field(None, description="the winner's dev minus test utility")
    best_baseline: Optional[str] = Field(None, description="the non-swarm row with the best dev utility")
    best_baseline_gap: Optional[float] = Field(None, description="its dev minus test utility")
    selection_noise: Optional[float] = Field(
        None, description="accuracy objectives: how far the best of this many dev scores can sit above its true "
        "value by chance alone, about sd/sqrt(dev rows) * sqrt(2 ln evaluations)")
    warnings: List[str] = Field(default_factory=list, description="what the reader should not over-read")


class Report(_Model):
    """The whole of ``swarm.json``."""

    schema_version: Literal[2] = SCHEMA_VERSION
    tool: Literal["swarm_merge"] = "swarm_merge"
    recipe: Recipe = Field(description="the recipe as run; local paths relative to its folder")
    experts: List[ExpertRecord]
    base_model: Optional[BaseModelRecord] = None
    lora: Optional[LoraRecord] = Field(None, description="set when the experts are LoRA adapters")
    objective_models: List[BaseModelRecord] = Field(default_factory=list,
                                                    description="reward and judge models the utility used, as pulled")
    coefficients: Coefficients
    scores: Scores
    data: DataRecord
    search: SearchRecord
    analysis: Optional[Analysis] = None
    comparison: Optional[Comparison] = None
    wall_seconds: float = Field(description="the whole run, resumed parts included")
    hardware: str
    versions: Dict[str, str]


def write(path: Union[str, Path], report: Report) -> None:
    from swarm_merge.output import write_json_atomic

    write_json_atomic(Path(path), report.model_dump(mode="json"))


def read(path: Union[str, Path]) -> Report:
    """Read a ``swarm.json``.

    Raises:
        ReportError: missing, not JSON, another schema version, or invalid.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path} not found; give the output folder of a finished mergekit-swarm run") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} cannot be read ({type(exc).__name__}); re-run the recipe") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a swarm_merge report; re-run the recipe")
    version = data.get("schema_version", 1)
    if version != SCHEMA_VERSION:
        raise ReportError(
            f"{path} has report schema {version} but this swarm_merge reads schema {SCHEMA_VERSION}; re-run the "
            "recipe with this version (--resume reuses its checkpoint), or use the swarm_merge that wrote it"
        )
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ReportError(f"{path} is not a valid report ({where}: {err['msg']}); re-run the recipe") from None


def json_schema() -> Dict[str, Any]:
    return Report.model_json_schema()


if __name__ == "__main__":  # python -m swarm_merge.report > docs/swarm.schema.json
    print(json.dumps(json_schema(), indent=2))
