"""type: lm_eval: an lm-evaluation-harness task scored on the live model."""

from __future__ import annotations

import json
import os

import pytest

from swarm_merge import cli, report as report_mod

lm_eval = pytest.importorskip("lm_eval")  # the test extra installs it; `pip install 'swarm-merge[lm-eval]'`

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def write(tmp_path, experts, objective: str):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, offset in (("tiny_mc_dev", 0), ("tiny_mc_test", 5)):
        rows = [{"prompt": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1), "0"], "answer": 0}
                for a in range(offset, offset + 8)]
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=data))
    lines = "\n".join(f"  - {p}" for p in experts)
    path = tmp_path / "recipe.yml"
    path.write_text(f"name: lmeval\nexperts:\n{lines}\nobjective: {objective}\n"
                    f"swarm: {{size: 5, max_iterations: 1}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    return path


def test_the_objective_is_the_harness_number_for_the_written_model(tiny_experts, tmp_path, capfd):
    recipe = write(tmp_path, tiny_experts, "{type: lm_eval, task: tiny_mc_dev, test_task: tiny_mc_test, "
                                           "include_path: tasks, metric: acc, batch_size: 8}")
    assert cli.main([str(recipe)]) == 0
    err = capfd.readouterr().err  # the harness's bars and its `git describe` stay off the terminal
    assert "requests" not in err and "git" not in err and "%|" not in err, err[-500:]
    report = report_mod.read(tmp_path / "out" / "swarm.json")
    assert report.data.dev_rows == 8 and report.data.test_rows == 8
    from lm_eval.tasks import TaskManager

    for task, split in (("tiny_mc_dev", report.scores.winner.dev), ("tiny_mc_test", report.scores.winner.test)):
        got = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'out'},device=cpu",
                                      tasks=[task], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      log_samples=False, bootstrap_iters=0)
        assert split.utility == pytest.approx(got["results"][task]["acc,none"], abs=1e-9)


@pytest.mark.parametrize("objective, message", [
    ("{type: lm_eval, task: no_such_task_xyz, include_path: tasks}", "unknown to lm-evaluation-harness"),
    ("{type: lm_eval, task: tiny_mc_dev, dev: x.jsonl}", "not dev:/test: files"),
    ("{type: loglik, dev: x.jsonl, task: tiny_mc_dev}", "task applies to type: lm_eval"),
    ("{type: lm_eval, task: tiny_mc_dev, include_path: nowhere}", "is not a folder"),
])
def test_lm_eval_refusals(objective, message, tiny_experts, tmp_path, capsys):
    recipe = write(tmp_path, tiny_experts, objective)
    assert cli.main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_lora_experts_the_objective_is_the_harness_number_for_the_written_adapter(tmp_path):
    """lm_eval on the live PEFT model equals the harness on base + the written adapter (peft=)."""
    import tiny

    base = tiny.make_base(tmp_path / "models")
    adapters = tiny.make_adapters(tmp_path / "models", base, 3)
    recipe = write(tmp_path, adapters, "{type: lm_eval, task: tiny_mc_dev, test_task: tiny_mc_test, "
                                       "include_path: tasks, metric: acc, batch_size: 8}")
    assert cli.main([str(recipe)]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    report = report_mod.read(out / "swarm.json")
    from lm_eval.tasks import TaskManager

    got = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={base},peft={out},device=cpu",
                                  tasks=["tiny_mc_test"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  log_samples=False, bootstrap_iters=0)
    assert report.scores.winner.test.utility == pytest.approx(got["results"]["tiny_mc_test"]["acc,none"], abs=1e-9)


def test_relative_data_files_are_read_from_the_task_folder(tiny_experts, tmp_path, monkeypatch):
    """A task YAML's relative data_files resolve against include_path, whatever the working directory."""
    recipe = write(tmp_path, tiny_experts, "{type: lm_eval, task: tiny_mc_dev, include_path: tasks}")
    tasks = tmp_path / "tasks"
    for name in ("tiny_mc_dev", "tiny_mc_test"):
        (tmp_path / f"{name}.jsonl").rename(tasks / f"{name}.jsonl")
        yaml = tasks / f"{name}.yaml"
        yaml.write_text(yaml.read_text().replace(str(tmp_path / f"{name}.jsonl"), f"{name}.jsonl"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main([str(recipe)]) == 0
    assert report_mod.read(tmp_path / "out" / "swarm.json").data.dev_rows == 8
    assert os.getcwd() == str(elsewhere)  # restored


OWN_MMLU = """task: my_algebra
dataset_path: cais/mmlu
dataset_name: abstract_algebra
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
"""


@pytest.fixture(scope="module")
def own_tasks(tmp_path_factory):
    """One task folder for the benchmark checks (the harness indexes it once: ~8 s): the tiny tasks, a renamed
    MMLU test split, its train split, and a group holding a harness task."""
    root = tmp_path_factory.mktemp("own")
    write(root, ["./a", "./b"], "{type: lm_eval, task: tiny_mc_dev, include_path: tasks}")
    tasks = root / "tasks"
    (tasks / "my_algebra.yaml").write_text(OWN_MMLU)
    (tasks / "my_train.yaml").write_text(OWN_MMLU.replace("my_algebra", "my_train").replace(
        "test_split: test", "test_split: auxiliary_train"))
    (tasks / "my_mix.yaml").write_text("group: my_mix\ntask:\n  - tiny_mc_dev\n  - hellaswag\n")
    return tasks


def own_recipe(tmp_path, tasks, task: str, extra: str = ""):
    from swarm_merge import recipe as recipe_mod

    path = tmp_path / "recipe.yml"
    path.write_text(f"name: b\nexperts: [./a, ./b]\nobjective: {{type: lm_eval, task: {task}, include_path: {tasks}"
                    f"{extra}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    return recipe_mod.load_recipe(path)


def test_searching_on_a_harness_task_is_one_line_naming_the_flag(tiny_experts, tmp_path, capsys):
    path = write(tmp_path, tiny_experts, "{type: lm_eval, task: arc_easy, include_path: tasks}")
    assert cli.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arc_easy is one of lm-evaluation-harness's own tasks" in err[0], err
    assert "--allow-benchmark-tasks" in err[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("task, why", [
    ("arc_easy", "arc_easy is one of lm-evaluation-harness's own tasks"),
    ("my_algebra", "my_algebra reads the test split of cais/mmlu, which lm-evaluation-harness's own mmlu"),
    ("my_mix", "my_mix includes hellaswag is one of"),
])
def test_searching_on_a_public_benchmark_is_refused_unless_allowed(task, why, own_tasks, tmp_path):
    """Like mergekit-evolve: a dev objective that is a public benchmark's scored split is refused by what the
    task reads (the harness's own task, a group holding one, its dataset and split under another name)."""
    from swarm_merge import objectives
    from swarm_merge.publish import card
    from swarm_merge.errors import InputError

    recipe = own_recipe(tmp_path, own_tasks, task)
    with pytest.raises(InputError, match="--allow-benchmark-tasks") as refused:
        objectives.task_of(recipe)
    assert why in str(refused.value)
    # Allowed, the report names it and the card says the search saw it.
    objectives.task_of(recipe, allow_benchmark=True)
    (found,) = objectives.benchmarks_searched(recipe)
    assert found.startswith(why)
    from test_report import sample

    text = str(card.render_card(sample().model_copy(update={"data": report_mod.DataRecord(
        dev_rows=3, benchmarks_searched=[found])}), recipe_yaml="", mergekit_yaml="", plot=None))
    assert "The search tuned on public benchmarks" in text and "--allow-benchmark-tasks" in text


def test_a_benchmark_as_the_held_out_test_task_or_a_train_split_is_fine(own_tasks, tmp_path):
    from swarm_merge import objectives

    for task, extra in (("tiny_mc_dev", ", test_task: arc_easy"), ("my_train", "")):
        recipe = own_recipe(tmp_path, own_tasks, task, extra)
        objectives.task_of(recipe)  # reporting on a benchmark is what it is for
        assert objectives.benchmarks_searched(recipe) == []
