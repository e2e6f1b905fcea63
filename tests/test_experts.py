"""Indexing local expert folders: which files hold the weights (shard index,
model.safetensors, stray copies), and which config.json files are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from swarm_merge.cli import main
from swarm_merge.errors import ExpertError
from swarm_merge.experts import INDEX_FILE, index_folder, pull_expert
from swarm_merge.recipe import ExpertRef

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def make_sharded(src: Path, dest: Path, *, consolidated: bool = True) -> dict:
    """A copy of the expert folder ``src`` saved as two shards and their index, plus (like many
    Mistral-style Hub repos) a ``consolidated.safetensors`` holding the same tensors again;
    returns the weight_map."""
    shutil.copytree(src, dest)
    state = load_file(str(dest / "model.safetensors"))
    (dest / "model.safetensors").unlink()
    names = sorted(state)
    parts = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    for shard, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(dest / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in parts.items() for k in keys}
    total = sum(t.numel() * t.element_size() for t in state.values())
    (dest / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if consolidated:
        save_file(state, str(dest / "consolidated.safetensors"), metadata={"format": "pt"})
    return weight_map


def one_copy(folder: Path) -> tuple[int, int]:
    """(parameters, bytes) of the model.safetensors in ``folder``."""
    state = load_file(str(folder / "model.safetensors"))
    return sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values())


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "; " in message, message  # one line: the problem; the fix
    return message


# ------------------------------------------------------------- weight files


def test_index_names_the_shards_and_stray_copies_are_ignored(tiny_experts, tmp_path):
    folder = tmp_path / "sharded"
    weight_map = make_sharded(tiny_experts[0], folder)
    expert = pull_expert(ExpertRef(model=str(folder)))
    params, nbytes = one_copy(tiny_experts[0])
    assert expert.num_parameters == params and expert.nbytes == nbytes  # one copy, not two
    assert set(expert.tensors) == set(weight_map)
    assert {Path(t.file).name for t in expert.tensors.values()} == set(SHARDS)
    for name, info in expert.tensors.items():
        assert Path(info.file).name == weight_map[name]


def test_model_safetensors_wins_over_stray_files_without_an_index(tiny_experts, tmp_path):
    folder = tmp_path / "single"
    shutil.copytree(tiny_experts[0], folder)
    shutil.copy(folder / "model.safetensors", folder / "consolidated.safetensors")
    _, tensors = index_folder(folder, "'single'")
    assert {Path(t.file).name for t in tensors.values()} == {"model.safetensors"}
    assert sum(t.numel for t in tensors.values()) == one_copy(tiny_experts[0])[0]


def test_without_index_or_model_safetensors_every_non_adapter_file_is_read(tiny_experts, tmp_path):
    folder = tmp_path / "loose"
    shutil.copytree(tiny_experts[0], folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    save_file({k: state[k] for k in names[:3]}, str(folder / "part-a.safetensors"))
    save_file({k: state[k] for k in names[3:]}, str(folder / "part-b.safetensors"))
    save_file({"lora_A": state[names[0]]}, str(folder / "adapter_model.safetensors"))
    _, tensors = index_folder(folder, "'loose'")
    assert set(tensors) == set(state)
    assert {Path(t.file).name for t in tensors.values()} == {"part-a.safetensors", "part-b.safetensors"}


def _drop_shard(folder: Path) -> None:
    (folder / SHARDS[1]).unlink()


def _drop_tensor(folder: Path) -> None:
    state = load_file(str(folder / SHARDS[1]))
    state.pop(sorted(state)[0])
    save_file(state, str(folder / SHARDS[1]))


def _write_index(text: str):
    return lambda folder: (folder / INDEX_FILE).write_text(text)


@pytest.mark.parametrize("damage, message", [
    (_drop_shard, f"names shard '{SHARDS[1]}', which is not in"),
    (_drop_tensor, "which does not hold it"),
    (_write_index('{"weight_map": '), "is not valid JSON"),
    (_write_index('{"metadata": {}}'), "has no weight_map"),
    (_write_index('{"weight_map": {"lm_head.weight": "../other/model.safetensors"}}'),
     "names shard '../other/model.safetensors', which is not a *.safetensors file beside the index"),
], ids=["missing-shard", "missing-tensor", "not-json", "no-weight-map", "outside"])
def test_a_broken_index_is_refused_in_one_line(damage, message, tiny_experts, tmp_path):
    folder = tmp_path / "broken"
    make_sharded(tiny_experts[0], folder)
    damage(folder)
    with pytest.raises(ExpertError) as exc:
        pull_expert(ExpertRef(model=str(folder)))
    line = assert_one_line(exc)
    assert message in line and INDEX_FILE in line
    assert "consolidated" not in line  # the stray copy is not a way out


# --------------------------------------------------------------- config.json


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


REMOTE_MAP = {"AutoConfig": "configuration_swarmy.SwarmyConfig",
              "AutoModelForCausalLM": "modeling_swarmy.SwarmyForCausalLM"}
REMOTE = "needs remote code (trust_remote_code), which swarm_merge never runs; "


@pytest.mark.parametrize("edit, message, remote", [
    (lambda f: (f / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}'),
     "config.json is not UTF-8 text (byte 36); re-save it as UTF-8", False),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json holds a JSON list, not an object; re-save", False),
    (lambda f: (f / "config.json").write_text('"llama"'), "config.json holds a JSON str, not an object", False),
    (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON", False),
    (lambda f: _edit_config(f, model_type="swarmy", auto_map=REMOTE_MAP),
     "model_type 'swarmy' is unknown to transformers", True),
    (lambda f: _edit_config(f, model_type="swarmy"), "or upgrade transformers if 'swarmy' is newer than it", True),
    (lambda f: _edit_config(f, model_type=None, auto_map=REMOTE_MAP), "config.json has no model_type and its auto_map",
     True),
    (lambda f: _edit_config(f, model_type="t5", auto_map=REMOTE_MAP), "model_type 't5' has no causal-LM class", True),
    (lambda f: _edit_config(f, model_type="t5"), "model_type 't5' has no causal language model class", False),
    (lambda f: _edit_config(f, model_type=None), "config.json has no model_type, so transformers cannot tell", False),
    (lambda f: _edit_config(f, architectures=None), "config.json names no architecture, and mergekit needs exactly one",
     False),
    (lambda f: _edit_config(f, architectures=["LlamaForCausalLM", "LlamaModel"]), "names ['LlamaForCausalLM', 'Llama",
     False),
], ids=["not-utf8", "list", "string", "not-json", "remote-code", "unknown-type", "auto-map-only",
        "remote-code-known-type", "not-causal", "no-model-type", "no-architectures", "two-architectures"])
def test_a_config_swarm_merge_cannot_use_exits_2_in_one_line(edit, message, remote, tiny_recipe, tiny_experts,
                                                            tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_experts[1], bad)
    edit(bad)
    with pytest.raises(ExpertError) as exc:
        pull_expert(ExpertRef(model=str(bad)))
    line = assert_one_line(exc)
    assert message in line
    assert (REMOTE in line) == remote
    if "config.json" in message and "model_type" not in message:
        assert str(bad / "config.json") in line  # names the file

    assert main([str(tiny_recipe(experts=[tiny_experts[0], bad]))]) == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("mergekit-swarm: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_remote_code_refusal_names_the_fix(tiny_experts, tmp_path):
    bad = tmp_path / "custom"
    shutil.copytree(tiny_experts[1], bad)
    _edit_config(bad, model_type="swarmy", auto_map=REMOTE_MAP)
    with pytest.raises(ExpertError, match=r"needs remote code \(trust_remote_code\), which swarm_merge never runs; "
                                          r"use an expert of an architecture transformers supports, "
                                          r"or upgrade transformers if 'swarmy' is newer than it$"):
        pull_expert(ExpertRef(model=str(bad)))


def test_a_known_model_type_with_an_auto_map_is_built_by_transformers_itself(tiny_experts, tmp_path):
    """transformers uses its own class for a model_type it knows unless trust_remote_code=True
    (never passed): a leftover auto_map is harmless."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "with-auto-map"
    shutil.copytree(tiny_experts[1], folder)
    _edit_config(folder, auto_map=REMOTE_MAP)
    expert = pull_expert(ExpertRef(model=str(folder)))
    assert expert.config["auto_map"] == REMOTE_MAP and expert.tensors
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM"
