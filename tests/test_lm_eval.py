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


def test_the_objective_is_the_harness_number_for_the_written_model(tiny_experts, tmp_path):
    recipe = write(tmp_path, tiny_experts, "{type: lm_eval, task: tiny_mc_dev, test_task: tiny_mc_test, "
                                           "include_path: tasks, metric: acc, batch_size: 8}")
    assert cli.main([str(recipe)]) == 0
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
