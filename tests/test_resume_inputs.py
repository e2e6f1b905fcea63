"""--resume refuses a checkpoint when anything that changes a score changed since it was
written: not only the experts' weights and the recipe, but every model folder's small files
(configs, tokenizer files, chat templates, generation config) and the reward model."""

from __future__ import annotations

import json
import shutil

import pytest

import tiny
from swarm_merge.cli import main

SETTINGS = ["--set", "swarm.size=4", "--set", "swarm.max_iterations=1", "--no-progress"]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return tiny.make_reward_model(tmp_path_factory.mktemp("reward"))


@pytest.fixture
def finished(tmp_path, tiny_experts, reward_model):
    """A finished run over private copies of the experts and the reward model (the tests edit them)."""
    experts = [shutil.copytree(p, tmp_path / "experts" / p.name) for p in tiny_experts]
    rm = shutil.copytree(reward_model, tmp_path / "rm")
    tiny.write_jsonl(tmp_path / "data" / "dev.jsonl", [{"prompt": f"{a}+{a}="} for a in range(4)])
    lines = "\n".join(f"  - {p}" for p in experts)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"name: resume\nexperts:\n{lines}\nobjective: {{type: reward, dev: data/dev.jsonl, "
                      f"reward_model: {rm}, max_new_tokens: 2}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    assert main([str(recipe), *SETTINGS]) == 0
    assert (tmp_path / "out" / "swarm-state.json").is_file()
    return recipe, experts, rm


def _edit_json(path, **changes):
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


EDITS = {
    "expert config": lambda e, rm: _edit_json(e[1] / "config.json", rms_norm_eps=1e-3),
    "expert tokenizer": lambda e, rm: _edit_json(e[0] / "tokenizer_config.json", model_max_length=7),
    "generation config": lambda e, rm: _edit_json(e[0] / "generation_config.json", max_new_tokens=1),
    "chat template": lambda e, rm: (e[0] / "chat_template.jinja").write_text("{{ messages[0]['content'] }}"),
    "reward model config": lambda e, rm: _edit_json(rm / "config.json", rms_norm_eps=1e-3),
    "reward model weights": lambda e, rm: _flip_reward_weights(rm),
}


def _flip_reward_weights(rm):
    from safetensors.torch import load_file, save_file

    tensors = load_file(rm / "model.safetensors")
    tensors["score.weight"] = -tensors["score.weight"]
    save_file(tensors, rm / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("what", sorted(EDITS))
def test_resume_refuses_a_checkpoint_of_other_inputs(finished, what, capsys):
    recipe, experts, rm = finished
    state = recipe.parent / "out" / "swarm-state.json"
    before = state.read_bytes()
    EDITS[what](experts, rm)
    capsys.readouterr()
    assert main([str(recipe), *SETTINGS, "--resume"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mergekit-swarm: error:")]
    assert len(errors) == 1 and "different inputs" in errors[0] and "--force" in errors[0], errors
    assert state.read_bytes() == before  # the checkpoint is kept for when the inputs are restored


def test_resume_with_unchanged_inputs_continues(finished):
    recipe, _, _ = finished
    assert main([str(recipe), *SETTINGS, "--resume"]) == 0
