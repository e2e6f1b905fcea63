"""The demo's real experts (SmolLM2-135M + LoRA skills, built by
recipes/demo/build_experts.py): the CLI end to end, and streaming parity."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from swarm_merge import evaluate, objectives, pipeline
from swarm_merge.cli import main
from swarm_merge.options import RunOptions
from swarm_merge.recipe import load_recipe
from swarm_merge.report import read as read_report

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo.yml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    recipe = load_recipe(RECIPE)
    missing = [e.model for e in recipe.experts if not (Path(e.model) / "config.json").is_file()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"demo experts not built ({missing[0]}); `make test` builds them first")
        pytest.skip("demo experts not built: run `make demo-models`")
    return recipe


@pytest.fixture(scope="module")
def short_dev(tmp_path_factory) -> str:
    """The demo's first 24 dev rows (6 per skill): the end-to-end runs check what the run writes and
    reports, not the search (tests/test_swarm.py and friends do), so a third of the rows will do."""
    rows = (REPO / "recipes" / "demo" / "data" / "dev.jsonl").read_text().splitlines()[:24]
    path = tmp_path_factory.mktemp("demo-dev") / "dev.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_demo_recipe_end_to_end(demo, short_dev, tmp_path):
    """A short search on the real experts: the written model is sum_k a_k E_k and loads."""
    out = tmp_path / "out"
    assert main([str(RECIPE), "--out", str(out), "--set", "swarm.size=6", "--set", "swarm.max_iterations=1",
                 "--set", f"objective.dev={short_dev}", "--set", "objective.test=null", "--no-progress"]) == 0
    report = read_report(out / "swarm.json")
    a = report.coefficients.model
    assert abs(sum(a) - 1) < 1e-9
    winner = report.scores.winner
    assert set(winner.dev.groups) == {"add", "words", "capitalize", "repeat"}
    assert winner.dev.utility >= max(r.dev.utility for r in report.scores.rows if r.kind != "winner")
    merged = load_file(str(out / "model.safetensors"))
    experts = [load_file(str(Path(e.model) / "model.safetensors")) for e in demo.experts]
    for name in list(merged)[:: max(1, len(merged) // 12)]:  # a spread of tensors, all shapes
        want = sum(float(c) * e[name].double() for c, e in zip(a, experts))
        assert torch.allclose(merged[name].double(), want, atol=1e-5), name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16 if demo.dtype == "bfloat16" else None)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Add: 12+35=", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    # The number on the card is what the written model scores: reloaded by
    # transformers from the output folder, scored on the dev set.
    dev = objectives.load_examples(short_dev, demo.objective.type)
    got = objectives.score(model.eval(), evaluate.load_tokenizer(out), dev, demo.objective, torch.device("cpu"))
    assert got.utility == pytest.approx(winner.dev.utility, abs=1e-6)
    assert got.groups == pytest.approx(winner.dev.groups, abs=1e-6)


def test_demo_streaming_matches_in_memory(demo, tmp_path):
    # The evaluators a run builds: the plan's experts, space and kind (nothing is written).
    plan = pipeline.prepare(demo, RunOptions(out_dir=str(tmp_path / "out"), device="cpu"))
    rows = plan.dev[:24]
    c = np.array([[0.4, 0.3, 0.5, -0.2]])[:, : len(plan.experts)]
    c[0, -1] = 1 - c[0, :-1].sum()
    mem = plan.kind.evaluator("in-memory", plan.groups, plan.device)
    assert isinstance(mem, evaluate.InMemoryEvaluator)
    a = mem.evaluate(c, rows, demo.objective)
    b_loglik_obj = demo.objective.model_copy(update={"type": "loglik"})
    a_ll = mem.evaluate(c, rows, b_loglik_obj)
    del mem
    stream = plan.kind.evaluator("streaming", plan.groups, plan.device)
    assert isinstance(stream, evaluate.StreamingEvaluator)
    b = stream.evaluate(c, rows, demo.objective)
    b_ll = stream.evaluate(c, rows, b_loglik_obj)
    assert a.utility == b.utility and a.groups == b.groups
    assert a_ll.utility == pytest.approx(b_ll.utility, abs=1e-5)


def test_demo_lora_recipe_end_to_end(demo, short_dev, tmp_path):
    """The adapter twin on the real adapters: a short search whose written adapter, loaded
    by PEFT on the real base, scores on the dev set what the report says."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora_recipe = REPO / "recipes" / "demo-lora.yml"
    recipe = load_recipe(lora_recipe)
    out = tmp_path / "out"
    assert main([str(lora_recipe), "--out", str(out), "--set", "swarm.size=6", "--set", "swarm.max_iterations=1",
                 "--set", f"objective.dev={short_dev}", "--set", "objective.test=null",
                 "--set", "output.merge_adapter=false", "--no-progress"]) == 0
    report = read_report(out / "swarm.json")
    assert report.lora.space == "factors" and report.lora.rank == 8
    assert [e.adapter.r for e in report.experts] == [8, 8, 8, 8]
    base = AutoModelForCausalLM.from_pretrained(recipe.base_model.model)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    dev = objectives.load_examples(short_dev, recipe.objective.type)
    got = objectives.score(model, evaluate.load_tokenizer(recipe.base_model.model), dev, recipe.objective,
                           torch.device("cpu"))
    assert got.utility == pytest.approx(report.scores.winner.dev.utility, abs=1e-6)
    assert got.groups == pytest.approx(report.scores.winner.dev.groups, abs=1e-6)


@pytest.mark.parametrize("name", ["demo.yml", "demo-lora.yml", "demo-harmonic.yml", "demo-judge.yml"])
def test_every_shipped_recipe_validates_in_a_dry_run(name, demo, tmp_path, capsys):
    assert main([str(REPO / "recipes" / name), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert "dry run: nothing was written" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
