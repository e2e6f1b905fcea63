"""``python -m swarm_merge RECIPE.yml ...``: the ``mergekit-swarm`` command, e.g. under
``accelerate launch -m swarm_merge RECIPE.yml`` (several processes share the evaluations)."""

import sys

from swarm_merge.cli import main

if __name__ == "__main__":
    sys.exit(main())
