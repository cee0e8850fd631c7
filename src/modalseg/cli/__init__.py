"""Command-line interface: ``modalseg <command>``. One module per command."""
