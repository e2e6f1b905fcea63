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

    def write(extra: str = "", *, objective: str = "loglik", experts=None) -> Path:
        return tiny.write_recipe(tmp_path, experts or tiny_experts, extra, objective=objective)

    return write
