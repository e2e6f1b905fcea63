"""Never score a silently random model; never score or write non-finite weights.

- A tensor the architecture needs (built from config.json on the meta device,
  less tied and non-persistent ones) that a checkpoint lacks is bad input:
  transformers would fill it with random values and the run would go on. For
  experts, the LoRA base, reward models and judges; in dry runs too.
- Weights are finite in the dtype they are built in: an expert the recipe's
  dtype cannot hold is refused; a particle whose built weights overflow, or
  whose logits are NaN or inf, scores NaN (not 0) and the search goes on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from swarm_merge import cli, evaluate, experts as experts_mod, lora, objectives, report as report_mod
from swarm_merge.errors import InputError
from swarm_merge.recipe import ExpertRef, Objective

SMALL_RUN = ["--set", "swarm.max_iterations=1", "--set", "swarm.size=4", "--no-progress"]


def copies(paths, root: Path):
    root.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copytree(p, root / Path(p).name)) for p in paths]


def edit(folder: Path, change) -> None:
    """Rewrite ``folder``'s model.safetensors with ``change(tensors)`` applied."""
    file = Path(folder) / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def strip(folder: Path, name: str) -> None:
    edit(folder, lambda t: t.pop(name))


def run(capsys, args) -> int:
    """The CLI in process, its stderr from here on (not the models built before it)."""
    capsys.readouterr()
    return cli.main([str(a) for a in args])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.glob("*.safetensors")) and not (out / "swarm.json").exists()


# ------------------------------------------------ tensors the architecture needs


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("which", ["one", "all"])
def test_an_expert_without_lm_head_is_refused(which, dry_run, tiny_experts, tmp_path, capsys):
    experts = copies(tiny_experts, tmp_path / "experts")  # untied: lm_head is its own tensor
    lacking = experts[1:2] if which == "one" else experts
    for p in lacking:
        strip(p, "lm_head.weight")
    recipe = tiny.write_recipe(tmp_path, experts)
    assert run(capsys, [recipe, *SMALL_RUN] + (["--dry-run"] if dry_run else [])) == 2
    line = one_line(capsys)
    # The first expert pulled that lacks it, the tensor, and why it matters.
    assert str(lacking[0]) in line and "'lm_head.weight'" in line and "needs" in line and "random" in line, line
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_lora_base_without_a_tensor_is_refused(dry_run, tmp_path, capsys):
    base = tiny.make_base(tmp_path)
    adapters = tiny.make_adapters(tmp_path / "adapters", base, 2)
    strip(base, "model.norm.weight")
    recipe = tiny.write_recipe(tmp_path, adapters, f"base_model: {base}\n")
    assert run(capsys, [recipe, *SMALL_RUN] + (["--dry-run"] if dry_run else [])) == 2
    line = one_line(capsys)
    assert str(base) in line and "'model.norm.weight'" in line and "needs" in line, line
    assert nothing_written(tmp_path / "out")


def test_a_hub_experts_headers_are_checked_in_a_dry_run(tiny_experts, tmp_path):
    """A dry run reads a Hub expert's safetensors headers (ranged reads), and refuses it from them."""
    import os
    import subprocess
    import sys

    from hub_server import HubServer

    home = tmp_path / "home"
    with HubServer(valid_tokens=("hf_guardtoken",)) as hub:
        for i, folder in enumerate(copies(tiny_experts[:2], tmp_path / "headless")):
            strip(folder, "lm_head.weight")  # both alike: compatible with each other
            hub.add_repo(f"org/headless-{i}", {p.name: p for p in folder.iterdir() if p.is_file()})
        recipe = tiny.write_recipe(tmp_path, ["org/headless-0", "org/headless-1"])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_TOKEN="hf_guardtoken",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        proc = subprocess.run([sys.executable, "-m", "swarm_merge.cli", str(recipe), "--dry-run"], env=env,
                              capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mergekit-swarm: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "org/headless-0" in errors[0] and "'lm_head.weight'" in errors[0], errors[0]
    assert not list(home.rglob("*.safetensors"))  # found from the headers: no weights downloaded


def test_a_checkpoint_whose_shapes_do_not_fit_its_config_is_refused(tiny_experts, tmp_path, capsys):
    experts = copies(tiny_experts, tmp_path / "experts")
    for p in experts:  # every expert alike, so they are compatible with each other
        config = json.loads((p / "config.json").read_text())
        config["intermediate_size"] = 48
        (p / "config.json").write_text(json.dumps(config))
    recipe = tiny.write_recipe(tmp_path, experts)
    assert run(capsys, [recipe, *SMALL_RUN, "--dry-run"]) == 2
    line = one_line(capsys)
    assert "mlp" in line and "[48, 32]" in line and str(experts[0]) in line, line


def test_tied_and_complete_checkpoints_pass(tmp_path):
    """The tiny models (tied and untied) and the demo's SmolLM2 experts (tied; no lm_head stored)."""
    tied = tiny.make_experts(tmp_path / "tied", 1, tie=True)[0]
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))
    untied = tiny.make_experts(tmp_path / "untied", 1)[0]
    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "models" / "add"
    for path in [tied, untied] + ([demo] if (demo / "model.safetensors").is_file() else []):
        experts_mod.pull_expert(ExpertRef(model=str(path)))


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return tiny.make_reward_model(tmp_path_factory.mktemp("reward"))


RUBRIC = "Question: {prompt}\nAnswer: {response}\nHow good is the answer, 1 to 3? Rating:"


def objective_recipe(tmp_path, experts, objective: str) -> Path:
    tiny.write_jsonl(tmp_path / "data" / "dev.jsonl", [{"prompt": f"{a}+{a}="} for a in range(4)])
    lines = "\n".join(f"  - {p}" for p in experts)
    path = tmp_path / "recipe.yml"
    path.write_text(f"name: guard\nexperts:\n{lines}\nobjective: {objective}\n"
                    f"swarm: {{size: 4, max_iterations: 1}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    return path


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_reward_model_without_its_score_head_is_refused(dry_run, reward_model, tiny_experts, tmp_path, capsys):
    rm = copies([reward_model], tmp_path / "rm")[0]
    strip(rm, "score.weight")
    recipe = objective_recipe(tmp_path, tiny_experts, f"{{type: reward, dev: data/dev.jsonl, reward_model: {rm}, "
                                                      "max_new_tokens: 3}")
    assert run(capsys, [recipe, "--no-progress"] + (["--dry-run"] if dry_run else [])) == 2
    line = one_line(capsys)
    assert "reward model" in line and str(rm) in line and "'score.weight'" in line, line
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_judge_without_lm_head_is_refused(dry_run, tiny_experts, tmp_path, capsys):
    judge = tiny.make_base(tmp_path, name="judge")  # untied
    strip(judge, "lm_head.weight")
    recipe = objective_recipe(tmp_path, tiny_experts, f"{{type: judge, dev: data/dev.jsonl, judge_model: {judge}, "
                                                      f"rubric: {json.dumps(RUBRIC)}, scale: [1, 3], max_new_tokens: 3}}")
    assert run(capsys, [recipe, "--no-progress"] + (["--dry-run"] if dry_run else [])) == 2
    line = one_line(capsys)
    assert "judge model" in line and str(judge) in line and "'lm_head.weight'" in line, line
    assert nothing_written(tmp_path / "out")


def test_objective_models_refuse_what_transformers_reports_missing(reward_model, tmp_path):
    """The load itself refuses missing keys (transformers' loading info), whatever checked the folder before."""
    rm = copies([reward_model], tmp_path / "rm")[0]
    strip(rm, "score.weight")
    judge = tiny.make_base(tmp_path, name="judge")
    strip(judge, "lm_head.weight")
    try:
        with pytest.raises(InputError, match="score.weight"):
            objectives.reward_model(str(rm), "cpu")
        with pytest.raises(InputError, match="lm_head.weight"):
            objectives.judge_model(str(judge), "cpu")
    finally:
        objectives.judges._OBJECTIVE_MODELS.clear()


# ----------------------------------------------------------- finite weights


@pytest.mark.parametrize("mode", ["in-memory", "one-model", "streaming"])
def test_an_expert_past_float16s_range_is_refused(mode, tiny_experts, tmp_path, capsys):
    experts = copies(tiny_experts, tmp_path / "experts")
    edit(experts[2], lambda t: t["model.layers.0.mlp.down_proj.weight"].view(-1).__setitem__(5, 1e5))
    recipe = tiny.write_recipe(tmp_path, experts, "dtype: float16\n", objective="exact_match")
    assert run(capsys, [recipe, *SMALL_RUN, "--eval-mode", mode]) == 2
    line = one_line(capsys)
    assert str(experts[2]) in line and "'model.layers.0.mlp.down_proj.weight'" in line and "float16" in line, line
    assert nothing_written(tmp_path / "out")


def unused_token(paths) -> int:
    """A token id no dev/test row of tiny.write_recipe uses (its embedding row never reaches a logit)."""
    tok = tiny.make_tokenizer()
    used = set()
    for rows in (tiny.arithmetic_rows(12), tiny.arithmetic_rows(12, offset=5)):
        for row in rows:
            used.update(tok(row["prompt"] + row["answer"])["input_ids"])
    return max(set(range(len(tok))) - used)


def plant(experts, values, row: int) -> None:
    """Expert k's embedding of token ``row`` gets ``values[k]`` in its first element: finite in
    float16 in every expert, but an extrapolating combination overflows it."""
    for path, value in zip(experts, values):
        edit(path, lambda t, v=value: t["model.embed_tokens.weight"][row].__setitem__(0, v))


@pytest.mark.parametrize("mode", ["in-memory", "one-model", "streaming"])
def test_a_particle_whose_weights_overflow_scores_nan(mode, tiny_experts, tmp_path):
    experts = copies(tiny_experts, tmp_path / "experts")
    plant(experts, [4e4, -4e4, 0.0], unused_token(experts))
    tiny.write_jsonl(tmp_path / "dev.jsonl", tiny.arithmetic_rows(6))
    objective = Objective.model_validate({"type": "loglik", "dev": str(tmp_path / "dev.jsonl")})
    rows = objectives.load_examples(str(tmp_path / "dev.jsonl"), "loglik")
    pulled = experts_mod.pull_experts([ExpertRef(model=str(p)) for p in experts])
    evaluator = evaluate.make_evaluator(mode, pulled, {n: 0 for n in pulled[0].tensors}, dtype="float16",
                                        device=torch.device("cpu"))
    # 2 * 4e4 + 4e4 = 1.2e5 > 65504: inf in float16, in a row no logit reads (the scores alone look fine).
    assert np.isnan(evaluator.evaluate(np.array([[2.0, -1.0, 0.0]]), rows, objective).utility)
    assert np.isfinite(evaluator.evaluate(np.array([[1.0, 0.0, 0.0]]), rows, objective).utility)
    assert np.isnan(evaluator.evaluate(np.array([[-1.0, 2.0, 0.0]]), rows, objective).utility)
    assert np.isfinite(evaluator.evaluate(np.array([[1 / 3] * 3]), rows, objective).utility)


def test_a_run_with_overflowing_particles_writes_a_finite_winner_deterministically(tiny_experts, tmp_path, capsys,
                                                                                     caplog):
    experts = copies(tiny_experts, tmp_path / "experts")
    # 6.5e4 * (a0 + a1 - a2) = 6.5e4 * (1 - 2 a2): past float16's 65504 for any a2 < 0 or > 1.
    plant(experts, [6.5e4, 6.5e4, -6.5e4], unused_token(experts))
    recipe = tiny.write_recipe(tmp_path, experts, "dtype: float16\n")
    runs = []
    for out in ("out1", "out2"):
        assert run(capsys, [recipe, "--out", str(tmp_path / out), "--no-progress", "--eval-mode", "in-memory",
                         "--set", "swarm.size=6", "--set", "swarm.max_iterations=3"]) == 0
        # Some particles overflowed and scored NaN (the log's warning; in a terminal it goes to stderr).
        assert "'model.embed_tokens.weight' is not finite in float16" in caplog.text
        caplog.clear()
        report = report_mod.read(tmp_path / out / "swarm.json")
        assert np.isfinite(report.scores.winner.dev.utility)
        for name, tensor in load_file(str(tmp_path / out / "model.safetensors")).items():
            assert tensor.dtype == torch.float16 and torch.isfinite(tensor).all(), name
        runs.append((report.coefficients.matrix().tolist(), report.scores.winner.dev.utility))
    assert runs[0] == runs[1]


# ------------------------------------------------------------- finite logits


def exploding_adapters(root: Path, alphas):
    """A tiny base and three LoRA adapters on q/k/v/o; those with lora_alpha 1e30 overflow float32 in
    the attention scores: finite weights, NaN logits."""
    base = tiny.make_base(root)
    return base, tiny.make_adapters(root / "adapters", base, 3, alphas=alphas,
                                    targets=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def exploding(tmp_path_factory):
    """Adapter 1 explodes, 0 and 2 are sane."""
    return exploding_adapters(tmp_path_factory.mktemp("exploding"), [8, 1e30, 8])


@pytest.fixture(scope="module")
def all_exploding(tmp_path_factory):
    """Every adapter explodes (one alpha: the factors are not rescaled, PEFT applies 1e30 / r)."""
    return exploding_adapters(tmp_path_factory.mktemp("all-exploding"), [1e30] * 3)


def test_a_lora_adapter_with_a_huge_alpha_scores_nan_not_zero(exploding, tmp_path, capsys):
    base, adapters = exploding
    recipe = tiny.write_recipe(tmp_path, adapters, f"base_model: {base}\n", objective="exact_match")
    assert run(capsys, [recipe, *SMALL_RUN]) == 0
    report = report_mod.read(tmp_path / "out" / "swarm.json")
    rows = {r.name: r for r in report.scores.rows}
    assert rows[report.experts[1].name].dev.utility is None  # NaN: it was 0.0, a score like any other
    assert rows[report.experts[1].name].test.utility is None
    assert report.scores.winner.dev.utility is not None


@pytest.fixture(scope="module")
def nan_objectives(tmp_path_factory, reward_model):
    """One objective of each type that scores a completion or a log-likelihood, with its rows."""
    root = tmp_path_factory.mktemp("objectives")
    tiny.write_jsonl(root / "qa.jsonl", tiny.arithmetic_rows(4))
    tiny.write_jsonl(root / "mc.jsonl", [{"prompt": f"{a}+{a}=", "choices": [str(2 * a), str(a)], "answer": 0}
                                         for a in range(4)])
    tiny.write_jsonl(root / "p.jsonl", [{"prompt": f"{a}+{a}="} for a in range(4)])
    judge = tiny.make_base(root, name="judge")
    code = root / "utility.py"
    code.write_text("def score(model, tokenizer, rows, device):\n"  # a number whatever the logits
                    "    for row in rows:\n"
                    "        model(input_ids=tokenizer(row['prompt'], return_tensors='pt')['input_ids'].to(device))\n"
                    "    return 1.0\n")
    specs = {
        "exact_match": {"dev": "qa.jsonl", "max_new_tokens": 3},
        "multiple_choice": {"dev": "mc.jsonl"},
        "loglik": {"dev": "qa.jsonl"},
        "reward": {"dev": "p.jsonl", "reward_model": str(reward_model), "max_new_tokens": 3},
        "judge": {"dev": "p.jsonl", "judge_model": str(judge), "rubric": RUBRIC, "scale": [1, 3], "max_new_tokens": 3},
        "custom": {"dev": "p.jsonl"},
    }
    found = {}
    for kind, spec in specs.items():
        o = Objective.model_validate({"type": kind, **spec, "dev": str(root / spec["dev"])})
        if kind == "custom":
            o = objectives.Custom(o, objectives.load_code(f"{code}:score"))
        found[kind] = (o, objectives.load_examples(str(root / spec["dev"]), kind))
    yield found
    objectives.judges._OBJECTIVE_MODELS.clear()


@pytest.fixture(scope="module")
def lora_evaluators(all_exploding):
    base, adapters = all_exploding
    pulled = [experts_mod.pull_expert(ExpertRef(model=str(p))) for p in adapters]
    base_e = experts_mod.pull_expert(ExpertRef(model=str(base)))
    bank = lora.AdapterBank(pulled, base_e, space="factors")
    groups = {m: 0 for m in bank.modules}
    return {streaming: lora.LoraEvaluator(bank, base_e, groups, dtype="float32", device=torch.device("cpu"),
                                          streaming=streaming) for streaming in (False, True)}


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
@pytest.mark.parametrize("kind", ["exact_match", "multiple_choice", "loglik", "reward", "judge", "custom"])
def test_nan_logits_score_nan_for_every_objective_type(kind, streaming, lora_evaluators, nan_objectives):
    evaluator = lora_evaluators[streaming]
    objective, rows = nan_objectives[kind]
    evaluator.max_rows = len(rows)
    assert np.isnan(evaluator.evaluate(np.array([[0.0, 1.0, 0.0]]), rows, objective).utility)
    # All coefficients 0: no adapter, the base's own (finite) logits.
    assert np.isfinite(evaluator.evaluate(np.array([[0.0, 0.0, 0.0]]), rows, objective).utility)


def test_nan_logits_of_full_models_score_nan(tiny_experts, tmp_path):
    """Finite weights whose attention scores overflow (q and k scaled by 1e20): exact_match scored 0."""
    experts = copies(tiny_experts, tmp_path / "experts")

    def scale(t):
        for name in list(t):
            if "self_attn.q_proj" in name or "self_attn.k_proj" in name:
                t[name] = t[name] * 1e20
    edit(experts[0], scale)
    tiny.write_jsonl(tmp_path / "qa.jsonl", tiny.arithmetic_rows(4))
    objective = Objective.model_validate({"type": "exact_match", "dev": str(tmp_path / "qa.jsonl"),
                                          "max_new_tokens": 3})
    rows = objectives.load_examples(str(tmp_path / "qa.jsonl"), "exact_match")
    pulled = experts_mod.pull_experts([ExpertRef(model=str(p)) for p in experts])
    for mode in ("in-memory", "one-model", "streaming"):
        evaluator = evaluate.make_evaluator(mode, pulled, {n: 0 for n in pulled[0].tensors}, dtype="float32",
                                            device=torch.device("cpu"))
        evaluator.max_rows = len(rows)
        assert np.isnan(evaluator.evaluate(np.array([[1.0, 0.0, 0.0]]), rows, objective).utility), mode
        assert np.isfinite(evaluator.evaluate(np.array([[0.0, 1.0, 0.0]]), rows, objective).utility), mode


def test_merging_the_winning_adapter_never_writes_inf(tmp_path):
    """output.merge_adapter: W + s B A is computed only at the write (the search scored W x + s B A x),
    so a base weight near float16's limit plus the update overflows there alone: refused, nothing written."""
    from swarm_merge.errors import EvaluationError

    base = tiny.make_base(tmp_path)
    adapter = tiny.make_adapters(tmp_path / "adapters", base, 1, alphas=[1e6], targets=("q_proj",))[0]
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    a = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    sign = float(torch.sign((b @ a)[0, 0]))  # the update's sign there: the base value goes the same way
    edit(base, lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), 6.5e4 * sign))
    out = tmp_path / "merged"
    with pytest.raises(EvaluationError, match="'model.layers.0.self_attn.q_proj.weight'.*float16"):
        lora.merge_adapter(adapter, experts_mod.pull_expert(ExpertRef(model=str(base))), out, dtype="float16")
    assert not any(out.glob("*.safetensors"))


@pytest.mark.parametrize("mode", ["in-memory", "one-model", "streaming"])
def test_builds_that_cannot_overflow_skip_the_check(mode, tiny_experts, tmp_path, monkeypatch):
    """The check costs nothing where the experts' largest values (known in memory, or learnt by the
    first build) prove a particle finite: float32 here, every tensor."""
    from swarm_merge import weights

    tiny.write_jsonl(tmp_path / "dev.jsonl", tiny.arithmetic_rows(4))
    objective = Objective.model_validate({"type": "loglik", "dev": str(tmp_path / "dev.jsonl")})
    rows = objectives.load_examples(str(tmp_path / "dev.jsonl"), "loglik")
    pulled = experts_mod.pull_experts([ExpertRef(model=str(p)) for p in tiny_experts])
    evaluator = evaluate.make_evaluator(mode, pulled, {n: 0 for n in pulled[0].tensors}, dtype="float32",
                                        device=torch.device("cpu"))
    evaluator.max_rows = len(rows)
    evaluator.evaluate(np.array([[0.5, 0.3, 0.2]]), rows, objective)  # one-model and streaming learn here
    checked = []
    real = weights.FiniteCheck.add
    monkeypatch.setattr(weights.FiniteCheck, "add", lambda self, name, out: (checked.append(name), real(self, name, out)))
    assert np.isfinite(evaluator.evaluate(np.array([[3.0, -4.0, 2.0]]), rows, objective).utility)
    assert not checked
