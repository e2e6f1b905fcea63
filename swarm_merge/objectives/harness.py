"""lm_eval objectives: a task of lm-evaluation-harness scored on the particle's model, its task folder refused
where it would run code (unless --allow-task-code) and a public benchmark refused unless asked for."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch


from swarm_merge.objectives.rows import Example, Score

LOG = logging.getLogger(__name__)


_TASK_MANAGERS: Dict[Optional[str], Any] = {}
LM_EVAL_INSTALL = "pip install 'swarm-merge[lm-eval]'"


def release() -> None:
    """Forget the lm-eval task indexes loaded so far (the end of a run)."""
    _TASK_MANAGERS.clear()


def lm_eval_tasks(include_path: Optional[str]):
    """lm-evaluation-harness's TaskManager (built-in tasks plus ``include_path``), made once per run."""
    from swarm_merge.errors import InputError

    if include_path not in _TASK_MANAGERS:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise InputError(f"objective type lm_eval needs lm-evaluation-harness: {LM_EVAL_INSTALL}") from None
        _TASK_MANAGERS[include_path] = TaskManager(include_path=include_path, verbosity="ERROR")
    return _TASK_MANAGERS[include_path]


@contextlib.contextmanager
def _in_task_folder(include_path: Optional[str]):
    """Run the harness from ``include_path``, so a task YAML's relative ``data_files`` are read
    relative to its own folder (the harness reads them relative to the working directory,
    which would tie a recipe to the folder it is run from). Restored afterwards."""
    if not include_path:
        yield
        return
    here = os.getcwd()
    os.chdir(include_path)
    try:
        yield
    finally:
        os.chdir(here)


class _TaskCode:
    """A task YAML value under a tag that is not plain data (``!function utils.x``,
    ``!!python/name:...``): lm-evaluation-harness's loader would import and run it."""

    def __init__(self, tag: str, text: str):
        self.tag, self.text = tag.replace("tag:yaml.org,2002:", "!!"), text

    def __str__(self) -> str:
        return f"{self.tag} {self.text}".strip()


def _task_yaml_loader():
    """yaml's safe loader on the parser the harness uses (libyaml when present, as in
    lm_eval/tasks/_yaml_loader.py, so both read the same tree), keeping any other tag as
    :class:`_TaskCode` data instead of resolving it."""
    import yaml

    class Loader(yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader):
        pass

    def tagged(loader, node):
        return _TaskCode(node.tag, loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else "")

    Loader.add_constructor(None, tagged)  # None: every tag the safe loader does not know
    return Loader


# Task config keys that make the harness run code other than its own (lm_eval/tasks/_factory.py,
# lm_eval/api/task.py, datasets, transformers' generate), whatever their value...
_CODE_KEYS = {
    "class": "class (a Python task class)",
    "custom_dataset": "custom_dataset (a Python function building the dataset)",
    "custom_generate": "custom_generate (generation code from a repository)",
}
# ...and the ones that do when true.
_CODE_SWITCHES = {
    "trust_remote_code": "trust_remote_code (a dataset's or model's own code)",
    "unsafe_code": "unsafe_code (runs the code the model writes)",
    "hf_evaluate": "hf_evaluate (HF evaluate downloads and runs the metric's script)",
}


def _is_dataset_script(value: str, folders: Sequence[Path]) -> bool:
    """``dataset_path`` naming a loading script: a .py file, or a folder holding one
    (datasets resolves it from the working directory: include_path while scoring)."""
    if value.endswith(".py"):
        return True
    return any((folder / Path(value).expanduser()).is_dir() and any((folder / Path(value).expanduser()).glob("*.py"))
               for folder in folders)


def _hook_in(value, key: str, folders: Sequence[Path], metrics, seen: set) -> Optional[str]:  # noqa: C901 (one case per hook)
    """The first code hook in a task config ``value`` (at ``key``), described; None when it is all data."""
    if isinstance(value, _TaskCode):
        return f"{key}: {value}"
    if isinstance(value, (dict, list)):
        if id(value) in seen:  # YAML aliases share objects: walk each once
            return None
        seen.add(id(value))
    if isinstance(value, list):
        return next(filter(None, (_hook_in(v, key, folders, metrics, seen) for v in value)), None)
    if not isinstance(value, dict):
        return None
    for k, v in value.items():
        if isinstance(k, _TaskCode):
            return f"the key {k}"
        if k in _CODE_KEYS:
            return _CODE_KEYS[k]
        if k in _CODE_SWITCHES and v:
            return _CODE_SWITCHES[k]
        if k == "metric_list" and isinstance(v, list):
            for m in v:
                # A name the harness does not know goes to evaluate.load(name): a metric script, run.
                if isinstance(m, dict) and isinstance(m.get("metric"), str) and m["metric"] not in metrics:
                    return (f"metric: {m['metric']} (not one of the harness's own metrics, so HF evaluate would "
                            "load and run its script)")
        if k == "dataset_path" and isinstance(v, str) and _is_dataset_script(v, folders):
            return f"dataset_path: {v} (a dataset loading script)"
        if k == "use_prompt" and isinstance(v, str) and ".yaml" in v.split(":")[0]:
            return f"use_prompt: {v} (a prompt file read with PyYAML's full loader)"
        found = _hook_in(v, str(k), folders, metrics, seen)
        if found:
            return found
    return None


def _refuse_task_code(include_path: str) -> None:
    """Refuse a task folder that would make lm-evaluation-harness run code: every *.yaml/*.yml
    under ``include_path`` (the harness indexes them all) and what they ``include:``, read as data.

    Raises:
        InputError: a code hook (named with its file), an include outside ``include_path`` and
            the harness's own tasks folder, or a file that does not parse.
    """
    import yaml

    from swarm_merge.errors import InputError

    try:
        import lm_eval
        import lm_eval.api.metrics  # noqa: F401  (registers the harness's metrics)
        from lm_eval.api.registry import metric_registry
    except ImportError:
        raise InputError(f"objective type lm_eval needs lm-evaluation-harness: {LM_EVAL_INSTALL}") from None
    root = Path(include_path).resolve()
    builtin = (Path(lm_eval.__file__).parent / "tasks").resolve()  # the installed package's own tasks: its code
    loader = _task_yaml_loader()
    done: set = set()

    def refuse(path: Path, hook: str):
        return InputError(f"lm-eval task file {path} uses {hook}; a recipe's task folder runs no code of its own: "
                          "drop it, or pass --allow-task-code if you trust this folder")

    def scan(path: Path) -> None:
        path = path.expanduser().resolve()  # as lm_eval's load_yaml: includes are relative to the real file
        if path in done:
            return
        done.add(path)
        try:
            with path.open("rb") as fh:
                cfg = yaml.load(fh, Loader=loader)  # noqa: S506 (a safe loader: other tags stay data)
            hook = _hook_in(cfg, "", (root, path.parent), metric_registry, set())
        except (OSError, yaml.YAMLError, RecursionError) as exc:
            detail = " ".join(str(exc).split())[:160]
            raise InputError(f"lm-eval task file {path} cannot be read as YAML ({detail}); fix or remove it") from None
        if hook:
            raise refuse(path, hook.lstrip(": "))
        includes = cfg.get("include") if isinstance(cfg, dict) else None
        for inc in includes if isinstance(includes, list) else [] if includes is None else [includes]:
            if not isinstance(inc, str):
                continue  # the harness cannot follow it either
            target = (Path(inc) if Path(inc).is_absolute() else path.parent / inc).expanduser().resolve()
            if target.is_relative_to(root):
                scan(target)
            elif not target.is_relative_to(builtin):
                raise refuse(path, f"include: {inc} (a file outside include_path, unchecked)")

    if root.is_relative_to(builtin):
        return  # the harness's own tasks folder
    for found in sorted({p for pattern in ("**/*.yaml", "**/*.yml") for p in Path(include_path).glob(pattern)}):
        scan(found)


@contextlib.contextmanager
def _sandboxed_templates():
    """Task templates (doc_to_text, doc_to_target, doc_to_choice, description, ...) rendered in
    jinja2's immutable sandbox while the harness scores: a template can read the row's fields,
    not reach Python internals (``cycler.__init__.__globals__.os``).

    The harness renders every task template through ``lm_eval.utils.apply_template``, which
    reads the module-level ``lm_eval.utils.env`` at each call; that Environment is swapped for
    a sandboxed one with the same options and filters for the duration, then put back, so the
    harness is unchanged for anything else in the process. Flag or no flag: templates are data.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval import utils as harness

    plain = harness.env
    options = ("block_start_string", "block_end_string", "variable_start_string", "variable_end_string",
               "comment_start_string", "comment_end_string", "line_statement_prefix", "line_comment_prefix",
               "trim_blocks", "lstrip_blocks", "newline_sequence", "keep_trailing_newline", "undefined", "finalize",
               "autoescape", "loader")
    sandbox = ImmutableSandboxedEnvironment(**{name: getattr(plain, name) for name in options})
    sandbox.filters.update(plain.filters)  # the harness's regex_replace
    sandbox.tests.update(plain.tests)
    harness.env = sandbox
    try:
        yield
    finally:
        harness.env = plain


# datasets' generic builders: what they read is in data_files, not in the name.
GENERIC_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "xml", "sql"})


def benchmark_of(manager, task: str) -> Optional[str]:
    """Why searching on lm-eval ``task`` would tune on a public benchmark's scored split (None: it would not).

    A benchmark is one of the harness's own tasks (its tasks folder holds public benchmarks), a tag or
    group with one among its members, or a task of one's own that reads the dataset and split one of
    the harness's own tasks scores (``cais/mmlu``'s ``test`` under another name). Like mergekit-evolve's
    check, by what the task is, not by its name alone.
    """
    import lm_eval

    builtin = (Path(lm_eval.__file__).parent / "tasks").resolve()
    index = manager.task_index

    def own(entry) -> bool:
        return entry.yaml_path is not None and Path(entry.yaml_path).resolve().is_relative_to(builtin)

    def source(cfg):
        # A Hub dataset by its id; a generic builder (json, csv, ...) by the files it reads.
        dataset = cfg.get("dataset_path")
        if dataset in GENERIC_BUILDERS:
            kwargs = cfg.get("dataset_kwargs")
            return dataset, repr(kwargs.get("data_files") if isinstance(kwargs, dict) else None)
        return dataset, None

    def scored_split(cfg) -> Optional[str]:
        return cfg.get("test_split") or cfg.get("validation_split")

    def reason(name: str, seen: set) -> Optional[str]:
        entry = index.get(name)
        if entry is None or name in seen:
            return None
        seen.add(name)
        if own(entry):
            return f"{name} is one of lm-evaluation-harness's own tasks (a public benchmark)"
        cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
        members = [e.name for e in index.values() if name in e.tags] if entry.kind.name == "TAG" else [
            t for t in (cfg.get("task") or []) if isinstance(t, str)] if isinstance(cfg.get("task"), list) else []
        for member in members:
            found = reason(member, seen)
            if found:
                return f"{name} includes {found}"
        dataset, split = cfg.get("dataset_path"), scored_split(cfg)
        if isinstance(dataset, str) and split:
            for other in sorted(index.values(), key=lambda e: e.name):
                ocfg = other.cfg if isinstance(other.cfg, dict) else {}
                if own(other) and source(ocfg) == source(cfg) and scored_split(ocfg) == split:
                    return (f"{name} reads the {split} split of {dataset}, which lm-evaluation-harness's own "
                            f"{other.name} scores (a public benchmark)")
        return None

    return reason(task, set())


def check_lm_eval(objective, allow_code: bool = False, allow_benchmark: bool = False) -> None:
    """The harness is installed and knows the task names (before the search), the task
    folder runs no code unless ``allow_code`` (``--allow-task-code``), and the task searched on
    is no public benchmark's scored split unless ``allow_benchmark`` (``--allow-benchmark-tasks``)."""
    from swarm_merge.errors import InputError

    if objective.include_path and not Path(objective.include_path).is_dir():
        raise InputError(f"objective include_path {objective.include_path!r} is not a folder; point at the folder "
                         "holding your task YAML files")
    if objective.include_path and not allow_code:
        # Before the TaskManager reads the folder (its index reads YAML without importing, but
        # nothing of the folder should reach the harness's own loader before this check).
        _refuse_task_code(objective.include_path)
    manager = lm_eval_tasks(objective.include_path)
    for task in filter(None, (objective.task, objective.test_task)):
        if task not in manager.all_tasks:
            raise InputError(f"lm-eval task {task!r} is unknown to lm-evaluation-harness (include_path: "
                             f"{objective.include_path or 'none'}); check the name, or add its YAML to include_path")
    found = benchmark_of(manager, objective.task)
    if found and not allow_benchmark:
        raise InputError(f"objective task {found}: searching on it would tune the merge to the very numbers people "
                         "compare; search on data of your own (or a train split), or pass --allow-benchmark-tasks "
                         "(the card then says the search saw it)")


@contextlib.contextmanager
def _quiet_harness():
    """While the harness scores: no environment report and no progress bars.

    ``simple_evaluate`` collects a report of the machine (torch's collect_env: subprocesses, about 2 s)
    and runs ``git describe`` on every call, for metadata this tool discards, and draws three bars per
    evaluation; it has no switch for either. So its module-level helpers and the ``tqdm`` each of its
    modules imported are swapped for silent ones for the duration and put back after (bars stay with
    ``-v``, that is a root logger at DEBUG).
    """
    import sys

    from lm_eval import evaluator
    from tqdm import tqdm as bar

    class Silent(bar):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    swaps = [(evaluator, "add_env_info", lambda storage: None), (evaluator, "get_git_commit_hash", lambda: None)]
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        swaps += [(module, "tqdm", Silent) for name, module in list(sys.modules.items())
                  if name.startswith("lm_eval") and getattr(module, "tqdm", None) is bar]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, value in swaps:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@torch.inference_mode()
def score_lm_eval(model, tokenizer, examples, objective, device, batch_size=None) -> Score:
    """The task's metric, computed by lm-evaluation-harness on the live model (nothing written or reloaded)."""
    import lm_eval
    from jinja2.exceptions import SecurityError
    from lm_eval.models.huggingface import HFLM

    from swarm_merge.errors import EvaluationError

    task = examples[0].raw["task"]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or objective.batch_size)
    manager = lm_eval_tasks(objective.include_path)
    with _in_task_folder(objective.include_path), _sandboxed_templates(), _quiet_harness():
        try:
            result = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=manager, num_fewshot=objective.num_fewshot,
                limit=objective.limit, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
        except SecurityError as exc:
            raise EvaluationError(f"lm-eval task {task!r}: a template reached outside jinja2's sandbox "
                                  f"({' '.join(str(exc).split())[:160]}); task templates render sandboxed (the row's "
                                  "fields, no Python internals): fix the template") from None
    found = result["results"][task]
    key = objective.metric if "," in objective.metric else f"{objective.metric},none"
    if key not in found:
        metrics = sorted(k for k, v in found.items() if isinstance(v, (int, float)) and "stderr" not in k)
        raise EvaluationError(f"lm-eval task {task!r} reports no metric {key!r} (it reports {', '.join(metrics)}); "
                              "set objective.metric to one of them")
    n = int(result.get("n-samples", {}).get(task, {}).get("effective", 0))
    return Score(float(found[key]), {}, n)


def benchmarks_searched(recipe) -> List[str]:
    """The public benchmarks the recipe's lm_eval objectives search on (allowed by --allow-benchmark-tasks),
    each as :func:`benchmark_of` says why; checked before (:func:`task_of`), so the harness is there."""
    return [found for o in recipe.components if o.type == "lm_eval"
            for found in [benchmark_of(lm_eval_tasks(o.include_path), o.task)] if found]


def lm_eval_rows(task: str) -> List[Example]:
    """What the evaluator passes for an lm_eval objective: one stand-in row naming the task
    (the harness loads the task's own documents)."""
    return [Example(prompt=f"lm_eval:{task}", raw={"task": task})]
