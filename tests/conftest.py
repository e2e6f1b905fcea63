import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: one torch thread each, or they spin at each
    # other's barriers (two 2-thread torch processes on 2 cores run several times slower). Set before
    # torch starts its pool; subprocesses a test starts inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The longest modules (about 30-100 s each on 2 cores, `--durations`), longest first.
HEAVY = ("test_hub.py", "test_demo.py", "test_distributed.py", "test_lm_eval.py", "test_bench_scale.py")


def pytest_collection_modifyitems(config, items):
    """The longest modules first. With `--dist loadscope` each worker takes whole modules in collection
    order, so a long module collected last would run alone at the end while the other worker idles."""
    rank = {name: i for i, name in enumerate(HEAVY)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY)))  # stable: each module's order kept


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
