"""LoRA adapters as experts: the two search spaces against their definitions,
the written adapter against what the search scored, the merged model, Hub
adapters, and every refusal.

A tiny base and tiny PEFT adapters with random non-zero A and B are built in a
temp dir (tests/tiny.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

from swarm_merge import cli, experts as experts_mod, lora, objectives, report as report_mod  # noqa: E402
from swarm_merge.recipe import ExpertRef, load_recipe  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.make_base(tmp_path_factory.mktemp("lora-base"))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Three rank-4 adapters on q_proj and v_proj, alphas 8, 4, 16 (different scalings)."""
    return tiny.make_adapters(tmp_path_factory.mktemp("adapters"), base, 3, alphas=[8, 4, 16], ranks=None)


@pytest.fixture(scope="module")
def mixed(base, tmp_path_factory):
    """Adapters of ranks 2, 4, 3 and different alphas and targets (one on q_proj only, one on o_proj too)."""
    root = tmp_path_factory.mktemp("mixed")
    a = tiny.make_adapters(root, base, 1, ranks=[2], targets=("q_proj",), names=["r2"])
    b = tiny.make_adapters(root, base, 1, ranks=[4], targets=("q_proj", "v_proj"), names=["r4"])
    c = tiny.make_adapters(root, base, 1, ranks=[3], targets=("q_proj", "v_proj", "o_proj"), names=["r3"])
    return a + b + c


def pulled(paths):
    return [experts_mod.pull_expert(ExpertRef(model=str(p))) for p in paths]


def raw(path: Path):
    """module -> (A, B, scaling) straight from the adapter's files."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / cfg["r"]
    found = {}
    for key, t in tensors.items():
        if ".lora_A." in key:
            module = key[len("base_model.model."):].split(".lora_A.")[0]
            found[module] = (t.double(), tensors[key.replace("lora_A", "lora_B")].double(), s)
    return found


def bank_delta(bank, coefficients, groups, module):
    a, b = bank.particle(coefficients, groups)[module]
    return bank.scaling * b.double() @ a.double()


COEFS = np.array([[0.7, -0.45, 0.75]])


def test_factors_space_is_the_official_codes_combination(adapters, base):
    experts = pulled(adapters)
    base_e = experts_mod.pull_expert(ExpertRef(model=str(base)))
    bank = lora.AdapterBank(experts, base_e, space="factors")
    groups = {m: 0 for m in bank.modules}
    raws = [raw(p) for p in adapters]
    assert bank.rank == 4 and bank.modules
    for module in bank.modules:
        # Different alphas: each adapter's scaling folded into its B (an adapter is the same function).
        b = sum(c * r[module][2] * r[module][1] for c, r in zip(COEFS[0], raws))
        a = sum(c * r[module][0] for c, r in zip(COEFS[0], raws))
        want = b @ a
        assert torch.allclose(bank_delta(bank, COEFS, groups, module), want, atol=1e-5)
        # ... which is not the delta-space sum (cross terms).
        delta = sum(c * r[module][2] * r[module][1] @ r[module][0] for c, r in zip(COEFS[0], raws))
        assert not torch.allclose(want, delta, atol=1e-3)


def test_equal_adapters_keep_their_own_rank_and_alpha(base, tmp_path):
    paths = tiny.make_adapters(tmp_path, base, 2, alphas=[8, 8])
    experts = pulled(paths)
    bank = lora.AdapterBank(experts, experts_mod.pull_expert(ExpertRef(model=str(base))), space="factors")
    raws = [raw(p) for p in paths]
    groups = {m: 0 for m in bank.modules}
    c = np.array([[0.3, 0.7]])
    assert (bank.rank, bank.alpha) == (4, 8.0)
    for module in bank.modules:
        a, b = bank.particle(c, groups)[module]
        assert torch.allclose(a.double(), 0.3 * raws[0][module][0] + 0.7 * raws[1][module][0], atol=1e-6)
        assert torch.allclose(b.double(), 0.3 * raws[0][module][1] + 0.7 * raws[1][module][1], atol=1e-6)


def test_delta_space_is_the_task_vector_sum_as_one_lora(mixed, base):
    experts = pulled(mixed)
    bank = lora.AdapterBank(experts, experts_mod.pull_expert(ExpertRef(model=str(base))), space="delta")
    groups = {m: 0 for m in bank.modules}
    raws = [raw(p) for p in mixed]
    assert bank.rank == 2 + 4 + 3 and bank.scaling == 1.0
    assert any(m.endswith("o_proj") for m in bank.modules)
    for module in bank.modules:
        want = sum(c * r[module][2] * r[module][1] @ r[module][0]
                   for c, r in zip(COEFS[0], raws) if module in r)
        assert torch.allclose(bank_delta(bank, COEFS, groups, module), want, atol=1e-5), module


def test_factors_space_pads_mixed_ranks(mixed, base):
    experts = pulled(mixed)
    bank = lora.AdapterBank(experts, experts_mod.pull_expert(ExpertRef(model=str(base))), space="factors")
    groups = {m: 0 for m in bank.modules}
    raws = [raw(p) for p in mixed]
    assert bank.rank == 4
    for module in bank.modules:
        a = sum(c * torch.nn.functional.pad(r[module][0], (0, 0, 0, 4 - r[module][0].shape[0]))
                for c, r in zip(COEFS[0], raws) if module in r)
        b = sum(c * r[module][2] * torch.nn.functional.pad(r[module][1], (0, 4 - r[module][1].shape[1]))
                for c, r in zip(COEFS[0], raws) if module in r)
        assert torch.allclose(bank_delta(bank, COEFS, groups, module), b @ a, atol=1e-5), module


@pytest.mark.parametrize("space", ["factors", "delta"])
def test_the_evaluator_computes_with_base_plus_the_particles_delta(space, mixed, base):
    """The evaluator's logits against a dense model holding W + delta (direct weight-space computation)."""
    from transformers import AutoModelForCausalLM

    experts = pulled(mixed)
    base_e = experts_mod.pull_expert(ExpertRef(model=str(base)))
    bank = lora.AdapterBank(experts, base_e, space=space)
    groups = {m: 0 for m in bank.modules}
    ev = lora.LoraEvaluator(bank, base_e, groups, dtype="float32", device=torch.device("cpu"))
    ev.build(COEFS)
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        got = ev.model(input_ids=ids).logits
    dense = AutoModelForCausalLM.from_pretrained(str(base))
    raws = [raw(p) for p in mixed]
    with torch.no_grad():
        for module in bank.modules:
            if space == "delta":
                delta = sum(c * r[module][2] * r[module][1] @ r[module][0] for c, r in zip(COEFS[0], raws) if module in r)
            else:
                delta = bank_delta(bank, COEFS, groups, module)
            dense.get_submodule(module).weight.add_(delta.float())
        want = dense(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_streaming_the_base_scores_like_holding_it(tie, tmp_path):
    from swarm_merge.recipe import Objective

    b = tiny.make_base(tmp_path, tie=tie)
    paths = tiny.make_adapters(tmp_path, b, 2)
    experts = pulled(paths)
    base_e = experts_mod.pull_expert(ExpertRef(model=str(b)))
    bank = lora.AdapterBank(experts, base_e, space="factors")
    groups = {m: 0 for m in bank.modules}
    dev = tiny.write_jsonl(tmp_path / "dev.jsonl", tiny.arithmetic_rows(6))
    objective = Objective(type="exact_match", dev=str(dev), max_new_tokens=2)
    examples = objectives.load_examples(str(dev), "exact_match", None)
    scores = []
    for streaming in (False, True):
        ev = lora.LoraEvaluator(bank, base_e, groups, dtype="float32", device=torch.device("cpu"), streaming=streaming)
        c = np.array([[0.6, 0.4]])
        ev.build(c)
        ids = torch.tensor([[5, 17, 42, 9]])
        with torch.no_grad():
            scores.append((ev.model(input_ids=ids).logits, ev.evaluate(c, examples, objective).utility))
    assert torch.allclose(scores[0][0], scores[1][0], atol=1e-5)
    assert scores[0][1] == scores[1][1]


def test_a_repeated_particle_keeps_its_factors_and_another_replaces_them(adapters, base, tmp_path, monkeypatch):
    """A race scores one particle's stages one after another: the factors are put in place once."""
    from swarm_merge.recipe import Objective

    experts = pulled(adapters)
    base_e = experts_mod.pull_expert(ExpertRef(model=str(base)))
    bank = lora.AdapterBank(experts, base_e, space="factors")
    ev = lora.LoraEvaluator(bank, base_e, {m: 0 for m in bank.modules}, dtype="float32", device=torch.device("cpu"))
    dev = tiny.write_jsonl(tmp_path / "dev.jsonl", tiny.arithmetic_rows(4))
    objective = Objective(type="loglik", dev=str(dev))
    examples = objectives.load_examples(str(dev), "loglik", None)
    built, particle = [], bank.particle
    monkeypatch.setattr(bank, "particle", lambda c, g: built.append(np.array(c)) or particle(c, g))
    first = ev.evaluate(COEFS, examples, objective).utility
    assert ev.evaluate(COEFS, examples, objective).utility == first and len(built) == 1
    other = np.array([[0.2, 0.5, 0.3]])
    assert ev.evaluate(other, examples, objective).utility != first and len(built) == 2
    assert ev.evaluate(COEFS, examples, objective).utility == first and len(built) == 3


def test_a_16_bit_base_scores_as_peft_loads_the_written_adapter(adapters, base, tmp_path):
    """bfloat16 base: PEFT keeps LoRA factors in float32; the written adapter reproduces the logits bit for bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    experts = pulled(adapters)
    base_e = experts_mod.pull_expert(ExpertRef(model=str(base)))
    bank = lora.AdapterBank(experts, base_e, space="factors")
    groups = {m: 0 for m in bank.modules}
    ev = lora.LoraEvaluator(bank, base_e, groups, dtype="bfloat16", device=torch.device("cpu"))
    ev.build(COEFS)
    lora.write_adapter(tmp_path, bank, COEFS, groups, base_e, base_model=str(base), revision=None)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16),
                                       str(tmp_path)).eval()
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        assert torch.equal(ev.model(input_ids=ids).logits, loaded(input_ids=ids).logits)


# ------------------------------------------------------------ the whole command


def run(recipe: Path, *args) -> int:
    return cli.main([str(recipe), *map(str, args)])


@pytest.fixture(scope="module")
def factors_run(adapters, base, tmp_path_factory):
    root = tmp_path_factory.mktemp("factors-run")
    recipe = tiny.write_recipe(root, adapters, "  merge_adapter: true\n")
    assert run(recipe) == 0
    return root / "out", recipe


def test_the_written_adapter_loads_in_peft_and_gives_the_scored_utility(factors_run, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, recipe = factors_run
    report = report_mod.read(out / "swarm.json")
    assert report.lora.space == "factors" and report.lora.rank == 4 and report.lora.merged == "merged"
    assert all(e.adapter is not None and e.adapter.r == 4 for e in report.experts)
    assert report.base_model is not None and report.base_model.digest
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA" and config["lora_alpha"] == report.lora.alpha
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out)).eval()
    r = load_recipe(recipe)
    dev = objectives.load_examples(r.objective.dev, "loglik", "task")
    tok = __import__("swarm_merge.evaluate", fromlist=["x"]).load_tokenizer(base)
    got = objectives.score(model, tok, dev, r.objective, torch.device("cpu"))
    assert got.utility == pytest.approx(report.scores.winner.dev.utility, abs=1e-6)
    assert not (out / "mergekit_config.yml").exists()


def test_the_merged_model_loads_in_transformers_and_matches_the_adapter(factors_run, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = factors_run
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out)).eval()
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    assert (out / "merged" / "tokenizer.json").is_file()
    manifest = json.loads((out / ".swarm-merge.json").read_text())
    assert "merged/model.safetensors" in manifest["files"] and manifest["status"] == "complete"


def test_the_card_names_the_base_and_shows_peft_usage(factors_run):
    from huggingface_hub import ModelCard

    out, _ = factors_run
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    text = card.text
    assert "PeftModel.from_pretrained(base, " in text and 'allow_patterns="merged/*"' in text
    assert "| adapter | revision | coefficient |" in text and "mergekit-yaml" not in text
    merged_card = ModelCard.load(out / "merged" / "README.md")
    assert "merge_and_unload" in merged_card.text


def test_force_rerun_replaces_the_merged_folder_and_keeps_foreign_files(factors_run, adapters, tmp_path):
    out, recipe = factors_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    text = recipe.read_text().replace(str(out), str(copy)).replace("  merge_adapter: true\n", "")
    recipe2 = recipe.parent / "recipe-copy.yml"
    recipe2.write_text(text)
    (copy / "merged" / "notes.txt").write_text("mine")
    assert run(recipe2, "--force") == 2  # a foreign file in our subfolder: refused, and kept
    assert (copy / "merged" / "notes.txt").read_text() == "mine"
    assert (copy / "merged" / "model.safetensors").is_file()  # nothing of the earlier run deleted either
    (copy / "merged" / "notes.txt").unlink()
    assert run(recipe2, "--force") == 0
    assert not (copy / "merged").exists() and (copy / "adapter_config.json").is_file()


def test_delta_space_run_writes_the_concatenated_rank(mixed, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = tiny.write_recipe(tmp_path, mixed, "", objective="exact_match")
    assert run(recipe, "--set", "swarm.lora_space=delta", "--set", "swarm.granularity=layer",
               "--set", f"base_model={base}") == 0
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 9 and config["lora_alpha"] == 9
    # Not every q/v/o module of the base is covered by the same adapters: exact module paths? No: the
    # union covers every q_proj, v_proj and o_proj, so PEFT's leaf names suffice.
    assert sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    report = report_mod.read(out / "swarm.json")
    assert report.lora.rank == 9 and report.coefficients.per_group is not None
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out))


def test_streaming_mode_runs_with_adapters_and_closes_the_bases_files(adapters, base, tmp_path):
    from test_streaming import _open_files_under

    recipe = tiny.write_recipe(tmp_path, adapters)
    assert run(recipe, "--eval-mode", "streaming", "--set", "swarm.max_iterations=1") == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert _open_files_under([Path(base).resolve()]) == []


def test_one_model_mode_with_adapters_says_it_is_in_memory(adapters, tmp_path, caplog):
    recipe = tiny.write_recipe(tmp_path, adapters)
    with caplog.at_level("INFO", logger="swarm_merge"):
        assert run(recipe, "--eval-mode", "one-model", "--set", "swarm.max_iterations=1") == 0
    assert "one-model with LoRA adapters is in-memory" in caplog.text and "evaluation: in-memory" in caplog.text


def test_dry_run_describes_the_adapters(adapters, tmp_path, capsys):
    recipe = tiny.write_recipe(tmp_path, adapters)
    assert run(recipe, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "3 LoRA adapters on" in text and "LoRA r=4 alpha=4" in text and "rank-4 adapter" in text
    assert not (tmp_path / "out").exists()
    # the plan names the mode the run takes: with adapters one-model is in-memory (the plan said one-model)
    assert run(recipe, "--dry-run", "--eval-mode", "one-model") == 0
    assert "-> eval mode: in-memory" in capsys.readouterr().out


# ---------------------------------------------------------------- refusals


def edit_config(path: Path, **changes) -> Path:
    data = json.loads((path / "adapter_config.json").read_text())
    data.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(data))
    return path


def copy_adapter(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    return edit_config(dest, **changes)


@pytest.mark.parametrize("case, message", [
    ("mixed", "is a full model but"),
    ("dora", "DoRA adapter"),
    ("rank_pattern", "sets rank_pattern"),
    ("modules_to_save", "modules_to_save"),
    ("no_base", "do not name their base model"),
    ("two_bases", "name different bases"),
    ("recipe_base", "but the recipe's base_model is"),
    ("other_base", "was trained on another base"),
    ("merge_full", "output.merge_adapter applies to LoRA adapter experts"),
    ("not_lora", "not LoRA"),
])
def test_refusals_exit_2_with_one_line_and_write_nothing(case, message, adapters, base, tiny_experts, tmp_path,
                                                          capsys):
    a0, a1 = tmp_path / "a0", tmp_path / "a1"
    shutil.copytree(adapters[0], a0)
    shutil.copytree(adapters[1], a1)
    experts, extra = [a0, a1], ""
    if case == "mixed":
        experts = [a0, tiny_experts[0]]
    elif case == "dora":
        edit_config(a1, use_dora=True)
    elif case == "rank_pattern":
        edit_config(a1, rank_pattern={"q_proj": 8})
    elif case == "modules_to_save":
        edit_config(a1, modules_to_save=["lm_head"])
    elif case == "no_base":
        edit_config(a0, base_model_name_or_path=None)
        edit_config(a1, base_model_name_or_path=None)
    elif case == "two_bases":
        edit_config(a0, base_model_name_or_path="org/base-one")
        edit_config(a1, base_model_name_or_path="org/base-two")
    elif case == "recipe_base":
        edit_config(a0, base_model_name_or_path="org/base-one")
        edit_config(a1, base_model_name_or_path="org/base-one")
        extra = "base_model: org/base-two\n"
    elif case == "other_base":
        wide = tiny.make_base(tmp_path, name="wide")
        cfg = json.loads((wide / "config.json").read_text())
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg.update(hidden_size=48, intermediate_size=96)
        LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})).save_pretrained(wide)
        a1 = tiny.make_adapters(tmp_path / "w", wide, 1, base_name=str(base))[0]
        experts = [a0, a1]
    elif case == "merge_full":
        experts, extra = tiny_experts[:2], "output:\n  merge_adapter: true\n"
    elif case == "not_lora":
        edit_config(a1, peft_type="IA3")
    recipe = tiny.write_recipe(tmp_path, experts)
    if extra.startswith("output:"):
        recipe.write_text(recipe.read_text().replace("output:\n", "output:\n  merge_adapter: true\n", 1))
    elif extra:
        recipe.write_text(extra + recipe.read_text())
    capsys.readouterr()
    assert run(recipe) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
