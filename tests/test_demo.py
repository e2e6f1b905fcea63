"""The demo's real experts (SmolLM2-135M + LoRA skills, built by
recipes/demo/build_experts.py): the CLI end to end, and streaming parity."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from swarm_merge import evaluate, experts as experts_mod, objectives
from swarm_merge.recipe import load_recipe

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


def test_demo_recipe_end_to_end(demo, tmp_path):
    """A short search on the real experts: the written model is sum_k a_k E_k and loads."""
    out = tmp_path / "out"
    r = run_cli(RECIPE, "--out", out, "--set", "swarm.size=6", "--set", "swarm.max_iterations=1",
                "--set", "objective.test=null")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "swarm.json").read_text())
    a = report["coefficients"]["model"]
    assert abs(sum(a) - 1) < 1e-9
    rows = {row["name"]: row for row in report["scores"]["rows"]}
    assert set(report["scores"]["winner"]["dev"]["groups"]) == {"add", "words", "capitalize", "repeat"}
    assert rows["swarm winner"]["dev"]["utility"] >= max(r["dev"]["utility"] for r in report["scores"]["rows"][:-1])
    merged = load_file(str(out / "model.safetensors"))
    experts = [load_file(str(Path(e.model) / "model.safetensors")) for e in demo.experts]
    for name in list(merged)[:: max(1, len(merged) // 12)]:  # a spread of tensors, all shapes
        want = sum(float(c) * e[name].double() for c, e in zip(a, experts))
        assert torch.allclose(merged[name].double(), want, atol=1e-5), name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Add: 12+35=", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_demo_streaming_matches_in_memory(demo):
    experts = experts_mod.pull_experts(demo.experts)
    groups, _ = evaluate.tensor_groups(sorted(experts[0].tensors), granularity="model")
    rows = objectives.load_examples(demo.objective.dev, demo.objective.type)[:24]
    cpu = torch.device("cpu")
    c = np.array([[0.4, 0.3, 0.5, -0.2]])[:, : len(experts)]
    c[0, -1] = 1 - c[0, :-1].sum()
    mem = evaluate.InMemoryEvaluator(experts, groups, dtype=demo.dtype, device=cpu)
    a = mem.evaluate(c, rows, demo.objective)
    b_loglik_obj = demo.objective.model_copy(update={"type": "loglik"})
    a_ll = mem.evaluate(c, rows, b_loglik_obj)
    del mem
    stream = evaluate.StreamingEvaluator(experts, groups, dtype=demo.dtype, device=cpu)
    b = stream.evaluate(c, rows, demo.objective)
    b_ll = stream.evaluate(c, rows, b_loglik_obj)
    assert a.utility == b.utility and a.groups == b.groups
    assert a_ll.utility == pytest.approx(b_ll.utility, abs=1e-5)
