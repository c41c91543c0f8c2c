"""``smartdiff tiny-model``: a small random-weight Wan checkpoint in the official layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "tiny-moe"],
        help="tiny-moe: two experts switched by timestep, like Wan2.2",
    )


def run(args: argparse.Namespace) -> int:
    from smartdiff.pipeline.tiny import write_tiny_checkpoint

    root = write_tiny_checkpoint(args.out, args.seed, args.model)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {args.model} checkpoint to {root} ({size / 1e6:.1f} MB)")
    return 0
