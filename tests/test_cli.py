"""The CLI end to end on tiny real models: what a user runs and gets."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli
from swarm_merge.cli import main

import tiny


def expert_tensors(paths):
    return [load_file(str(Path(p) / "model.safetensors")) for p in paths]


def assert_is_affine_merge(out_dir: Path, expert_paths, atol=1e-5):
    """The written model equals sum_k a_k E_k per tensor, with swarm.json's coefficients."""
    report = json.loads((out_dir / "swarm.json").read_text())
    coeffs = report["coefficients"]
    merged = load_file(str(out_dir / "model.safetensors"))
    experts = expert_tensors(expert_paths)
    assert set(merged) == set(experts[0])
    for name, tensor in merged.items():
        if "model" in coeffs:
            a = coeffs["model"]
        else:
            from swarm_merge.evaluate import tensor_groups

            groups, _ = tensor_groups(sorted(experts[0]), granularity="layer",
                                      layer_groups=report["recipe"]["swarm"]["layer_groups"])
            a = coeffs["per_group"][groups[name]]
        want = sum(float(c) * e[name].double() for c, e in zip(a, experts))
        assert torch.allclose(tensor.double(), want, atol=atol), name
    return report


def test_run_writes_a_loadable_affine_merge_with_report_and_card(tiny_recipe, tiny_experts, tmp_path):
    recipe = tiny_recipe()
    result = run_cli(recipe)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "mergekit_config.yml", "swarm.json",
                 "swarm-state.json", "README.md", "swarm_history.png"):
        assert (out / name).is_file(), name
    assert not (out / ".staging").exists()
    report = assert_is_affine_merge(out, tiny_experts)
    a = np.array(report["coefficients"]["model"])
    assert len(a) == 3 and abs(a.sum() - 1) < 1e-9
    names = [r["name"] for r in report["scores"]["rows"]]
    assert names == ["expert0", "expert1", "expert2", "uniform average", "swarm winner"]
    winner = report["scores"]["winner"]
    assert winner["dev"]["utility"] >= max(r["dev"]["utility"] for r in report["scores"]["rows"][:4]) - 1e-12
    assert set(winner["test"]["groups"]) == {"add", "sum"}
    history = report["search"]["history"]
    assert history[0]["iteration"] == 0 and len(history) == report["search"]["iterations"] + 1
    assert all({"best", "mean", "worst", "evaluations", "seconds"} <= set(h) for h in history)
    assert [e["path"] for e in report["experts"]] == [str(p) for p in tiny_experts]
    # The final table on stdout.
    assert "swarm winner" in result.stdout and "uniform average" in result.stdout
    # It loads in transformers and generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("1+2=", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 2
    # The card's metadata parses.
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert "model-swarms" in card.data.tags and "swarm winner" in card.text


def test_mergekit_config_reproduces_the_weights(tiny_recipe, tiny_experts, tmp_path):
    assert run_cli(tiny_recipe()).returncode == 0
    out = tmp_path / "out"
    again = tmp_path / "again"
    code = "import sys; from swarm_merge.cli import mergekit_yaml; sys.argv[0]='mergekit-swarm-yaml'; mergekit_yaml()"
    r = subprocess.run([sys.executable, "-c", code, str(out / "mergekit_config.yml"), str(again)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    # The registered `swarm` method gives the same weights, and refuses non-affine ones.
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    config["merge_method"] = "swarm"
    config.pop("parameters")
    (tmp_path / "swarm.yml").write_text(yaml.safe_dump(config))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "swarm.yml"), str(tmp_path / "via-swarm")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c = load_file(str(tmp_path / "via-swarm" / "model.safetensors"))
    assert all(torch.allclose(a[n], c[n], atol=1e-6) for n in a)
    config["models"][0]["parameters"]["weight"] += 0.5
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(config))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bad.yml"), str(tmp_path / "bad")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "sum to 1" in r.stderr


def test_layer_granularity_writes_per_group_weights(tiny_recipe, tiny_experts, tmp_path):
    recipe = tiny_recipe("", objective="loglik")
    r = run_cli(recipe, "--set", "swarm.granularity=layer", "--set", "swarm.layer_groups=2")
    assert r.returncode == 0, r.stderr
    report = assert_is_affine_merge(tmp_path / "out", tiny_experts)
    per_group = np.array(report["coefficients"]["per_group"])
    assert per_group.shape == (2, 3) and np.allclose(per_group.sum(1), 1)
    assert report["coefficients"]["groups"] == ["embeddings + layer 0", "layer 1 + head"]


def test_tied_embeddings_and_exact_match(tmp_path, tiny_recipe):
    experts = tiny.make_experts(tmp_path / "tied", 2, tie=True)
    recipe = tiny_recipe(objective="exact_match", experts=experts)
    r = run_cli(recipe, "--set", "swarm.size=4")
    assert r.returncode == 0, r.stderr
    assert_is_affine_merge(tmp_path / "out", experts)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_same_seed_same_result_and_resume_after_kill_9(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    settings = ["--set", "swarm.max_iterations=8", "--set", "swarm.patience=8", "--set", "swarm.size=6"]
    assert run_cli(recipe, *settings, "--out", tmp_path / "a").returncode == 0
    # Kill -9 a second run midway, then resume it.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "swarm_merge.cli", str(recipe), *settings, "--out", str(tmp_path / "b")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "b" / "swarm-state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads(state.read_text())["history"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "swarm.json").exists(), "killed before the end"
    again = run_cli(recipe, *settings, "--out", tmp_path / "b")
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to overwrite silently
    resumed = run_cli(recipe, *settings, "--out", tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "a" / "swarm.json").read_text())
    b = json.loads((tmp_path / "b" / "swarm.json").read_text())
    assert b["search"]["resumed"]
    assert a["coefficients"] == b["coefficients"]
    assert a["scores"]["winner"] == b["scores"]["winner"]
    assert [h["best"] for h in a["search"]["history"]] == [h["best"] for h in b["search"]["history"]]
    assert load_file(str(tmp_path / "a" / "model.safetensors")).keys() == load_file(str(tmp_path / "b" / "model.safetensors")).keys()
    # A different seed searches differently.
    other = run_cli(recipe, *settings, "--out", tmp_path / "c", "--seed", "7")
    assert other.returncode == 0
    c = json.loads((tmp_path / "c" / "swarm.json").read_text())
    assert c["recipe"]["swarm"]["seed"] == 7 and c["coefficients"] != a["coefficients"]


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_recipe, tmp_path, capsys):
    assert main([str(tiny_recipe()), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 experts" in out and "evaluations: at most 20" in out and "estimated peak memory" in out
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ bad input


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("mergekit-swarm: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_missing_recipe_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yml")]) == 2
    assert "not found" in one_error_line(capsys)


def test_unknown_key_exits_2(tiny_recipe, tmp_path, capsys):
    assert main([str(tiny_recipe("swarm2: 1\n"))]) == 2
    assert "unknown key 'swarm2'" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["no_safetensors", "shape", "architecture", "missing_folder"])
def test_bad_experts_exit_2_and_write_nothing(problem, tmp_path, tiny_recipe, tiny_experts, capsys):
    import shutil

    bad = tmp_path / "bad"
    if problem == "no_safetensors":
        shutil.copytree(tiny_experts[0], bad)
        (bad / "model.safetensors").unlink()
        message = "no *.safetensors"
    elif problem == "shape":
        bad = tiny.make_experts(tmp_path / "wide", 1, layers=2)[0]
        from transformers import LlamaForCausalLM

        cfg = tiny.make_config(300, layers=2, hidden=48)
        LlamaForCausalLM(cfg).save_pretrained(bad)
        message = "has shape"
    elif problem == "architecture":
        shutil.copytree(tiny_experts[0], bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["architectures"] = ["MistralForCausalLM"]
        (bad / "config.json").write_text(json.dumps(cfg))
        message = "different architectures"
    else:
        message = "not found"
    recipe = tiny_recipe(experts=[tiny_experts[0], bad])
    assert main([str(recipe)]) == 2
    line = one_error_line(capsys)
    assert message in line
    if problem == "shape":  # names the tensor and both shapes
        assert re.search(r"tensor '[\w.]+' has shape \[\d+(, \d+)*\] in .+ but \[\d+(, \d+)*\] in ", line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "is empty"),
    ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n', ":2: not valid JSON"),
    ('{"prompt": "1+1="}\n', "'answer' must be"),
])
def test_bad_dev_data_exits_2_and_writes_nothing(content, message, tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    dev = tmp_path / "data" / "dev.jsonl"
    if content is None:
        dev.unlink()
    else:
        dev.write_text(content)
    assert main([str(recipe)]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_out_dir_with_other_files_is_refused(tiny_recipe, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    assert main([str(tiny_recipe())]) == 2
    assert "--force" in one_error_line(capsys)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_cuda_without_a_gpu_is_a_clear_error(tiny_recipe, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main([str(tiny_recipe()), "--device", "cuda"]) == 1
    assert "no CUDA GPU" in one_error_line(capsys)
    assert not (tmp_path / "out" / "swarm.json").exists()


def test_push_without_token_fails_before_the_search(tiny_recipe, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "swarm_merge.cli", str(tiny_recipe()), "--push-to-hub", "me/merged"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "needs a Hub token" in r.stderr
    assert not (tmp_path / "out").exists()
