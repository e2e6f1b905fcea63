"""The CLI end to end on tiny real models: what a user runs and gets."""

import io
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

import swarm_merge
from swarm_merge import RunOptions, load_recipe
from swarm_merge.cli import main
from swarm_merge.publish.card import md as card_md
from swarm_merge.report import read as read_report
from swarm_merge.space import tensor_groups

import tiny


def expert_tensors(paths):
    return [load_file(str(Path(p) / "model.safetensors")) for p in paths]


def assert_is_affine_merge(out_dir: Path, expert_paths, atol=1e-5):
    """The written model equals sum_k a_k E_k per tensor, with swarm.json's coefficients."""
    report = read_report(out_dir / "swarm.json")
    merged = load_file(str(out_dir / "model.safetensors"))
    experts = expert_tensors(expert_paths)
    assert set(merged) == set(experts[0])
    groups, _ = tensor_groups(sorted(experts[0]), granularity=report.recipe.swarm.granularity,
                              layer_groups=report.recipe.swarm.layer_groups)
    matrix = report.coefficients.matrix()
    for name, tensor in merged.items():
        want = sum(float(c) * e[name].double() for c, e in zip(matrix[groups[name]], experts))
        assert torch.allclose(tensor.double(), want, atol=atol), name
    return report


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_experts):
    """One finished run of the tiny recipe, in process; (folder, recipe path, stdout)."""
    root = tmp_path_factory.mktemp("finished")
    recipe = tiny.write_recipe(root, tiny_experts)
    out = io.StringIO()
    swarm_merge.run(load_recipe(recipe), RunOptions(progress=False), out=out)
    return root / "out", recipe, out.getvalue()


def test_run_writes_a_loadable_affine_merge_with_report_and_card(finished_run, tiny_experts):
    out, recipe, stdout = finished_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "mergekit_config.yml", "swarm.json",
                 "swarm-state.json", "README.md", "swarm_history.png", ".swarm-merge.json"):
        assert (out / name).is_file(), name
    assert not (out / ".swarm-staging").exists()
    report = assert_is_affine_merge(out, tiny_experts)
    a = np.array(report.coefficients.model)
    assert len(a) == 3 and abs(a.sum() - 1) < 1e-9
    names = [r.name for r in report.scores.rows]
    averaged = report.search.average.chosen == "average"  # (then the global best is a row beside the winner)
    assert names == ["expert0", "expert1", "expert2", "uniform average", "swarm winner"] + (
        ["swarm global best"] if averaged else [])
    winner = report.scores.winner
    assert report.search.average.global_best >= max(r.dev.utility for r in report.scores.rows[:4]) - 1e-12
    assert set(winner.test.groups) == {"add", "sum"}
    assert np.allclose(winner.coefficients, [report.coefficients.model])
    history = report.search.history
    assert history[0].iteration == 0 and len(history) == report.search.iterations + 1
    assert report.data.dev_rows == 12 and report.data.test_rows == 12 and report.data.test_rows_in_dev == 0
    # Published paths are relative to the recipe's folder: no absolute local path in the report.
    assert [e.model for e in report.experts] == [os.path.relpath(p, recipe.parent) for p in tiny_experts]
    assert str(recipe.parent) not in (out / "swarm.json").read_text()
    assert str(recipe.parent) not in (out / "README.md").read_text()
    assert str(recipe.parent) not in (out / "mergekit_config.yml").read_text()
    # Strict JSON: no NaN / Infinity anywhere.
    json.loads((out / "swarm.json").read_text(), parse_constant=_refuse)
    json.loads((out / "swarm-state.json").read_text(), parse_constant=_refuse)
    # The final table on stdout.
    assert "swarm winner" in stdout and "uniform average" in stdout
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
    assert "the test set never was" in card.text
    # How the winner was chosen, and how the search started.
    # (with racing, among the positions scored on every dev row: the ones not dropped after a stage)
    s = report.search
    full = s.distinct_positions_scored - (s.racing.dropped if s.racing else 0)
    # The winner: the bagged average (swarm.average_top) unless the global best beats it by more than one
    # standard error of their paired row differences; the average is one more position scored on every row.
    a = s.average
    assert a is not None and a.rule == "bag" and 2 <= a.top <= full - 1
    assert a.standard_error is not None and a.standard_error >= 0
    assert a.global_best == max(h.global_best for h in s.history)
    if a.chosen == "average":
        assert a.global_best - a.average <= a.standard_error and report.scores.winner.dev.utility == a.average
        assert s.chosen_by.startswith(f"the average of {a.top} positions weighted by how often each is the best")
        assert f"of the {full - 1} distinct positions" in s.chosen_by
        best = next(r for r in report.scores.rows if r.kind == "global_best")  # shown beside it, on test too
        assert best.dev.utility == a.global_best and best.test is not None
    else:
        assert a.global_best - a.average > a.standard_error and report.scores.winner.dev.utility == a.global_best
        assert s.chosen_by.startswith(f"the best dev utility of the {full - 1} distinct positions")
        assert not any(r.kind == "global_best" for r in report.scores.rows)
    assert s.racing is not None and 0 < s.racing.dropped + s.racing.finished <= s.evaluations - 5  # the moving ones
    assert s.items < s.distinct_positions_scored * report.data.dev_rows
    assert (s.racing.confidence, s.racing.gain, s.racing.neighbours) == (0.95, "any", 4)  # the recipe's race, as run
    # The card says what the search spent and which update ran (the paper's phi are unused under SPSO).
    assert f"{s.items} dev rows scored (racing: {s.racing.dropped} of" in card.text
    assert "SPSO-2011" in card.text and "inertia / cognitive" not in card.text
    assert card_md(report.search.chosen_by) in card.text  # (Markdown-escaped on the card)
    # When the global best was found: the first iteration whose global best is its dev score,
    # what had been spent by then (on the card too).
    f = s.found
    first = next(h for h in s.history if h.global_best == a.global_best)
    assert (f.iteration, f.evaluations, f.items) == (first.iteration, first.evaluations, first.items)
    assert f.evaluations <= s.evaluations and f.items <= s.items
    assert f"| global best found at | iteration {f.iteration} of {s.iterations}: after {f.evaluations} of {s.evaluations} " \
           f"evaluations, {f.items} of {s.items} dev rows; nothing after it scored higher |" in card.text
    assert "around the uniform soup (soup + N(0, 0.3) per coefficient)" in card.text
    # The recipe block is the recipe as written (paths relative to its folder), not every default.
    block = yaml.safe_load(card.text.split("The recipe, as run")[1].split("```yaml")[1].split("```")[0])
    assert block["experts"] == [os.path.relpath(p, recipe.parent) for p in tiny_experts]
    assert set(block["swarm"]) <= set(yaml.safe_load(recipe.read_text())["swarm"]) | {"seed"}
    assert "reward_model" not in block["objective"] and "lora_space" not in block["swarm"]


def _refuse(constant):
    raise AssertionError(f"{constant} in a report: not strict JSON")


def test_the_cards_number_is_what_the_written_model_scores(finished_run):
    """Reload the published model with plain transformers, score it on dev: the
    winner's dev utility in swarm.json (and on the card) is what it gets."""
    from transformers import AutoModelForCausalLM

    from swarm_merge import objectives
    from swarm_merge.evaluate import load_tokenizer

    out, _, _ = finished_run
    report = read_report(out / "swarm.json")
    recipe = load_recipe(finished_run[1])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    dev = objectives.load_examples(recipe.objective.dev, recipe.objective.type)
    got = objectives.score(model, load_tokenizer(out), dev, recipe.objective, torch.device("cpu"))
    assert got.utility == pytest.approx(report.scores.winner.dev.utility, abs=1e-5)
    test = objectives.load_examples(recipe.objective.test, recipe.objective.type)
    got = objectives.score(model, load_tokenizer(out), test, recipe.objective, torch.device("cpu"))
    assert got.utility == pytest.approx(report.scores.winner.test.utility, abs=1e-5)
    assert f"{report.scores.winner.dev.utility:.4f}" in (out / "README.md").read_text()


def test_mergekit_config_reproduces_the_weights(finished_run, tmp_path, monkeypatch):
    from mergekit.scripts.run_yaml import main as run_yaml

    from swarm_merge.publish.merge import register

    register()
    out, recipe, _ = finished_run
    # Local experts are written relative to the recipe's folder: run from there.
    monkeypatch.chdir(recipe.parent)

    def mergekit_yaml(config_path, dest):
        run_yaml([str(config_path), str(dest)], standalone_mode=False)
        return load_file(str(dest / "model.safetensors"))

    a = load_file(str(out / "model.safetensors"))
    b = mergekit_yaml(out / "mergekit_config.yml", tmp_path / "again")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # The registered `swarm` method gives the same weights, and refuses non-affine ones.
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    config["merge_method"] = "swarm"
    config.pop("parameters")
    (tmp_path / "swarm.yml").write_text(yaml.safe_dump(config))
    c = mergekit_yaml(tmp_path / "swarm.yml", tmp_path / "via-swarm")
    assert all(torch.allclose(a[n], c[n], atol=1e-6) for n in a)
    config["models"][0]["parameters"]["weight"] += 0.5
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match="sum to 1"):
        mergekit_yaml(tmp_path / "bad.yml", tmp_path / "bad")


def test_the_mergekit_write_reads_each_expert_tensor_once_without_mapping_files(finished_run, tmp_path, monkeypatch):
    """mergekit memory-maps every expert shard it opens (all of them resident by the end
    of a write); the write reads through PreadShard instead: each stored tensor once."""
    from mergekit.io.loader import TensorLoader

    from swarm_merge import weights
    from swarm_merge.publish import merge
    from swarm_merge.experts import pull_experts

    out, recipe, _ = finished_run
    reads = []
    original = weights.PreadShard.get_tensor

    def counted(self, key):
        reads.append((self.path, key))
        return original(self, key)

    monkeypatch.setattr(weights.PreadShard, "get_tensor", counted)
    experts = pull_experts(load_recipe(recipe).experts)
    report = read_report(out / "swarm.json")
    groups, _ = tensor_groups(sorted(experts[0].tensors), granularity="model")
    merge.write_merge(merge.mergekit_config(experts, report.coefficients.matrix(), groups, dtype="float32",
                                            portable=False), tmp_path / "again")
    stored = {(str(e.tensors[n].file), n) for e in experts for n in e.tensors}
    assert len(reads) == len(set(reads)) and set(reads) == stored
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(a[n].shape == b[n].shape and torch.equal(a[n], b[n]) for n in a)
    assert TensorLoader.get.__func__.__module__ == "mergekit.io.loader"  # restored after the write


def test_layer_granularity_writes_per_group_weights(tiny_recipe, tiny_experts, tmp_path):
    recipe = tiny_recipe("", objective="loglik")
    assert main([str(recipe), "--set", "swarm.granularity=layer", "--set", "swarm.layer_groups=2", "--no-progress"]) == 0
    report = assert_is_affine_merge(tmp_path / "out", tiny_experts)
    per_group = np.array(report.coefficients.per_group)
    assert per_group.shape == (2, 3) and np.allclose(per_group.sum(1), 1)
    assert report.coefficients.groups == ["embeddings + layer 0", "layer 1 + head"]


def test_where_the_average_wins_it_is_written_and_the_global_best_is_a_row_beside_it(tiny_recipe, tiny_experts,
                                                                                      tmp_path, monkeypatch, capsys):
    # swarm.average_top: with the fallback out of reach the average is always the winner (loglik rows: bagged).
    from swarm_merge import swarm

    monkeypatch.setattr(swarm, "AVERAGE_Z", 1e9)
    assert main([str(tiny_recipe("", objective="loglik")), "--no-progress"]) == 0
    report = assert_is_affine_merge(tmp_path / "out", tiny_experts)  # the written weights are the average's
    a = report.search.average
    assert a.chosen == "average" and report.scores.winner.dev.utility == a.average
    best = next(r for r in report.scores.rows if r.kind == "global_best")
    assert best.name == "swarm global best" and best.dev.utility == a.global_best and best.test is not None
    assert best.coefficients != report.scores.winner.coefficients
    assert a.rule == "bag" and report.search.chosen_by.startswith(f"the average of {a.top} positions weighted")
    assert f"of the {a.positions} distinct positions" in report.search.chosen_by
    card = (tmp_path / "out" / "README.md").read_text()
    assert card_md(report.search.chosen_by) in card and "| swarm global best |" in card
    assert "swarm global best" in capsys.readouterr().out


def test_layer_granularity_without_numbered_layers_is_bad_input(tiny_experts):
    # Experts of an architecture whose tensors have no numbered layers: a checkpoint that
    # merely renamed them is refused earlier, for lacking the tensors its config needs
    # (tests/test_weights_guard.py), so the rule is checked on the names themselves.
    from swarm_merge import space
    from swarm_merge.errors import RecipeError

    names = [n.replace("layers.", "block") for n in load_file(str(tiny_experts[0] / "model.safetensors"))]
    with pytest.raises(RecipeError, match="numbered decoder layers"):
        space.tensor_groups(names, granularity="layer", layer_groups=None)


def test_tied_embeddings_and_exact_match(tmp_path, tiny_recipe):
    experts = tiny.make_experts(tmp_path / "tied", 2, tie=True)
    recipe = tiny_recipe(objective="exact_match", experts=experts)
    assert main([str(recipe), "--set", "swarm.size=4", "--no-progress"]) == 0
    assert_is_affine_merge(tmp_path / "out", experts)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_the_terminal_shows_the_tools_lines_and_one_bar(tmp_path, tiny_recipe):
    """Without -v: the tool's lines and the search's one bar on stderr; not transformers' loading and
    writing bars, nor mergekit's "Skipping optional weight" (tied embeddings) on the root logger."""
    experts = tiny.make_experts(tmp_path / "tied", 2, tie=True)
    recipe = tiny_recipe(objective="exact_match", experts=experts)
    env = {**os.environ, "SWARM_MERGE_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "swarm_merge.cli", str(recipe), "--set", "swarm.size=4",
                           "--set", "swarm.max_iterations=2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.strip() for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    ours = ("evaluation: ", "scoring the experts", "writing the merge with mergekit", "swarm: ")
    assert lines and all(line.startswith(ours) for line in lines), [x for x in lines if not x.startswith(ours)]
    assert any(line.startswith("swarm: 100%") for line in lines)
    assert "wrote " in proc.stdout


def test_same_seed_same_result_and_resume_after_kill_9(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    settings = ["--set", "swarm.max_iterations=8", "--set", "swarm.patience=8", "--set", "swarm.size=6"]
    assert main([str(recipe), *settings, "--out", str(tmp_path / "a"), "--no-progress"]) == 0
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
    wall_at_kill = json.loads(state.read_text())["wall_seconds"]  # the killed session's, as last checkpointed
    assert not (tmp_path / "b" / "swarm.json").exists(), "killed before the end"
    assert main([str(recipe), *settings, "--out", str(tmp_path / "b")]) == 2
    assert "--resume" in one_error_line(capsys)  # refuses to overwrite silently
    started = time.monotonic()
    assert main([str(recipe), *settings, "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    resumed_for = time.monotonic() - started
    a = read_report(tmp_path / "a" / "swarm.json")
    b = read_report(tmp_path / "b" / "swarm.json")
    assert b.search.resumed and not a.search.resumed
    assert a.coefficients == b.coefficients
    assert a.scores.winner == b.scores.winner
    assert [h.best for h in a.search.history] == [h.best for h in b.search.history]
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    # The resumed run's wall time counts each session once: the killed session's
    # (from its checkpoint) plus this one's, nothing twice.
    assert wall_at_kill <= b.wall_seconds <= wall_at_kill + resumed_for + 0.01
    assert b.wall_seconds - wall_at_kill >= 0.3 * resumed_for  # this session is counted too
    # A different seed searches differently.
    assert main([str(recipe), *settings, "--out", str(tmp_path / "c"), "--seed", "7", "--no-progress"]) == 0
    c = read_report(tmp_path / "c" / "swarm.json")
    assert c.recipe.swarm.seed == 7 and c.coefficients != a.coefficients


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_dry_run_only_checks_that_one_exists")
    assert main([str(tiny_recipe()), "--dry-run", "--push-to-hub", "me/override"]) == 0
    out = capsys.readouterr().out
    assert "3 experts" in out and "evaluations: at most 20" in out and "estimated weight memory" in out and "one-model" in out
    assert "push to me/override" in out  # the flag, not only the recipe's target
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
    ('{"prompt": " ", "answer": "2"}\n', "'prompt' is empty"),
])
def test_bad_dev_data_exits_2_and_writes_nothing(content, message, tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(objective="exact_match")
    dev = tmp_path / "data" / "dev.jsonl"
    if content is None:
        dev.unlink()
    else:
        dev.write_text(content)
    assert main([str(recipe)]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()




def test_cuda_without_a_gpu_is_a_clear_error(tiny_recipe, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main([str(tiny_recipe()), "--device", "cuda"]) == 1
    assert "no CUDA GPU" in one_error_line(capsys)
    assert not (tmp_path / "out" / "swarm.json").exists()


def test_push_without_token_fails_before_the_search(tiny_recipe, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert main([str(tiny_recipe()), "--push-to-hub", "me/merged"]) == 2
    assert "needs a Hub token" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_the_package_version_is_pyprojects():
    # swarm.json names swarm_merge.VERSION (options.py); the wheel's version comes from pyproject.toml
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

    import swarm_merge

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert swarm_merge.__version__ == project["version"]
