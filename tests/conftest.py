import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_experts(tmp_path_factory):
    """Three tiny Llama experts (untied) sharing a base, in a session temp dir."""
    return tiny.make_experts(tmp_path_factory.mktemp("experts"), 3)


@pytest.fixture
def tiny_recipe(tmp_path, tiny_experts):
    """A runnable recipe over the tiny experts, with dev/test data; returns a writer."""
    tiny.write_jsonl(tmp_path / "data" / "dev.jsonl", tiny.arithmetic_rows(12))
    tiny.write_jsonl(tmp_path / "data" / "test.jsonl", tiny.arithmetic_rows(12, offset=5))

    def write(extra: str = "", *, objective: str = "loglik", experts=None) -> Path:
        paths = experts or tiny_experts
        lines = "\n".join(f"  - {p}" for p in paths)
        text = (
            f"name: tiny\nexperts:\n{lines}\n"
            f"objective:\n  type: {objective}\n  dev: data/dev.jsonl\n  test: data/test.jsonl\n  batch_size: 64\n"
            "  max_new_tokens: 3\n"
            "swarm:\n  size: 5\n  max_iterations: 3\n  patience: 3\n"
            f"output:\n  dir: {tmp_path / 'out'}\n" + extra
        )
        path = tmp_path / "recipe.yml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real console entry point in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "swarm_merge.cli", *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
