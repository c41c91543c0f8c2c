"""``smartdiff <command>``. Each command lives with the package that owns it and is imported lazily,
so farm commands never import torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, help). Each module has ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "generate": ("pipeline.cli_generate", "generate one video on this machine, no farm"),
    "tiny-model": ("pipeline.cli_tiny", "write a small random-weight Wan checkpoint (official layout)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="smartdiff", description="Wan text-to-video, fast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            command.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return args._run(args)
