"""swarm_merge: Model Swarms (Feng et al., 2024) as a mergekit merge method.

A particle swarm searches affine combinations of expert models for the one
that scores best on a small dev set, then writes it with mergekit.

Python use::

    from swarm_merge import load_recipe, run, RunOptions
    report = run(load_recipe("recipe.yml"), RunOptions(out_dir="out/x"))
"""

from swarm_merge.options import VERSION as __version__
from swarm_merge.errors import (  # noqa: E402
    DataError,
    EvaluationError,
    ExpertError,
    ExpertMismatchError,
    HubError,
    InputError,
    OutputError,
    RecipeError,
    SwarmMergeError,
)
from swarm_merge.options import RunOptions  # noqa: E402
from swarm_merge.recipe import Recipe, load_recipe  # noqa: E402


def run(recipe, options=None, **kwargs):
    """Run a recipe end to end (see :func:`swarm_merge.pipeline.run`)."""
    from swarm_merge.pipeline import run as _run

    return _run(recipe, options or RunOptions(), **kwargs)


__all__ = [
    "__version__",
    "Recipe",
    "RunOptions",
    "load_recipe",
    "run",
    "SwarmMergeError",
    "InputError",
    "RecipeError",
    "ExpertError",
    "ExpertMismatchError",
    "DataError",
    "HubError",
    "EvaluationError",
    "OutputError",
]
