"""A recipe's lm_eval task folder runs no code: Python hooks are refused unless
--allow-task-code, and task templates render in jinja2's sandbox, flag or no flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarm_merge import cli

lm_eval = pytest.importorskip("lm_eval")  # the test extra installs it; `pip install 'swarm-merge[lm-eval]'`

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{doc_to_text}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: {metric}
"""

# A task folder's Python file: it leaves the canary when imported and when any hook is called.
HOSTILE = """import pathlib
CANARY = pathlib.Path({canary!r})
CANARY.write_text("imported")

def process(dataset):
    CANARY.write_text("process_docs ran")
    return dataset

def metric(*args, **kwargs):
    CANARY.write_text("metric ran")
    return 1.0

class Evil:
    def __init__(self, config=None):
        CANARY.write_text("class ran")
"""


def task_yaml(tmp_path, name="tiny_code", extra="", *, doc_to_text="{{prompt}}", metric="acc") -> str:
    rows = [{"prompt": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1), "0"], "answer": 0} for a in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TASK.format(name=name, data=data, doc_to_text=doc_to_text, metric=metric) + extra


def write(tmp_path, experts, yaml_text: str, files=None) -> Path:
    """tasks/tiny_code.yaml (plus ``files``, paths relative to tmp_path) and a recipe scoring it."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_code.yaml").write_text(yaml_text)
    for rel, text in (files or {}).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    lines = "\n".join(f"  - {p}" for p in experts[:2])  # two experts: the fewest evaluations
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"name: taskcode\nexperts:\n{lines}\n"
                      "objective: {type: lm_eval, task: tiny_code, include_path: tasks, metric: acc, batch_size: 8}\n"
                      f"swarm: {{size: 3, max_iterations: 1}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    return recipe


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def hooks(tmp_path):
    """Each code hook of the harness: its id -> (task YAML, extra files, what the refusal names)."""
    canary = str(tmp_path / "canary")
    utils = {"tasks/utils.py": HOSTILE.format(canary=canary)}
    return {
        "process_docs": (task_yaml(tmp_path, extra="process_docs: !function utils.process\n"), utils, "!function"),
        "metric": (task_yaml(tmp_path, metric="!function utils.metric\n    aggregation: mean\n"
                                              "    higher_is_better: true"), utils, "!function"),
        "class": (task_yaml(tmp_path, extra="class: !function utils.Evil\n"), utils, "class"),
        "include": ("include: ../evil/base.yaml\ntask: tiny_code\n",
                    {"evil/base.yaml": task_yaml(tmp_path, "evil", "process_docs: !function utils.process\n"),
                     "evil/utils.py": HOSTILE.format(canary=canary)}, "include"),
        "trust_remote_code": (task_yaml(tmp_path).replace("dataset_kwargs:\n", "dataset_kwargs:\n"
                                                          "  trust_remote_code: true\n"), {}, "trust_remote_code"),
        "dataset_script": (task_yaml(tmp_path).replace("dataset_path: json", "dataset_path: ./evil_ds"),
                           {"tasks/evil_ds/evil_ds.py": HOSTILE.format(canary=canary)}, "dataset_path"),
        "python_tag": (task_yaml(tmp_path, extra="process_docs: !!python/name:os.system\n"), {}, "python/name"),
        "hf_evaluate": (task_yaml(tmp_path, metric="exact_match\n    hf_evaluate: true"), {}, "hf_evaluate"),
        "unknown_metric": (task_yaml(tmp_path, metric="./evil_metric"),
                           {"tasks/evil_metric/evil_metric.py": HOSTILE.format(canary=canary)}, "evil_metric"),
        "custom_generate": (task_yaml(tmp_path, extra="generation_kwargs:\n  custom_generate: evil/repo\n"), {},
                            "custom_generate"),
        "unsafe_code": (task_yaml(tmp_path, extra="unsafe_code: true\n"), {}, "unsafe_code"),
        "custom_dataset": (task_yaml(tmp_path, extra="custom_dataset: !function utils.process\n"), utils,
                           "custom_dataset"),
    }


RUN_CASES = ["process_docs", "metric", "class", "include", "trust_remote_code", "dataset_script", "unknown_metric"]
DRY_CASES = RUN_CASES + ["python_tag", "hf_evaluate", "custom_generate", "unsafe_code", "custom_dataset"]


@pytest.mark.parametrize("case, dry_run", [(c, False) for c in RUN_CASES] + [(c, True) for c in DRY_CASES],
                         ids=[f"{c}-run" for c in RUN_CASES] + [f"{c}-dry-run" for c in DRY_CASES])
def test_task_code_is_refused(case, dry_run, tiny_experts, tmp_path, capsys):
    yaml_text, files, hook = hooks(tmp_path)[case]
    recipe = write(tmp_path, tiny_experts, yaml_text, files)
    assert cli.main([str(recipe)] + (["--dry-run"] if dry_run else [])) == 2
    line = one_line(capsys)
    assert "--allow-task-code" in line and hook in line, line
    assert ("base.yaml" if case == "include" else "tiny_code.yaml") in line, line
    assert not (tmp_path / "canary").exists()
    assert not (tmp_path / "out").exists()


def test_a_template_escaping_the_sandbox_fails_cleanly(tiny_experts, tmp_path, capsys):
    """Jinja reaching os.system through a global's __globals__: no command runs, with or without the flag."""
    import jinja2

    canary = tmp_path / "canary"
    escape = "{{{{ cycler.__init__.__globals__.os.system('touch {}') }}}}{{{{prompt}}}}".format(canary)
    recipe = write(tmp_path, tiny_experts, task_yaml(tmp_path, doc_to_text=escape))
    assert cli.main([str(recipe), "--allow-task-code"]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mergekit-swarm:")]
    assert len(errors) == 1, errors  # one line (transformers' own progress bars aside)
    line = errors[0]
    assert "tiny_code" in line and "sandbox" in line, line
    assert not canary.exists()
    assert type(lm_eval.utils.env) is jinja2.Environment  # the harness's own, restored after scoring


def test_allow_task_code_lets_a_trusted_folder_run_its_hooks(tiny_experts, tmp_path):
    ran = tmp_path / "ran"
    utils = ("import pathlib\n\ndef process(dataset):\n"
             f"    pathlib.Path({str(ran)!r}).write_text('yes')\n    return dataset\n")
    recipe = write(tmp_path, tiny_experts, task_yaml(tmp_path, extra="process_docs: !function utils.process\n"),
                   {"tasks/utils.py": utils})
    assert cli.main([str(recipe), "--allow-task-code"]) == 0
    assert ran.read_text() == "yes"
    assert (tmp_path / "out" / "swarm.json").is_file()


def test_the_harness_own_tasks_may_be_included(tmp_path):
    """A built-in task's YAML (with its !function: the installed package's code) is not the recipe's code;
    an include outside both include_path and the harness's tasks is."""
    from swarm_merge import objectives
    from swarm_merge.errors import InputError

    builtin = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    assert "!function" in builtin.read_text()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(f"include: {builtin}\ntask: mine\n")
    objectives.harness._refuse_task_code(str(tasks))  # nothing to refuse
    (tmp_path / "elsewhere.yaml").write_text("task: plain\ndataset_path: json\n")
    (tasks / "mine.yaml").write_text("include: ../elsewhere.yaml\ntask: mine\n")
    with pytest.raises(InputError, match="include: ../elsewhere.yaml .*--allow-task-code"):
        objectives.harness._refuse_task_code(str(tasks))
