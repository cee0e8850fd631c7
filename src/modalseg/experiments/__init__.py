"""Paper reproductions on one runner: each paper module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args)``.

:mod:`modalseg.experiments.runner` holds what both share (the grid of runs, record reuse by key, the shared
patient split, resume, ``--checkpoint latest|best``); :mod:`~modalseg.experiments.paper1` and
:mod:`~modalseg.experiments.paper2` hold their grids, records, tables, figures and statistics
(docs/experiments.md).
"""
