"""The README and docs/ show only commands the tests run (or say they do not), and their links resolve.

(The site itself is built by `make docs`, mkdocs --strict, in .ci/run: a broken link or anchor between
pages fails there.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = "not run by the tests"

# Each command shown in a shell block, and the test that runs it (or what runs it).
TESTED = {
    "make demo": "tests/test_demo.py::test_demo_recipe_end_to_end",  # recipes/demo.yml through the CLI
    "make test": ".ci/run",
    "mergekit-swarm recipe.yml --dry-run": "tests/test_cli.py::test_dry_run_prints_the_plan_and_writes_nothing",
    "mergekit-swarm recipe.yml": "tests/test_cli.py::test_run_writes_a_loadable_affine_merge_with_report_and_card",
    "mergekit-swarm recipe.yml --resume": "tests/test_cli.py::test_same_seed_same_result_and_resume_after_kill_9",
    "mergekit-swarm recipe.yml --num-processes 4":
        "tests/test_distributed.py::test_two_processes_equal_one_search_and_comparison",
    "accelerate launch --num_processes 4 --multi_gpu -m swarm_merge recipe.yml":
        "tests/test_distributed.py::test_two_machines_equal_one_process",
}


def shell_commands(page: Path):
    """(command, comment) of every line of the page's bash/sh/shell/console blocks."""
    fence = None
    for line in page.read_text(encoding="utf-8").splitlines():
        mark = re.match(r"^(`{3,})(\w*)", line)
        if mark and fence is None:
            fence = mark.group(2) or "text"
            continue
        if mark:
            fence = None
            continue
        if fence in ("bash", "sh", "shell", "console") and line.strip() and not line.lstrip().startswith("#"):
            command, _, comment = line.partition("  #")
            yield " ".join(command.lstrip("$ ").split()), comment


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_is_run_by_a_test_or_says_it_is_not(page):
    for command, comment in shell_commands(page):
        if NOT_RUN in comment:
            continue
        assert command in TESTED, (f"{page.name}: `{command}` is run by no test: add the test to TESTED in "
                                   f"{Path(__file__).name}, or end the line with `  # {NOT_RUN}`")


def test_the_tests_named_exist():
    for where in TESTED.values():
        path, _, name = where.partition("::")
        assert (REPO / path).is_file(), where
        if name:
            tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
            assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, where
    assert "make test" in (REPO / ".ci/run").read_text()


def test_the_readme_opens_with_the_two_commands_and_its_links_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first = list(shell_commands(REPO / "README.md"))[:2]
    assert [c for c, _ in first] == ["make demo", "make test"]
    assert readme.index("make demo") < 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), target
    assert len(readme.splitlines()) < 150, "the README fits on a few screens: move the rest into docs/"
