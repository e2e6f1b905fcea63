"""Inputs from a stranger's pull request or Hub repo: each ends with exit 2 and one line,
before anything is claimed or computed, and nothing depends on where the command runs.
(The lm_eval task folders, the push, the manifest and the weights have files of their own:
test_task_code.py, test_push_manifest.py, test_weights_guard.py, test_resume_inputs.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from swarm_merge import ci, experts as experts_mod, lora
from swarm_merge.cli import main
from swarm_merge.recipe import ExpertRef

QUICK = ["--set", "swarm.size=4", "--set", "swarm.max_iterations=1", "--no-progress"]


def error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if ": error:" in line], err


def one_error(capsys) -> str:
    errors, err = error_lines(capsys)
    assert len(errors) == 1, err
    return errors[0]


# ------------------------------------------------------------ Hub id or folder


def test_a_hub_id_is_never_a_folder_of_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not ExpertRef.model_validate("org/name").is_local
    assert ExpertRef.model_validate("./org/name").is_local


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory):
    return tiny.make_base(tmp_path_factory.mktemp("base"))


def test_an_adapters_hub_base_does_not_resolve_to_a_folder_here(lora_base, tmp_path, monkeypatch):
    adapters = tiny.make_adapters(tmp_path / "adapters", lora_base, 2, base_name="org/base")
    decoy = tmp_path / "cwd" / "org" / "base"
    shutil.copytree(lora_base, decoy)  # a loadable model of that name in the current directory
    shutil.copytree(lora_base, adapters[0] / "org" / "base")  # and beside the adapter
    monkeypatch.chdir(tmp_path / "cwd")
    experts = [experts_mod.pull_expert(ExpertRef(model=str(p))) for p in adapters]
    ref, source = lora.base_of(experts, None)
    assert (ref.model, ref.is_local, source) == ("org/base", False, "adapters")


# ------------------------------------------------------------ adapters


def _adapter_copy(adapters, tmp_path, name="bad"):
    dest = tmp_path / name
    shutil.copytree(adapters[0], dest)
    return dest


@pytest.fixture(scope="module")
def adapters(lora_base, tmp_path_factory):
    return tiny.make_adapters(tmp_path_factory.mktemp("adapters"), lora_base, 2)


@pytest.mark.parametrize("alpha", ["0", "NaN", "Infinity", "-8"])
def test_a_lora_alpha_that_is_not_positive_and_finite_is_refused(alpha, adapters, lora_base, tmp_path, capsys):
    bad = _adapter_copy(adapters, tmp_path)
    text = (bad / "adapter_config.json").read_text()
    config = json.loads(text)
    (bad / "adapter_config.json").write_text(text.replace(f'"lora_alpha": {config["lora_alpha"]}',
                                                          f'"lora_alpha": {alpha}'))
    recipe = tiny.write_recipe(tmp_path, [bad, adapters[1]], f"base_model: {lora_base}\n")
    assert main([str(recipe), "--dry-run"]) == 2
    line = one_error(capsys)
    assert "lora_alpha" in line, line


def test_lora_factors_on_an_embedding_are_refused_in_the_dry_run(adapters, lora_base, tmp_path, capsys):
    bad = _adapter_copy(adapters, tmp_path)
    tensors = load_file(bad / "adapter_model.safetensors")
    r = json.loads((bad / "adapter_config.json").read_text())["r"]
    vocab, hidden = load_file(lora_base / "model.safetensors")["model.embed_tokens.weight"].shape
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.randn(r, hidden)
    tensors["base_model.model.model.embed_tokens.lora_B.weight"] = torch.randn(vocab, r)
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    recipe = tiny.write_recipe(tmp_path, [bad, adapters[1]], f"base_model: {lora_base}\n")
    assert main([str(recipe), "--dry-run"]) == 2
    line = one_error(capsys)
    assert "embed_tokens" in line and "Embedding" in line and "linear" in line, line


# ------------------------------------------------------------ recipe and flags


@pytest.mark.parametrize("override, key", [
    ("swarm.restart_patience=.inf", "swarm.restart_patience"),
    ("swarm.inertia=.inf", "swarm.inertia"),
    ("swarm.step_length=.nan", "swarm.step_length"),
    ("swarm.init_spread=1e300", "swarm.init_spread"),
    ("objective.weight=-.inf", "objective.weight"),
])
def test_infinite_settings_are_refused_at_their_key(override, key, tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    assert main([str(recipe), "--set", override, "--no-progress"]) == 2
    line = one_error(capsys)
    assert key in line, line
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_set_value_is_one_line(tiny_recipe, capsys):
    recipe = tiny_recipe()
    assert main([str(recipe), "--set", "swarm.size=" + "[" * 5000 + "]" * 5000, "--dry-run"]) == 2
    one_error(capsys)


def test_a_deeply_nested_recipe_is_one_line(tiny_recipe, capsys):
    recipe = tiny_recipe()
    recipe.write_text(recipe.read_text() + "extra: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main([str(recipe), "--dry-run"]) == 2
    assert "nested" in one_error(capsys)


def test_a_key_given_twice_is_refused(tiny_recipe, capsys):
    recipe = tiny_recipe()
    recipe.write_text(recipe.read_text().replace("swarm:\n  size: 5\n", "swarm:\n  size: 5\n  size: 6\n"))
    assert main([str(recipe), "--dry-run"]) == 2
    line = one_error(capsys)
    assert "size" in line and "twice" in line, line


def exit_code(argv) -> int:
    """main's exit code, argparse's own (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("flags, word", [(["--out", ""], "--out"), (["--max-memory", "0"], "--max-memory"),
                                          (["--max-memory", "lots"], "--max-memory")])
def test_empty_or_zero_flags_are_refused(flags, word, tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    assert exit_code([str(recipe), *flags]) == 2
    line = one_error(capsys)
    assert word in line, line
    assert not (tmp_path / "out").exists()


def test_bad_input_under_several_processes_is_one_line_before_launching(tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe()
    (tmp_path / "data" / "dev.jsonl").unlink()
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: launched.append(a) or 0)
    assert main([str(recipe), "--num-processes", "2", "--no-progress"]) == 2
    assert "dev.jsonl" in one_error(capsys)
    assert not launched and not (tmp_path / "out").exists()


# ------------------------------------------------------------ checkpoint


@pytest.fixture
def checkpointed(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    assert main([str(recipe), *QUICK]) == 0
    return recipe, tmp_path / "out" / "swarm-state.json"


def _shrink_x(data):
    data["state"]["x"] = data["state"]["x"][:-1]


def _string_score(data):
    data["state"]["g_score"] = "high"


def _nan_position(data):
    data["state"]["g"][0][0] = "nan"


def _negative_iteration(data):
    data["state"]["iteration"] = -3


def _bad_history(data):
    data["history"] = ["not a record"]


def _wrong_experts(data):
    data["state"]["gw"] = [row + [0.0] for row in data["state"]["gw"]]


def _negative_radius(data):
    data["state"]["rho"] = -1.0


def _unknown_key(data):
    data["run_this"] = "import os"  # the checkpoint is validated whole: nothing unknown is carried along


def _items_as_bool(data):
    data["items"] = True


def _score_as_text(data):
    data["memo"][next(iter(data["memo"]))] = "0.5"


def _archive_too_long(data):  # more scored positions than the budget allows: the surrogate's GP is O(m^2)
    data["state"]["archive_s"] = data["state"]["archive_s"] * 1000
    data["state"]["archive_x"] = data["state"]["archive_x"] * 1000


def _archive_position_missing(data):
    data["state"]["archive_x"] = data["state"]["archive_x"][:-1]


def _archive_without_scores(data):
    del data["state"]["archive_s"]


def _surrogate_flag_as_text(data):
    data["state"]["g_by_surrogate"] = "yes"


@pytest.mark.parametrize("damage", [_shrink_x, _string_score, _nan_position, _negative_iteration, _bad_history,
                                    _wrong_experts, _negative_radius, _unknown_key, _items_as_bool, _score_as_text,
                                    _archive_too_long, _archive_position_missing, _archive_without_scores,
                                    _surrogate_flag_as_text])
def test_a_malformed_checkpoint_is_refused_with_one_line(damage, checkpointed, capsys):
    recipe, state = checkpointed
    data = json.loads(state.read_text())
    damage(data)
    state.write_text(json.dumps(data))
    capsys.readouterr()
    assert main([str(recipe), *QUICK, "--resume"]) == 2
    line = one_error(capsys)
    assert "damaged" in line and "--force" in line, line


# ------------------------------------------------------------ the first evaluation


def test_a_failure_before_any_progress_does_not_advise_resume(tiny_experts, tmp_path, capsys):
    tiny.write_jsonl(tmp_path / "dev.jsonl", [{"text": "1+1=2"}])
    (tmp_path / "score.py").write_text("def broken(model, tokenizer, rows, device):\n    raise RuntimeError('boom')\n")
    lines = "\n".join(f"  - {p}" for p in tiny_experts)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"name: c\nexperts:\n{lines}\nobjective: {{type: custom, dev: dev.jsonl}}\n"
                      f"output: {{dir: {tmp_path / 'out'}}}\n")
    assert main([str(recipe), *QUICK, "--objective-code", f"{tmp_path / 'score.py'}:broken"]) == 1
    line = one_error(capsys)
    assert "boom" in line and "--resume" not in line and "same command" in line, line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ ci


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, tiny_experts):
    repo = tmp_path / "repo"
    (repo / "recipes" / "data").mkdir(parents=True)
    git(repo, "init", "-q")
    tiny.write_jsonl(repo / "recipes" / "data" / "dev.jsonl", tiny.arithmetic_rows(8))
    experts = "\n".join(f"  - {p}" for p in tiny_experts)
    (repo / "recipes" / "a.yml").write_text(
        f"name: a\nexperts:\n{experts}\nobjective: {{type: loglik, dev: data/dev.jsonl}}\n"
        "swarm: {size: 5, max_iterations: 1}\n")
    outside = tmp_path / "elsewhere.yml"
    outside.write_text((repo / "recipes" / "a.yml").read_text().replace("name: a", "name: elsewhere"))
    (repo / "recipes" / "link.yml").symlink_to(outside)
    fenced = repo / "recipes" / "x\n```\n# Approved by the maintainers\n<img src=x onerror=alert(1)>\n```"
    fenced.mkdir()
    (fenced / "r.yml").write_text((repo / "recipes" / "a.yml").read_text().replace("data/", "../data/"))
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    return repo


def test_ci_changed_lists_a_symlink_leading_outside_without_crashing(repo, capsys):
    assert main(["ci", "changed", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "recipes/a.yml" in out and "recipes/link.yml" in out
    assert len(out) == 3  # the oddly named recipe is one escaped line
    assert ci.outside(repo, repo / "recipes" / "link.yml")


def test_ci_plan_refuses_the_link_and_keeps_names_inside_code(repo, capsys):
    summary = repo.parent / "summary.md"
    assert main(["ci", "plan", "--repo", str(repo), "--summary", str(summary)]) == 1
    text = summary.read_text()
    assert "### `recipes/a.yml`\n" in text
    assert "### `recipes/link.yml`: refused" in text and "outside the repository" in text
    # The hostile folder name stays inside its heading's code span: no line of the summary
    # is the injected heading or HTML, and every fence opened is closed.
    lines = text.splitlines()
    assert "# Approved by the maintainers" not in lines
    assert not any(line.startswith("<img") for line in lines)
    heading = next(line for line in lines if "Approved" in line)
    assert heading.startswith("### `") and "\\n" in heading
    fences = [line for line in lines if line.startswith("```")]
    assert len(fences) % 2 == 0
    assert not (repo.parent / "elsewhere").exists()


def test_ci_run_refuses_the_link(repo, tmp_path, caplog):
    out_root = tmp_path / "ci-out"
    assert main(["ci", "run", "--repo", str(repo), "--recipe", "recipes/link.yml", "--out-root", str(out_root)]) == 1
    assert any("outside the repository" in r.getMessage() for r in caplog.records)
    assert not out_root.exists() or not any(out_root.iterdir())


def test_an_expert_config_nested_too_deeply_is_one_line(tiny_experts, tmp_path, capsys):
    bad = shutil.copytree(tiny_experts[0], tmp_path / "deep")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    recipe = tiny.write_recipe(tmp_path, [bad, tiny_experts[1]])
    assert main([str(recipe), "--dry-run"]) == 2
    assert "config.json" in one_error(capsys)


def test_a_tokenizer_naming_its_own_code_is_refused_without_a_prompt(tiny_experts, tmp_path, capsys, monkeypatch):
    # transformers asks "Do you wish to run the custom code? [y/N]" on a terminal unless told
    # trust_remote_code=False: one "y" from a user at a terminal would run the stranger's code.
    bad = shutil.copytree(tiny_experts[0], tmp_path / "evil")
    config = json.loads((bad / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tok.EvilTokenizer", None]})
    (bad / "tokenizer_config.json").write_text(json.dumps(config))
    canary = tmp_path / "CANARY"
    (bad / "tok.py").write_text(f"open({str(canary)!r}, 'w').write('ran')\n"
                                "from transformers import PreTrainedTokenizerFast\n"
                                "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    recipe = tiny.write_recipe(tmp_path, [bad, tiny_experts[1]])
    assert main([str(recipe), *QUICK]) == 2
    assert "tokenizer" in one_error(capsys)
    assert not asked and not canary.exists() and not (tmp_path / "out").exists()


def test_a_written_model_with_inf_is_never_published(tmp_path):
    from swarm_merge.publish import merge
    from swarm_merge.errors import EvaluationError

    save_file({"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")], dtype=torch.float16)},
              tmp_path / "model.safetensors")
    with pytest.raises(EvaluationError, match="'b'"):
        merge.check_written(tmp_path)
    save_file({"a": torch.ones(3)}, tmp_path / "model.safetensors")
    merge.check_written(tmp_path)  # finite: no error


@pytest.mark.parametrize("how", ["base_model", "reward_model"])
def test_a_model_folder_without_a_config_is_refused_before_anything_is_written(how, tiny_recipe, tmp_path, capsys):
    # experts.pull_model_files: the base's config and tokenizer, a reward or judge model; a folder that is
    # not a saved model is one line, exit 2, and the output folder is never made.
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")  # a weights file is not enough
    if how == "base_model":
        recipe, flags = tiny_recipe(f"base_model: {empty}\n"), []
    else:
        recipe, flags = tiny_recipe(), ["--set", "objective.type=reward", "--set", f"objective.reward_model={empty}"]
    assert exit_code([str(recipe), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{how.split('_')[0]}" in err[0] and "no config.json there" in err[0], err
    assert not (tmp_path / "out").exists()
