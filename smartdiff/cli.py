"""``smartdiff <command>``. Each command lives with the package that owns it and is imported lazily,
so farm commands never import torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, help). A module has ``add_arguments(parser)`` and ``run(args) -> int``, or a
# ``SUBCOMMANDS`` dict of name -> (add_arguments, run) when it serves several commands.
COMMANDS = {
    "generate": ("smartdiff.pipeline.cli_generate", "generate one video on this machine, no farm"),
    "tiny-model": (
        "smartdiff.pipeline.cli_tiny",
        "write a small random-weight Wan checkpoint (official layout)",
    ),
    "worker": (
        "smartdiff.worker.cli",
        "run Celery worker(s) for a profile, model preloaded, one process per GPU",
    ),
    "worker-health": ("smartdiff.worker.health", "exit 0 if this host's worker for a profile is alive"),
    "submit": ("smartdiff.producer.cli", "submit a job to the farm"),
    "status": ("smartdiff.producer.cli", "print a job's record"),
    "wait": ("smartdiff.producer.cli", "wait for a job to finish and print its record"),
    "cancel": ("smartdiff.producer.cli", "cancel a job"),
    "demo": ("smartdiff.demo", "the whole farm on this machine: Redis, S3, a worker, one job"),
    "gateway": (
        "smartdiff.producer.api",
        "serve the farm over HTTP (jobs, profiles, health, metrics, webhooks)",
    ),
    "apikey": ("smartdiff.producer.apikeys", "create, list or revoke API keys of the HTTP gateway"),
}


def python_module_command(module: str = "smartdiff", *args: str) -> list[str]:
    """``python -m module args`` with this interpreter, for a child process.

    ``-P`` keeps the working directory off ``sys.path``: started inside a checkout, the repository's
    top-level folders (``kernels/``, ``pipeline/``, ...) would otherwise shadow installed
    distributions of the same names (transformers imports one called ``kernels``).
    """
    return [sys.executable, "-P", "-m", module, *args]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="smartdiff", description="Wan text-to-video, fast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            # A module serves one command (add_arguments, run) or several (SUBCOMMANDS).
            subcommands = getattr(module, "SUBCOMMANDS", None)
            add, run = subcommands[name] if subcommands else (module.add_arguments, module.run)
            add(command)
            command.set_defaults(_run=run)
    args = parser.parse_args(argv)
    return args._run(args)
