"""The ``smartdiff`` command line: one entry point, subcommands imported only when used."""
