"""The errors swarm_merge raises on purpose.

Every message is one line that names the problem and the fix. The CLI maps
:class:`InputError` subclasses to exit code 2 (bad recipe, experts or data) and
everything else to exit code 1 (a failure at run time).
"""

from __future__ import annotations

__all__ = [
    "SwarmMergeError",
    "InputError",
    "RecipeError",
    "ExpertError",
    "ExpertMismatchError",
    "DataError",
    "TokenError",
    "HubError",
    "EvaluationError",
    "OutputError",
]


class SwarmMergeError(Exception):
    """Base class of every error swarm_merge raises deliberately."""


class InputError(SwarmMergeError, ValueError):
    """Bad input from the user: the CLI exits with code 2."""


class RecipeError(InputError):
    """The recipe file is missing, malformed, or fails validation."""


class ExpertError(InputError):
    """An expert cannot be found or read (folder, files, Hub repo)."""


class ExpertMismatchError(ExpertError):
    """Experts that cannot be merged: different architectures or tensor shapes."""


class DataError(InputError):
    """A dev/test data file is missing, empty or malformed."""


class OutputError(InputError):
    """The output directory cannot be used as asked (holds another run, ...)."""


class TokenError(InputError):
    """A push needs a Hub token and none was found (exit 2, like any missing input)."""


class HubError(SwarmMergeError):
    """A Hub call failed at run time (network, server). Pull errors caused by the
    recipe (unknown repo, revision, access) are :class:`ExpertError` instead."""


class EvaluationError(SwarmMergeError):
    """Evaluating a model failed in a way the search cannot recover from."""
