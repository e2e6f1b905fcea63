"""How to run here: device, memory, output policy. Not part of the recipe, which
says only what to search and travels between machines."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

__all__ = ["RunOptions", "OneLineParser", "VERSION"]

# swarm_merge.__version__ (here, at the bottom layer, so swarm.json can name it without importing the package
# top; pyproject.toml's version must match: tests/test_cli.py checks).
VERSION = "0.1.0"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (like every other error of the tool) and exit 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


@dataclass(frozen=True)
class RunOptions:
    """Options of one run (the CLI's flags)."""

    out_dir: Optional[str] = None  # overrides the recipe's output.dir
    resume: bool = False  # continue from swarm-state.json in the out dir
    force: bool = False  # start over in an out dir that holds something else
    dry_run: bool = False  # validate, print the plan, write nothing
    device: str = "auto"  # auto | cpu | cuda[:N]
    cache_dir: Optional[str] = None  # Hub download cache (default: the HF cache)
    push_to_hub: Optional[str] = None  # overrides output.push_to_hub
    progress: bool = True
    eval_mode: str = "auto"  # auto | in-memory | streaming
    max_memory: Optional[int] = None  # bytes the evaluation may hold (auto mode); None: 70% of available
    baselines: bool = False  # also run random search and CMA-ES at the swarm's budget (`compare`)
    seeds: int = 1  # with baselines: every stochastic method at this many seeds
    objective_code: Optional[str] = None  # path.py:function for `type: custom` objectives (never from a recipe)
    allow_task_code: bool = False  # lm_eval task YAML may run its Python hooks (`!function`); never from a recipe
    allow_benchmark_tasks: bool = False  # an lm_eval objective may search on a public benchmark (the card says so)
    check_token: bool = True  # a push needs a Hub token; `ci plan` (a pull request: no secrets) plans without one
