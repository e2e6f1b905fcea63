"""What leaves a run once the search is done.

- :mod:`.merge` writes the winner with mergekit (the ``swarm`` merge method);
- :mod:`.card` renders the model card, its plot, and the tables the terminal prints too;
- :mod:`.push` pushes the files the run wrote (its manifest) to the Hub.

The output folder itself (:mod:`swarm_merge.output`: the rules that protect your files, the lock,
the atomic publish) sits lower, since the search's checkpoint writes there too.
"""
