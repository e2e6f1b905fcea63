"""Merges run from CI: which recipes a change touches, their plans, their runs.

``mergekit-swarm ci changed|plan|run`` is what the GitHub workflows call
(.github/workflows/swarm-merge.yml, .github/actions/merge/action.yml), so the
logic lives here, tested offline, and not as shell inside YAML:

- ``changed --base REF``: the recipes under ``recipes/`` that the change from
  REF to HEAD touches: the recipe file itself, or any local input it reads (data
  files, expert folders, task folders, reward/judge model folders).
- ``plan``: the ``--dry-run`` plan of each (experts, pinned revisions, budget,
  memory) as Markdown, for the job summary a reviewer reads on a pull request.
- ``run``: each recipe, end to end, into ``OUT_ROOT/<recipe>``; ``--push`` pushes
  those whose recipe names ``output.push_to_hub`` (without it nothing is pushed,
  whatever the recipe says).

A recipe file is a ``*.yml`` / ``*.yaml`` whose top level has ``experts:``
(task YAML files and other configs next to recipes are not recipes).
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import yaml

from swarm_merge.errors import InputError, SwarmMergeError
from swarm_merge.options import OneLineParser

__all__ = ["changed_files", "recipe_files", "changed_recipes", "main"]

LOG = logging.getLogger(__name__)
NULL_SHA = "0" * 40  # github.event.before of a branch's first push


def _git(repo: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise InputError("git is not installed; the ci commands read the change from git") from None
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise InputError(f"git {' '.join(args)} failed ({why}); check --base, and fetch the history "
                         "(actions/checkout with fetch-depth: 0)")
    return proc.stdout


def changed_files(repo: Path, base: Optional[str], head: str = "HEAD") -> Optional[List[str]]:
    """Paths (relative to the repo) changed from ``base`` to ``head``; None when there is no
    base to compare with (no --base, or a branch's first push): then every recipe counts."""
    if not base or base == NULL_SHA:
        return None
    # base...head: the change since the merge base, what a pull request shows.
    out = _git(repo, "diff", "--name-only", "-z", "--no-renames", f"{base}...{head}")
    return [p for p in out.split("\0") if p]


def _is_recipe(path: Path) -> bool:
    """A YAML mapping with ``experts:``, read as load_recipe reads it (size and alias
    bounds: a tracked file comes from a pull request)."""
    from swarm_merge.recipe import MAX_RECIPE_BYTES, bounded_yaml

    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            return True  # let the plan or run say what is wrong with it
        data = bounded_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return True  # broken: let the plan or run say what is wrong with it
    return isinstance(data, dict) and "experts" in data


def outside(repo: Path, path: Path) -> bool:
    """Whether ``path`` (a tracked file, maybe a symlink) resolves to a place outside ``repo``."""
    try:
        path.resolve().relative_to(Path(repo).resolve())
    except ValueError:
        return True
    return False


def _outside_error(repo: Path, path: Path) -> InputError:
    return InputError(f"{_shown(repo, path)} is a symlink to a file outside the repository; commit the recipe "
                      "itself instead of a link")


def _shown(repo: Path, path: Path) -> str:
    """A tracked path relative to the repo as one safe line (control characters escaped)."""
    try:
        rel = Path(path).relative_to(repo).as_posix()
    except ValueError:
        rel = str(path)
    return rel.encode("unicode_escape").decode("ascii") if not rel.isprintable() else rel


def recipe_files(repo: Path, recipes_dir: str = "recipes") -> List[Path]:
    """Every recipe file tracked under ``recipes_dir`` (sorted); a tracked symlink that leads
    outside the repo is listed unread (the plan and the run refuse it)."""
    out = _git(repo, "ls-files", "-z", "--", recipes_dir)
    paths = [repo / p for p in out.split("\0") if p.endswith((".yml", ".yaml"))]
    return sorted(p for p in paths if (p.is_symlink() and outside(repo, p)) or (p.is_file() and _is_recipe(p)))


def _inputs(recipe_path: Path) -> List[Path]:
    """The local inputs a recipe reads (resolved), or [] when it does not load."""
    from swarm_merge.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_path)
    except (SwarmMergeError, OSError):
        return []
    return [Path(p).expanduser().resolve() for _, p in recipe.local_inputs()]


def changed_recipes(repo: Path, base: Optional[str], head: str = "HEAD", recipes_dir: str = "recipes") -> List[Path]:
    """The recipes the change touches: the file itself, or a local input it reads."""
    repo = Path(repo).resolve()
    recipes = recipe_files(repo, recipes_dir)
    changed = changed_files(repo, base, head)
    if changed is None:
        return recipes
    touched = {repo / p for p in changed} | {(repo / p).resolve() for p in changed}
    found = []
    for recipe in recipes:
        if recipe in touched or recipe.resolve() in touched or outside(repo, recipe):
            found.append(recipe)  # (a link leading outside is always planned: as refused)
            continue
        for inp in _inputs(recipe):
            if any(t == inp or inp in t.parents for t in touched):
                found.append(recipe)
                break
    return found


def _out_name(repo: Path, recipe: Path, recipes_dir: str) -> str:
    """``recipes/team/mix.yml`` -> ``team-mix``: one output folder per recipe file."""
    try:
        rel = recipe.resolve().relative_to((repo / recipes_dir).resolve())
    except ValueError:  # a --recipe outside recipes_dir
        return recipe.stem
    return "-".join(rel.with_suffix("").parts)


def _plan(recipe: Path) -> str:
    from swarm_merge.options import RunOptions
    from swarm_merge.pipeline import run
    from swarm_merge.recipe import load_recipe

    buf = io.StringIO()
    # A pull request has no secrets: plan the push without a token.
    run(load_recipe(recipe), RunOptions(dry_run=True, progress=False, check_token=False), out=buf)
    return buf.getvalue()


def plan(repo: Path, recipes: Sequence[Path], summary: Optional[Path], out=None) -> int:
    """The dry-run plan of each recipe as Markdown (to ``out`` and appended to ``summary``);
    1 if any recipe is refused (all are tried)."""
    out = out or sys.stdout
    lines = ["## mergekit-swarm: what this change would merge", ""]
    failed = 0
    if not recipes:
        lines.append("No recipe is touched by this change.")
    for recipe in recipes:
        title = _code_span(_shown(repo, recipe))
        try:
            if outside(repo, recipe):
                raise _outside_error(repo, recipe)
            text = _plan(recipe)
        except SwarmMergeError as exc:
            failed += 1
            lines += [f"### {title}: refused", "", *_fenced(str(exc)), ""]
            continue
        lines += [f"### {title}", "", *_fenced(text.rstrip()), ""]
    markdown = "\n".join(lines) + "\n"
    out.write(markdown)
    if summary is not None:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(markdown)
    return 1 if failed else 0


# Everything in the plan comes from the pull request (file names, recipe values,
# error messages quoting them): it goes into code spans and fences that it cannot
# close, so nothing in it renders as Markdown or HTML in the job summary reviewers read.
def _code_span(text: str) -> str:
    text = " ".join(text.splitlines())
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fenced(text: str) -> List[str]:
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return [f"{fence}text", text, fence]


def run_recipes(repo: Path, recipes: Sequence[Path], out_root: Path, *, push: bool, recipes_dir: str,
                run: Callable[[List[str]], int]) -> int:
    """Run each recipe into ``out_root/<name>`` (resuming a checkpoint found there) with ``run``
    (the CLI's main, given by the CLI: this module sits below it); with ``push``, push those whose
    recipe names output.push_to_hub. 1 if any failed (all are tried)."""
    failed = 0
    for recipe in recipes:
        if outside(repo, recipe):
            LOG.error("mergekit-swarm: error: %s", _outside_error(repo, recipe))
            failed += 1
            continue
        dest = Path(out_root) / _out_name(repo, recipe, recipes_dir)
        argv = [str(recipe), "--out", str(dest), "--no-progress"]
        if (dest / "swarm-state.json").is_file():
            argv.append("--resume")  # a cancelled CI run, its cache restored
        if not push:
            argv += ["--set", "output.push_to_hub=null"]
        LOG.info("ci: %s -> %s%s", recipe, dest, "" if push else " (no push)")
        code = run(argv)
        if code != 0:
            failed += 1
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mergekit-swarm ci", description="Recipes run from CI (see docs/ci.md).")
    sub = p.add_subparsers(dest="what", required=True)
    for name, text in (("changed", "print the recipes the change touches"),
                       ("plan", "print each touched recipe's --dry-run plan as Markdown"),
                       ("run", "run each touched recipe (or --recipe), optionally pushing")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--base", help="the commit the change starts from (none: every recipe)")
        s.add_argument("--head", default="HEAD", help="the commit the change ends at (default HEAD)")
        s.add_argument("--recipe", action="append", default=[], metavar="PATH",
                       help="this recipe instead of the changed ones (repeatable)")
        s.add_argument("--recipes-dir", default="recipes", help="where recipes live (default recipes)")
        s.add_argument("--repo", default=".", help="the git checkout (default .)")
        if name == "plan":
            s.add_argument("--summary", type=Path, default=os.environ.get("GITHUB_STEP_SUMMARY") or None,
                           help="append the Markdown here too (default $GITHUB_STEP_SUMMARY)")
        if name == "run":
            s.add_argument("--out-root", type=Path, default=Path("out/ci"), help="outputs go to OUT_ROOT/<recipe>")
            s.add_argument("--push", action="store_true", help="push recipes that name output.push_to_hub")
    return p


def main(argv: Sequence[str], run: Callable[[List[str]], int]) -> int:
    args = _parser().parse_args(argv)
    repo = Path(args.repo).resolve()
    if args.recipe:
        recipes = []
        for r in args.recipe:
            path = Path(r) if Path(r).is_absolute() else repo / r
            if not path.is_file():
                raise InputError(f"--recipe {r!r}: no such file in {repo}; give a recipe path relative to the repo")
            recipes.append(path)
    else:
        recipes = changed_recipes(repo, args.base, args.head, args.recipes_dir)
    if args.what == "changed":
        for r in recipes:
            print(_shown(repo, r))
        return 0
    if args.what == "plan":
        return plan(repo, recipes, args.summary)
    return run_recipes(repo, recipes, args.out_root, push=args.push, recipes_dir=args.recipes_dir, run=run)
