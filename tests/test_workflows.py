"""The GitHub workflows are safe to run and valid.

zizmor (offline audits: template injection, unpinned actions, persisted
credentials, excessive permissions, ...) and check-jsonschema (GitHub's
workflow schema, vendored in the package) run as the real command-line tools
from this venv, in subprocesses, as CI would run them. Audits disabled on
purpose are named and justified in .github/zizmor.yml (none today).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO / ".github" / "workflows"
WORKFLOWS = sorted([*WORKFLOWS_DIR.glob("*.yml"), *WORKFLOWS_DIR.glob("*.yaml")])
ACTIONS = sorted((REPO / ".github" / "actions").glob("*/action.yml"))
BIN = Path(sys.executable).parent  # the venv's bin: the test extra installs the tools there


def tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{path} not found: pip install -e '.[test]' (or make setup)")
    return str(path)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def report(proc: subprocess.CompletedProcess) -> str:
    return f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_there_are_workflows():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "swarm-merge.yml"}


def test_zizmor_finds_nothing():
    proc = run_tool(tool("zizmor"), "--offline", str(WORKFLOWS_DIR.relative_to(REPO)),
                    *(str(a.relative_to(REPO)) for a in ACTIONS))
    assert proc.returncode == 0, report(proc)
    assert ACTIONS and all(a.relative_to(REPO).as_posix() in proc.stderr + proc.stdout for a in ACTIONS), report(proc)


@pytest.mark.parametrize("action", ACTIONS, ids=lambda p: p.parent.name)
def test_action_matches_githubs_schema(action: Path):
    proc = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", str(action))
    assert proc.returncode == 0, report(proc)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_githubs_schema(workflow: Path):
    proc = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(workflow))
    assert proc.returncode == 0, report(proc)


def run_scripts(node, where: str = ""):
    """(location, script) of every `run:` string in a parsed workflow, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "run" and isinstance(value, str):
                yield here, value
            else:
                yield from run_scripts(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from run_scripts(value, f"{where}[{i}]")


def test_run_scripts_finds_steps():
    doc = {"jobs": {"a": {"steps": [{"run": "echo ${{ x }}"}, {"uses": "u"}], "defaults": {"run": {"shell": "bash"}}}}}
    assert list(run_scripts(doc)) == [("jobs.a.steps[0].run", "echo ${{ x }}")]


@pytest.mark.parametrize("workflow", WORKFLOWS + ACTIONS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_expression_expanded_in_run_scripts(workflow: Path):
    # GitHub substitutes ${{ }} into the script text before the shell sees it, so
    # any value there can become code: pass values through env: and use "$VAR".
    doc = yaml.safe_load(workflow.read_text(encoding="utf-8"))
    scripts = list(run_scripts(doc))
    assert scripts, f"{workflow.name} has no run: step"
    bad = [f"{where}: {script!r}" for where, script in scripts if "${{" in script]
    assert not bad, f"${{{{ }}}} in run: scripts of {workflow.name}:\n" + "\n".join(bad)


def test_secrets_never_reach_pull_requests():
    """The job that runs on pull requests names no secret and no environment; every job that
    names a secret is kept off pull requests and takes it from a (protectable) environment."""
    doc = yaml.safe_load((WORKFLOWS_DIR / "swarm-merge.yml").read_text(encoding="utf-8"))
    triggers = doc[True] if True in doc else doc["on"]  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"workflow_dispatch", "push", "pull_request"}
    assert "pull_request_target" not in triggers
    for name, job in doc["jobs"].items():
        text = yaml.safe_dump(job)
        if job["if"] == "github.event_name == 'pull_request'":
            assert "secrets." not in text and "environment" not in job, name
        else:
            assert job["if"] == "github.event_name != 'pull_request'", name
            if "secrets." in text:
                assert job.get("environment"), name


@pytest.mark.parametrize("where", WORKFLOWS + ACTIONS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_ci_commands_in_scripts_parse(where: Path):
    """Every `mergekit-swarm ci ...` line of a script names flags the ci command has."""
    from swarm_merge import ci

    doc = yaml.safe_load(where.read_text(encoding="utf-8"))
    lines = [line.strip() for _, script in run_scripts(doc) for line in script.splitlines()
             if "mergekit-swarm ci " in line]
    for line in lines:
        words = line.split("mergekit-swarm ci ", 1)[1].split()
        flags = [w for w in words if w.startswith("--")]
        args = [words[0]] + [x for f in flags for x in ((f, "x") if f not in ("--push",) else (f,))]
        ci._parser().parse_args(args)  # exits (SystemExit) on an unknown flag
