"""The recipe: *what* to search. Frozen pydantic models, loaded from YAML.

How to run it here (device, memory, output policy) lives in
:mod:`swarm_merge.options`; a recipe is pure data that can travel on the Hub,
so it names components by short registered names, never by import path.

Paths of inputs (local expert folders, data files) are resolved relative to the
recipe file's folder, so a recipe and its data travel together; ``output.dir``
is resolved relative to the current directory, where the user runs the command.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, ValidationError, field_validator, model_validator

from swarm_merge.errors import RecipeError

__all__ = [
    "ExpertRef",
    "Objective",
    "SwarmSettings",
    "OutputSettings",
    "Recipe",
    "load_recipe",
    "parse_recipe",
    "apply_overrides",
    "looks_local",
    "portable_path",
]

OBJECTIVE_TYPES = ("exact_match", "multiple_choice", "loglik", "reward", "judge", "lm_eval", "custom")
# Keys a recipe might use to name Python code. A recipe travels (the Hub, pull
# requests), so it can never make a run execute code: only --objective-code can.
_CODE_KEYS = ("code", "function", "objective_code", "module", "script", "callable", "python")
# A Hub repo id: "name" or "org/name", optionally "@revision".
_REPO_ID = re.compile(r"^(?:[\w.\-]+/)?[\w.\-]+(?:@[\w.\-/]+)?$")
# A recipe name names the default output folder (out/<name>) and titles the
# card: one path component of plain characters, like a Hub repo name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# A recipe travels (Hub, pull requests). PyYAML builds aliases as shared
# objects (a DAG), so a few hundred bytes can stand for billions of leaves:
# nothing here may walk a recipe value unbounded (messages use short_repr),
# and recipes with more than MAX_ALIASES alias uses are refused outright.
MAX_ALIASES = 100
MAX_RECIPE_BYTES = 1_000_000


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() bounded in depth and length (a recipe value may be a huge alias DAG)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 2, limit, limit, 4, 4
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def portable_path(path, base_dir) -> str:
    """The one rule for a local path in what a run publishes (swarm.json, the card, mergekit.yml, a written
    adapter's base): relative to the recipe's folder ``base_dir``, with "./" in front of a path inside it so
    it never reads as a Hub repo id (org/name); as given when there is no recipe folder."""
    if base_dir is None:
        return str(path)
    relative = os.path.relpath(os.path.expanduser(str(path)), base_dir)
    return relative if relative.startswith("..") else os.path.join(".", relative)


class _Frozen(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in a recipe or --set is refused at its own key,
    # not found after a whole search (or never: strict JSON writes none of them).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ExpertRef(_Frozen):
    """One expert: a local folder, or a Hub repo at an optional revision.

    Written in a recipe as ``./experts/add``, ``org/name``, ``org/name@v1.0`` or
    ``{model: org/name, revision: 3f2c1d0}``.
    """

    model: str
    revision: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not looks_local(value) and "@" in value:
                model, revision = value.rsplit("@", 1)
                return {"model": model, "revision": revision}
            return {"model": value}
        return value

    @field_validator("model")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("an expert's model is empty; give a folder or a Hub repo id")
        return value

    @property
    def is_local(self) -> bool:
        # Decided by the name alone, never by what the current directory holds: a
        # Hub id ``org/name`` stays a Hub id even where a folder ``org/name`` exists
        # (load_recipe has already made the recipe's own relative folders absolute).
        return looks_local(self.model)

    def __str__(self) -> str:
        return self.model + (f"@{self.revision}" if self.revision else "")


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or not _REPO_ID.match(path)


class Objective(_Frozen):
    """The utility the swarm maximises, scored on a JSONL dev set."""

    type: Literal[OBJECTIVE_TYPES]  # (one list: objectives.OBJECTIVES has each one but custom)
    dev: Optional[str] = None  # a JSONL file (every type but lm_eval)
    test: Optional[str] = None
    max_new_tokens: int = Field(8, ge=1, le=4096)
    batch_size: int = Field(32, ge=1, le=65536)
    # exact_match: how the stripped greedy completion is compared with the answer.
    match: Literal["exact", "prefix", "contains"] = "prefix"
    # Rows carrying this field get per-group scores in the report.
    group_by: Optional[str] = "task"
    # Wrap prompts in the tokenizer's chat template before scoring.
    chat_template: bool = False
    # In an `objectives:` list: the component's label (default: its dev file's name) and its weight.
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    weight: float = Field(1.0, gt=0, le=1e6)
    # type reward: the reward model (AutoModelForSequenceClassification, one output), a folder or Hub repo.
    reward_model: Optional[ExpertRef] = None

    # type judge: the judge (a causal LM, folder or Hub repo), the rubric it rates each response
    # with ({prompt} and {response} are filled in), and the rating scale.
    judge_model: Optional[ExpertRef] = None
    rubric: Optional[str] = Field(None, min_length=1, max_length=20_000)
    scale: Tuple[int, int] = (1, 10)

    # type lm_eval: an lm-evaluation-harness task searched on (task) and reported on (test_task),
    # task YAML files in include_path (a folder), the metric to maximise ("acc", or "acc,none").
    task: Optional[str] = Field(None, min_length=1, max_length=200)
    test_task: Optional[str] = Field(None, min_length=1, max_length=200)
    include_path: Optional[str] = None
    metric: str = Field("acc", min_length=1, max_length=100)
    num_fewshot: Optional[int] = Field(None, ge=0, le=1000)
    limit: Optional[int] = Field(None, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _data(self) -> "Objective":
        if self.type == "lm_eval":
            if not self.task or self.dev or self.test:
                raise ValueError("objective type lm_eval takes its data from lm-evaluation-harness tasks: give task: "
                                 "(searched on) and optionally test_task:, not dev:/test: files")
        else:
            if not self.dev:
                raise ValueError(f"objective type {self.type} needs dev: a JSONL file")
            extra = [k for k in ("task", "test_task", "include_path", "num_fewshot", "limit") if getattr(self, k)]
            if extra:
                raise ValueError(f"{extra[0]} applies to type: lm_eval, not {self.type}; drop it")
        return self

    @model_validator(mode="after")
    def _models(self) -> "Objective":
        for kind, key in (("reward", "reward_model"), ("judge", "judge_model")):
            if self.type == kind and getattr(self, key) is None:
                raise ValueError(f"objective type {kind} needs {key}: a folder or Hub repo (org/name@revision)")
            if self.type != kind and getattr(self, key) is not None:
                raise ValueError(f"{key} applies to type: {kind}, not {self.type}; drop it")
        if self.type == "judge":
            if not self.rubric or "{response}" not in self.rubric:
                raise ValueError("objective type judge needs rubric: a text with {response} (and usually {prompt}) "
                                 "that asks the judge for a rating")
            low, high = self.scale
            if not 0 <= low < high <= 100:
                raise ValueError(f"scale {list(self.scale)} must be [low, high] with 0 <= low < high <= 100")
        elif self.rubric is not None:
            raise ValueError(f"rubric applies to type: judge, not {self.type}; drop it")
        return self

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        code = [k for k in _CODE_KEYS if isinstance(value, dict) and k in value]
        if code:
            raise ValueError(f"objective key {code[0]!r} would name Python code, which a recipe never can (a recipe "
                             "from the Hub or a pull request must not run code); use type: custom and pass "
                             "--objective-code path.py:function on the command line")
        if isinstance(value, dict) and "type" in value and value["type"] not in OBJECTIVE_TYPES:
            raise ValueError(
                f"objective type {short_repr(value['type'])} does not exist; use one of: {', '.join(OBJECTIVE_TYPES)}"
            )
        return value


class SwarmSettings(_Frozen):
    """Model Swarms hyperparameters (see ../shared/docs/model-swarms.md).

    Defaults follow the paper's run scripts where they differ from the official
    code's argparse defaults.
    """

    # Upper bounds are generous: past them a value is a typo, and would overflow
    # positions or the patience counts long after the run started.
    size: int = Field(10, ge=2, le=10_000, description="particles: the experts, the soup, then children")
    granularity: Literal["model", "layer"] = "model"
    # layer granularity: number of contiguous layer groups (null: one per layer).
    layer_groups: Optional[int] = Field(None, ge=1, le=100_000)
    inertia: float = Field(0.2, ge=0, le=1e6)
    cognitive: float = Field(0.3, ge=0, le=1e6)
    social: float = Field(0.4, ge=0, le=1e6)
    repel: float = Field(0.05, ge=0, le=1e6)
    step_length: float = Field(0.5, gt=0, le=100)
    step_length_decay: float = Field(0.95, gt=0, le=1)
    min_step_length: float = Field(0.1, ge=0, le=100)
    patience: int = Field(10, ge=1, le=1_000_000)
    restart_patience: float = Field(0.67, gt=0, le=1_000_000)
    # With the default stop: budget a run spends size * (1 + max_iterations) evaluations: 20 keeps an
    # unset recipe near what the patience stop used to spend (the official code's 200 is a hard cap there).
    max_iterations: int = Field(20, ge=0, le=1_000_000)
    drop_k: float = Field(0.0, ge=0, le=1)
    drop_n: float = Field(0.0, ge=0, le=1)
    init_velocity: Literal["random", "zero", "best"] = "random"
    # LoRA experts: combine the A and B factors (the paper's code) or the deltas s*B*A (task vectors).
    lora_space: Literal["factors", "delta"] = "factors"
    seed_soup: bool = True
    # The initial children: around the uniform soup ("soup", soup + N(0, init_spread) per coefficient, re-centred
    # to sum 1) or the paper's random inter/extrapolations of pairs ("paper"). bench/bench_selection.py (issue 12):
    # "soup" wins on held-out rows; init: paper with seed_soup: false is the paper exactly.
    init: Literal["soup", "paper"] = "soup"
    init_spread: float = Field(0.3, gt=0, le=100)
    # Levers beyond the paper (swarm_merge/swarm.py; measured in bench/RESULTS.md, "Swarm against CMA-ES").
    # Paper values: anchors false, update paper, stop patience, racing false, surrogate off, explore_after 0,
    # scouts 0, average_top 1 (with init: paper, seed_soup: false: the paper).
    # anchors: the experts are scored once and stay put (they set the global best and worst); the soup and
    # children move. update spso: SPSO-2011 constants, a random weight per coefficient, no normaliser, no
    # restarts (inertia, cognitive, social, repel, step_length* and restart_patience are then unused).
    # stop budget: no patience stop; spend size * (1 + max_iterations) evaluations, the experts' included.
    anchors: bool = True
    update: Literal["paper", "spso"] = "spso"
    stop: Literal["patience", "budget"] = "budget"
    # Racing (swarm_merge/racing.py): a moving particle is scored on race_slice of the dev rows first, then
    # twice that, ... up to half, then half the rows left, ... (0.125: 1/8, 1/4, 1/2, 3/4, 7/8, all), and finished only if
    # it may still beat the global best (dropped when its paired estimate is below it at race_confidence).
    # auto: on where the objective's utility is a mean over rows (not lm_eval or custom).
    # local_search (update spso only, GCPSO): each iteration one moving particle samples around the global best,
    # x = g + w v + rho (1 - 2 r), rho (first init_spread) widened by 1.5 after a move that improved g and
    # narrowed by 1.5^(1/4) after one that did not (the 1/5 success rule). "holder": the particle whose personal
    # best is the global best (none while an expert holds it); "best": the one with the best personal best.
    local_search: Literal["off", "best", "holder"] = "off"
    # anchor_velocity (anchors only; 0 turns it off): the moving particles start with anchor_velocity * d added
    # to their velocities, d_k = (s_k - mean_k s) / (max - min of the initial swarm's scores), s_k expert k's dev
    # score: a start towards the experts that score well and away from a weak one. bench/RESULTS.md ("The
    # experts' scores as a first velocity"): over ten seeds +0.051 dev / +0.064 test on bench2, -0.007 / -0.017
    # on the demo (whose experts score alike, so d is small there).
    anchor_velocity: float = Field(0.3, ge=0, le=1e6)
    # surrogate "gp": each iteration the moving particle with the worst personal best goes where a Gaussian
    # process fitted to every position scored so far puts its upper confidence bound, among candidates around
    # the global best (swarm.surrogate_point). bench/RESULTS.md ("A Gaussian-process surrogate as one particle"):
    # over ten seeds +0.032 dev / +0.024 test on bench2, +0.014 / 0.000 on the demo. With one group its kernel
    # has a length scale per expert once 4 positions per expert are scored (swarm.gp_lengths; "A length scale
    # per expert, on new seeds"). "off": SPSO moves it.
    surrogate: Literal["off", "gp"] = "gp"
    # explore_after N (0: off, the paper): once the global best has not moved for N iterations, the moving
    # particle with the worst personal best that the surrogate did not take goes to a fresh draw of the initial
    # children (the soup plus N(0, init_spread)); its velocity is the jump. A swarm of four moving particles
    # collapses onto its first good plateau (demo seeds 52 and 59 stopped at dev 0.514 and 0.486); a raced
    # fresh draw that scores badly costs only its slice. "auto": 3 with granularity model, 0 with layer groups.
    # bench/RESULTS.md ("Exploring once the global best stalls"), N = 3: dev / test +0.004 / +0.007 on the demo
    # (20 seeds), 0.000 / -0.003 on bench2 (10), +0.012 / +0.018 on bench8 (10), level on the single task (10),
    # fewer dev rows on each; but -0.030 / -0.042 on the 24-dimension layer bench (6), where fresh draws (random
    # search) are far worse than the swarm's moves.
    explore_after: Union[StrictInt, Literal["auto"]] = "auto"
    # scouts N (0: none, the paper): N more draws of the initial children, scored with the initial swarm; they
    # set the global best and join the surrogate's data but never move, and they count in the budget. Four
    # moving particles see only the soup and three children at the start; where the best merges are near the soup
    # and the experts are weak, the swarm followed the best expert's corner onto a lower plateau at 3 of 10
    # bench4 seeds. "auto": a ninth of the budget (8 of 72 evaluations) with granularity model, 0 with layer
    # groups. bench/RESULTS.md ("Scouts"), dev / test against scouts 0: bench4 +0.014 / +0.018 (10 seeds; below
    # uniform test at 1, was 3), demo 0.000 / +0.018 (20), bench8 +0.008 / +0.011, bench2 -0.007 / +0.003, bench3
    # 0.000 / +0.002, single task 0.000 / -0.008 (10 each); 1-5 % more dev rows (the scouts are not raced).
    scouts: Union[StrictInt, Literal["auto"]] = "auto"
    # average_top (1: off, the paper's winner, the global best): after the search, an average of the positions
    # scored on every dev row is scored on every row and written instead of the global best, unless the global
    # best beats it by more than one standard error of their paired row differences (without per-row scores:
    # unless it scores higher). The best of a few dozen noisy dev scores sits above its true value (the winner's
    # curse); an average of the best few is a merge the search did not select on its own noise.
    # "bag" (bagging the argmax): each position weighted by how often it is the best on 1000 bootstrap draws of
    # the dev rows, so the positions the rows cannot tell apart share the weight and a clear best keeps it all
    # (racing.Race.bagged); without per-row scores (lm_eval, custom) the top 5. An integer K: the
    # mean of the K best. bench/RESULTS.md ("Bagging the argmax"): dev / test against K = 5, +0.006 / +0.006 on
    # the demo (20 seeds), +0.001 / 0.000 on bench2 (20), -0.002 / +0.002 on the 24-dimension layer bench (6).
    average_top: Union[Literal["bag"], StrictInt] = "bag"
    racing: Union[bool, Literal["auto"]] = "auto"
    # race_slice "auto" (the default since 2026-12-06): 0.125 with granularity model (with race_neighbours 4: the
    # stages 1/8, the contested rows, then 1/4, 1/2, 3/4, 7/8, all), 0.25 with layer groups (1/4, 1/2, 3/4, all: on
    # the 24-dimension layer bench the cheaper race lost -0.018 of test over six seeds). bench/RESULTS.md
    # ("Contested rows after a slice of 1/8"), against the default before (1/4, no neighbours), dev / test over
    # twenty seeds: demo +0.009 / +0.006 at 63 % of an unraced run's dev rows (was 70 %), bench2 +0.001 / +0.006 at
    # 58 % (76 %), bench8 +0.015 / +0.017 (10 seeds) at 61 % (67 %), the single task 0.000 / +0.002 at 75 % (82 %);
    # bench4 -0.004 / -0.005 (10) at 61 % (76 %). With race_confidence 0.8 too (45 % of the rows) the demo and
    # bench2 lose 0.010 / 0.015 of test ("A cheaper race at the default's 73 evaluations").
    race_slice: Union[float, Literal["auto"]] = "auto"
    # race_confidence 0.8 (bench/RESULTS.md, "Racing at 0.8", measured with the stages before the three-quarter one):
    # over ten seeds on the demo and bench2, 59 % and 68 % of the dev rows instead of 73 % and 82 %, test level; but on
    # the 24-dimension layer bench (3 seeds) and bench8 (5) it lost test accuracy (-0.095, -0.013), so 0.95 stays the
    # default (with the three-quarter stage: 72 % and 77 %, "A stage at three quarters").
    race_confidence: float = Field(0.95, gt=0.5, lt=1)
    # race_gain "row" (0/1 row scores: exact match, multiple choice): finish a particle only if it may beat the
    # global best by a whole row, the least that changes the winner (it must be strictly better), so a tie on
    # the rows seen is dropped. With race_confidence 0.8, over ten seeds, demo / bench2: 43 % / 38 % of the dev rows,
    # test 0.012 / 0.002 below no racing (bench/RESULTS.md, "Racing at 0.8").
    race_gain: Literal["any", "row"] = "any"
    # race_neighbours K (0: off, the stages alone): after the slice a particle is scored on the rows where one of
    # the K positions scored on every row nearest it gives another answer than the global best (its contested
    # rows), then on the later stages' other rows, and the race estimates the two strata apart: where the
    # neighbours agree with the global best the particle rarely differs, so the settled rows add little
    # uncertainty. Where over half the rows are contested (far neighbours, 24 dimensions) the plain stages run.
    # "auto" (the default since 2026-12-06): 4 with granularity model (with race_slice 0.125: see race_slice), 0 with
    # layer groups, where the neighbours are far and the race lost test ("Racing on the rows the neighbours contest").
    race_neighbours: Union[StrictInt, Literal["auto"]] = "auto"
    seed: int = Field(42, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _check(self) -> "SwarmSettings":
        if self.inertia + self.cognitive + self.social + self.repel <= 0:
            raise ValueError(
                "swarm.inertia + cognitive + social + repel must be > 0 (the velocity update divides by it)"
            )
        if self.drop_k >= 1:
            raise ValueError("swarm.drop_k must be < 1: with drop_k 1 no particle is ever evaluated")
        if not isinstance(self.explore_after, str) and not 0 <= self.explore_after <= 1_000_000:
            raise ValueError("swarm.explore_after must be auto or an iteration count from 0 (off) to 1000000")
        if not isinstance(self.scouts, str) and not 0 <= self.scouts <= self.size * self.max_iterations:
            raise ValueError(f"swarm.scouts must be auto or a count from 0 to size * max_iterations "
                             f"({self.size * self.max_iterations}): scouts are spent from the iterations' evaluations")
        if not isinstance(self.race_slice, str) and not 0 < self.race_slice < 1:
            raise ValueError("swarm.race_slice must be auto or a share of the dev rows between 0 and 1 (e.g. 0.25)")
        if not isinstance(self.race_neighbours, str) and not 0 <= self.race_neighbours <= 1000:
            raise ValueError("swarm.race_neighbours must be auto or a count of positions from 0 (off) to 1000")
        if not isinstance(self.average_top, str) and not 1 <= self.average_top <= 1000:
            raise ValueError("swarm.average_top must be bag or a number of positions from 1 (off) to 1000")
        if self.layer_groups is not None and self.granularity != "layer":
            raise ValueError("swarm.layer_groups needs swarm.granularity: layer")
        return self


class OutputSettings(_Frozen):
    dir: Optional[str] = None
    push_to_hub: Optional[str] = None
    private: bool = True
    # LoRA experts: also write the base with the winning adapter merged in, to <out>/merged.
    merge_adapter: bool = False

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, value: Optional[str]) -> Optional[str]:
        # Checked here, not after an hours-long search.
        if value is not None and not re.fullmatch(r"[\w.\-]+/[\w.\-]+", value):
            raise ValueError(f"{value!r} is not a Hub repo id; write org/name (no revision)")
        return value


class Recipe(_Frozen):
    """A whole swarm-merge recipe."""

    name: str = Field("swarm-merge", min_length=1)
    experts: List[ExpertRef]
    base_model: Optional[ExpertRef] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Pickled *.bin weights can run code when unpickled; they are refused unless
    # the recipe opts in, and even then read with torch's weights_only loader
    # and converted to safetensors before use.
    allow_pickle: bool = False
    # One objective, or several (`objectives:`) combined by `combine` (the paper's multi-task setting).
    objective: Optional[Objective] = None
    objectives: Optional[List[Objective]] = None
    combine: Literal["mean", "harmonic"] = "mean"
    swarm: SwarmSettings = SwarmSettings()
    output: OutputSettings = OutputSettings()
    # The folder relative input paths were resolved against (None: as given).
    _base_dir: Optional[Path] = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"name {short_repr(value)} is not a plain name; use letters, digits, '-', '_' and '.' "
                "(at most 96, starting with a letter or digit): it names the output folder out/<name>"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.objective is None and self.objectives is None:
            raise ValueError("missing key 'objective'; add it to the recipe (or an objectives: list, combined by "
                             "`combine`)")
        if self.objective is not None and self.objectives is not None:
            raise ValueError("the recipe gives both objective: and objectives:; keep one (a list of several goes "
                             "under objectives:)")
        if self.objectives is not None:
            if len(self.objectives) < 2:
                raise ValueError("objectives: lists one objective; write it as objective: instead")
            names = [o.name for o in self.components]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"two objectives are named {sorted(dup)[0]!r}; give each a distinct name:")
            if self.combine == "harmonic":
                bad = next((o for o in self.objectives if o.type not in ("exact_match", "multiple_choice", "judge")
                            or (o.type == "judge" and o.scale[0] <= 0)), None)
                if bad is not None:
                    raise ValueError(f"combine: harmonic needs positive utilities, and objective {bad.name or bad.dev!r} "
                                     f"is {bad.type} (may be negative); use combine: mean, or accuracy objectives")
        elif self.combine != "mean":
            raise ValueError("combine applies to an objectives: list; drop it or list several objectives")
        k = len(self.experts)
        if k < 2:
            raise ValueError(f"experts lists {k}; a swarm needs two or more experts")
        names = [str(e) for e in self.experts]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"expert {sorted(dup)[0]!r} is listed twice; list each expert once")
        need = k + (1 if self.swarm.seed_soup else 0)
        if self.swarm.size < need:
            raise ValueError(
                f"swarm.size is {self.swarm.size} but {k} experts"
                + (" plus the soup" if self.swarm.seed_soup else "")
                + f" need {need}; set swarm.size >= {need}"
            )
        return self

    @property
    def utility_name(self) -> str:
        """The utility's label: the objective's type, or e.g. "harmonic of add (exact_match), words (exact_match)"."""
        if self.objectives is None:
            return self.objective.type
        return f"{self.combine} of " + ", ".join(f"{o.name} ({o.type})" for o in self.components)

    @property
    def components(self) -> List[Objective]:
        """The objectives scored, each named (a single objective is one component)."""
        if self.objectives is None:
            return [self.objective]
        return [o if o.name else o.model_copy(update={
            "name": re.sub(r"[^A-Za-z0-9._-]", "_", Path(o.dev).stem if o.dev else o.task)[:64] or f"objective{i}"})
                for i, o in enumerate(self.objectives)]

    @property
    def output_dir(self) -> str:
        return self.output.dir or os.path.join("out", self.name)

    @property
    def base_dir(self) -> Optional[Path]:
        """The recipe file's folder (input paths were resolved against it), if loaded from a file."""
        return self._base_dir

    def local_inputs(self) -> List[tuple]:
        """``(label, path)`` of every local input: expert and base folders, data files."""
        found = [(f"the expert {e.model!r}", e.model) for e in self.experts if e.is_local]
        if self.base_model is not None and self.base_model.is_local:
            found.append((f"the base model {self.base_model.model!r}", self.base_model.model))
        found += [(f"the {k} data file", v) for o in self.components for k, v in (("dev", o.dev), ("test", o.test)) if v]
        found += [("the lm-eval task folder", o.include_path) for o in self.components if o.include_path]
        found += [(f"the {key.replace('_', ' ')} {getattr(o, key).model!r}", getattr(o, key).model)
                  for o in self.components for key in ("reward_model", "judge_model")
                  if getattr(o, key) is not None and getattr(o, key).is_local]
        return found

    def portable(self) -> "Recipe":
        """This recipe with local paths relative to its folder (``./experts/add``), for
        what a run publishes: the report and the card carry no absolute local path."""
        base = self._base_dir
        if base is None:
            return self

        def rel(path: str) -> str:
            return portable_path(path, base)

        data = self.model_dump(mode="json")
        for ref in data["experts"] + ([data["base_model"]] if data.get("base_model") else []):
            if ExpertRef.model_validate(ref).is_local:
                ref["model"] = rel(ref["model"])
        for objective in [data["objective"]] if data.get("objective") else data["objectives"]:
            for key in ("dev", "test"):
                if objective.get(key):
                    objective[key] = rel(objective[key])
            for key in ("reward_model", "judge_model"):
                ref = objective.get(key)
                if ref and ExpertRef.model_validate(ref).is_local:
                    ref["model"] = rel(ref["model"])
            if objective.get("include_path"):
                objective["include_path"] = rel(objective["include_path"])
        if data["output"].get("dir") and os.path.isabs(os.path.expanduser(data["output"]["dir"])):
            data["output"]["dir"] = None  # where it ran here; relative ones (to the cwd) stay as written
        return Recipe.model_validate(data)

    def as_written(self, pins: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """The recipe as its author wrote it, for the card: only the keys set (in the file or by
        ``--set``/``--seed``), never the defaults, local paths as in :meth:`portable`, and each model
        written ``org/name@<commit>``, its revision replaced by the commit it resolved to
        (``pins``: Hub repo id -> commit) so the block reruns on the same weights."""
        pins = pins or {}
        full = self.portable().model_dump(mode="json")

        def pick(written: Any, value: Any) -> Any:
            if isinstance(value, dict) and set(value) == {"model", "revision"}:  # an ExpertRef
                ref = ExpertRef.model_validate(value)
                return str(ref if ref.is_local else ref.model_copy(update={"revision": pins.get(ref.model,
                                                                                                ref.revision)}))
            if isinstance(written, dict) and isinstance(value, dict):
                return {k: pick(w, value[k]) for k, w in written.items()}
            if isinstance(written, list) and isinstance(value, list) and len(written) == len(value):
                return [pick(w, v) for w, v in zip(written, value)]
            return value

        return pick(self.model_dump(mode="json", exclude_unset=True), full)


# --------------------------------------------------------------------- loading


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to raw recipe data."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r} is not key.path=value; write e.g. --set swarm.size=8")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise RecipeError(f"--set {item!r} has an empty key; write e.g. --set swarm.size=8")
        try:
            value = bounded_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise RecipeError(f"--set {path}: the value is nested too deeply; give a plain value") from None
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise RecipeError(f"--set {path}: index {key!r} is not in the list (0..{len(node) - 1})")
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    if not isinstance(node.get(key), (dict, list)):
                        node[key] = {}
                    node = node[key]
            else:
                raise RecipeError(f"--set {path}: {'.'.join(keys[:i])} is not a mapping")
    return data


def load_recipe(path: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe file.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings applied before validation.

    Raises:
        RecipeError: with a one-line message naming the problem and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file {str(path)!r} not found; check the path")
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} is not a regular file; give the recipe's YAML file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {str(path)!r} is over {MAX_RECIPE_BYTES} bytes; a recipe is a short YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        data = bounded_yaml(text)
    except RecursionError:
        raise RecipeError(f"{path}: the YAML is nested too deeply; a recipe is a few levels of keys") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}:{where}: YAML syntax error: {problem}; fix the YAML there") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, experts:, objective:, ...), not a {type(data).__name__}")
    data = apply_overrides(data, overrides)
    return parse_recipe(data, base_dir=path.resolve().parent, source=str(path))


MAX_DEPTH = 32  # a recipe is a few levels deep; far deeper nesting is an attack on the parser


class _BoundedLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing more than MAX_ALIASES alias uses, nesting deeper than
    MAX_DEPTH, and a key given twice in one mapping (PyYAML keeps the last silently, so
    a reviewer reading the first would be misled)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {MAX_ALIASES} YAML aliases (*name); write the values out", mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep; a recipe is a few levels of keys", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {short_repr(key)} appears twice in one mapping; keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def bounded_yaml(text: str) -> Any:
    """``text`` parsed as load_recipe parses a recipe (safe, bounded; see _BoundedLoader)."""
    return yaml.load(text, Loader=_BoundedLoader)


def parse_recipe(data: dict, *, base_dir: Union[str, os.PathLike, None] = None, source: str = "recipe") -> Recipe:
    """Validate raw recipe data; relative input paths resolve against ``base_dir``."""
    if base_dir is not None:
        data = _resolve_inputs(data, Path(base_dir))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_describe(exc)}") from None
    if base_dir is not None:
        recipe._base_dir = Path(base_dir).resolve()
    return recipe


def _resolve_inputs(data: dict, base: Path) -> dict:  # noqa: C901 (one case per input field)
    data = dict(data)

    def resolve_expert(ref: Any) -> Any:
        model = ref.get("model") if isinstance(ref, dict) else ref
        if not isinstance(model, str) or not model:
            return ref
        if os.path.isabs(model) or model.startswith("~"):
            local = Path(model).expanduser()
        else:
            local = base / model
            if not (looks_local(model) or local.is_dir()):
                return ref  # a Hub repo id
        if isinstance(ref, dict):
            return {**ref, "model": str(local.resolve())}
        return str(local.resolve())

    if isinstance(data.get("experts"), list):
        data["experts"] = [resolve_expert(e) for e in data["experts"]]
    if data.get("base_model") is not None:
        data["base_model"] = resolve_expert(data["base_model"])
    def resolve_data(objective: Any) -> Any:
        if not isinstance(objective, dict):
            return objective
        objective = dict(objective)
        for key in ("dev", "test"):
            value = objective.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                objective[key] = str((base / value).resolve())
        for key in ("reward_model", "judge_model"):
            if objective.get(key) is not None:
                objective[key] = resolve_expert(objective[key])
        value = objective.get("include_path")
        if isinstance(value, str) and value and not os.path.isabs(value):
            objective["include_path"] = str((base / value).resolve())
        return objective

    if "objective" in data:
        data["objective"] = resolve_data(data["objective"])
    if isinstance(data.get("objectives"), list):
        data["objectives"] = [resolve_data(o) for o in data["objectives"]]
    return data


def _describe(exc: ValidationError) -> str:
    """One line for the first validation error, with a did-you-mean for unknown keys."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        guess = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean {guess[0]!r}?" if guess else f"valid keys: {', '.join(valid)}"
        return f"unknown key {where!r}; {hint}"
    if err["type"] == "missing":
        return f"missing key {where!r}; add it to the recipe"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not where:
        return msg
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {short_repr(value)})"
    return f"{where}: {msg}{shown}"


def _fields_at(loc: List[str]) -> List[str]:
    model: Any = Recipe
    for part in loc:
        if part.isdigit():
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", ()) + (annotation,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
            inner = getattr(candidate, "__args__", ())
            found = [c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)]
            if found:
                model = found[0]
                break
    return list(getattr(model, "model_fields", {}))
