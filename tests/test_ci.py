"""`mergekit-swarm ci`: the recipes a git change touches, their plans, their runs (offline)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import tiny
from swarm_merge import ci, cli


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path, tiny_experts):
    """A git repo with two recipes (b reads recipes/data/b-dev.jsonl), a task YAML that is
    not a recipe, and a README; returns (repo, first commit)."""
    repo = tmp_path / "repo"
    (repo / "recipes" / "data").mkdir(parents=True)
    (repo / "recipes" / "tasks").mkdir()
    git(repo, "init", "-q")
    rows = tiny.arithmetic_rows(8)
    tiny.write_jsonl(repo / "recipes" / "data" / "a-dev.jsonl", rows)
    tiny.write_jsonl(repo / "recipes" / "data" / "b-dev.jsonl", rows)
    experts = "\n".join(f"  - {p}" for p in tiny_experts)
    for name in ("a", "b"):
        (repo / "recipes" / f"{name}.yml").write_text(
            f"name: {name}\nexperts:\n{experts}\nobjective: {{type: loglik, dev: data/{name}-dev.jsonl}}\n"
            "swarm: {size: 5, max_iterations: 1}\noutput: {push_to_hub: org/never-pushed}\n")
    (repo / "recipes" / "tasks" / "t.yaml").write_text("task: t\ndataset_path: json\n")
    (repo / "README.md").write_text("hi\n")
    return repo, commit(repo, "first")


def changed(repo: Path, base: str | None) -> list:
    return [p.relative_to(repo).as_posix() for p in ci.changed_recipes(repo, base)]


def test_changed_recipes_follow_the_recipe_and_its_inputs(repo):
    repo, first = repo
    assert changed(repo, None) == ["recipes/a.yml", "recipes/b.yml"]  # no base: every recipe
    assert changed(repo, ci.NULL_SHA) == ["recipes/a.yml", "recipes/b.yml"]  # a branch's first push
    assert changed(repo, first) == []

    tiny.write_jsonl(repo / "recipes" / "data" / "b-dev.jsonl", tiny.arithmetic_rows(9))
    second = commit(repo, "b's data")
    assert changed(repo, first) == ["recipes/b.yml"]  # an input of b changed

    (repo / "recipes" / "a.yml").write_text((repo / "recipes" / "a.yml").read_text().replace("size: 5", "size: 6"))
    (repo / "recipes" / "tasks" / "t.yaml").write_text("task: t2\ndataset_path: json\n")
    (repo / "README.md").write_text("changed\n")
    commit(repo, "a, a task file, the readme")
    assert changed(repo, second) == ["recipes/a.yml"]  # the task YAML is not a recipe
    assert changed(repo, first) == ["recipes/a.yml", "recipes/b.yml"]

    (repo / "recipes" / "a.yml").unlink()
    commit(repo, "a removed")
    assert changed(repo, second) == []  # a deleted recipe is not run


def test_changed_command_prints_paths(repo, capsys):
    repo, first = repo
    (repo / "recipes" / "b.yml").write_text((repo / "recipes" / "b.yml").read_text() + "# note\n")
    commit(repo, "b")
    assert cli.main(["ci", "changed", "--repo", str(repo), "--base", first]) == 0
    assert capsys.readouterr().out.split() == ["recipes/b.yml"]


def test_a_bad_base_is_one_clear_line(repo, capsys):
    repo, _ = repo
    assert cli.main(["ci", "changed", "--repo", str(repo), "--base", "no-such-ref"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base" in err[0] and "fetch-depth: 0" in err[0]


def test_plan_is_markdown_for_the_summary_and_names_refusals(repo, capsys):
    repo, first = repo
    (repo / "recipes" / "b.yml").write_text((repo / "recipes" / "b.yml").read_text().replace("size: 5", "size: 1"))
    (repo / "recipes" / "a.yml").write_text((repo / "recipes" / "a.yml").read_text() + "# touched\n")
    commit(repo, "a touched, b broken")
    summary = repo.parent / "summary.md"
    summary.write_text("earlier\n")
    code = cli.main(["ci", "plan", "--repo", str(repo), "--base", first, "--summary", str(summary)])
    assert code == 1  # b is refused; a is still planned
    text = summary.read_text()
    assert text.startswith("earlier\n")  # appended, as $GITHUB_STEP_SUMMARY wants
    assert "### `recipes/a.yml`\n" in text and "estimated weight memory" in text and "eval mode" in text
    assert "push to org/never-pushed" in text  # planned without a token (a pull request has none)
    assert "### `recipes/b.yml`: refused" in text and "swarm.size" in text
    assert text[len("earlier\n"):] == capsys.readouterr().out
    assert not list(repo.rglob("swarm.json"))  # a plan writes nothing


def test_run_writes_each_recipe_and_pushes_only_when_asked(repo, monkeypatch):
    repo, first = repo
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out_root = repo.parent / "out"
    # the recipes name output.push_to_hub, yet without --push nothing is pushed (no token needed)
    assert cli.main(["ci", "run", "--repo", str(repo), "--recipe", "recipes/a.yml", "--out-root", str(out_root)]) == 0
    report = json.loads((out_root / "a" / "swarm.json").read_text())
    assert report["recipe"]["output"]["push_to_hub"] is None
    assert (out_root / "a" / "model.safetensors").is_file() and not (out_root / "b").exists()
    # with --push, a push needs the token: refused before any work
    assert cli.main(["ci", "run", "--repo", str(repo), "--recipe", "recipes/b.yml", "--out-root", str(out_root),
                     "--push"]) == 1
    assert not (out_root / "b").exists()
