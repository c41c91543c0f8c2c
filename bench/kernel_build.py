"""What Triton makes of our attention kernels for Hopper, read from the compiler on any machine.

Compiles the dense 8-bit and the block-sparse kernel (head dim 128, default tiles) for sm_90 at 1 to
4 pipeline stages, with pointer and with TMA loads, and prints each build's shared memory as JSON:
a kernel whose K and V tiles are kept in flight needs more of it with every stage. No GPU needed.

    python bench/kernel_build.py --json-out kernel_build.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import triton
from common import emit

from smartdiff.kernels.triton_build import compile_for_hopper, default_configs

HEAD_DIM = 128


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    report = {"triton": triton.__version__, "target": "sm_90", "head_dim": HEAD_DIM, "builds": []}
    for tma in (False, True):
        for kind, config in default_configs(HEAD_DIM, tma).items():
            for stages in (1, 2, 3, 4):
                staged = replace(config, num_stages=stages)
                compiled = compile_for_hopper(kind == "sparse", staged, HEAD_DIM)
                report["builds"].append(
                    {
                        "kernel": kind,
                        "loads": "tma" if tma else "pointers",
                        "config": str(staged),
                        "shared_bytes": compiled.metadata.shared,
                    }
                )
    emit(report, args.json_out)


if __name__ == "__main__":
    main()
