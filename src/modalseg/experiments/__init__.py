"""Paper reproductions: each module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args)``."""
