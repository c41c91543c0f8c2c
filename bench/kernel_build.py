"""What Triton makes of our attention kernels for Hopper, read from the compiler on any machine.

Compiles the dense 8-bit and the block-sparse kernel (head dim 128, default tiles) for sm_90 at 1 to
4 pipeline stages, with pointer and with TMA loads, and the Gluon kernels (dense, block-sparse).
Prints as JSON each build's registers a thread, spill bytes, shared memory and how many of its
programs fit on one multiprocessor (``triton_build.resource_usage``): a kernel whose K and V tiles
are kept in flight needs more shared memory with every stage, and a program that waits on its own
products needs others beside it. Also how many SASS instructions of the softmax's costlier kinds
each build holds (``triton_build.instruction_counts``, each loop body counted once): special
functions (MUFU: exp2, 16 a clock per multiprocessor against 128 fp32 multiply-adds), int <-> float
conversions (I2F, I2FP, F2I), fp32 -> fp8 packs (F2FP), shuffles and byte permutes (SHFL, PRMT:
registers moved between threads; SHFL.IDX alone, which a change of register layout needs and the
row reductions do not), and all instructions. No GPU needed.

    python bench/kernel_build.py --json-out kernel_build.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import triton
from common import emit

from smartdiff.kernels import gluon_sage
from smartdiff.kernels.triton_build import (
    compile_for_hopper,
    compile_gluon_for_hopper,
    default_configs,
    instruction_counts,
    resource_usage,
)

HEAD_DIM = 128
# Special functions (MUFU), int <-> float conversions, fp32 -> fp8 packs of P, and the shuffles and
# byte permutes that move registers between threads (a change of register layout).
SASS_OPCODES = ("MUFU", "I2F", "I2FP", "F2I", "F2FP", "SHFL", "PRMT")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    report = {"triton": triton.__version__, "target": "sm_90", "head_dim": HEAD_DIM, "builds": []}

    def add(kernel: str, loads: str, config: str, compiled) -> None:
        counts = instruction_counts(compiled)
        sass = {kind: sum(n for op, n in counts.items() if op.split(".")[0] == kind) for kind in SASS_OPCODES}
        sass |= {"SHFL.IDX": counts.get("SHFL.IDX", 0), "all": sum(counts.values())}
        report["builds"].append(
            {"kernel": kernel, "loads": loads, "config": config, **resource_usage(compiled), "sass": sass}
        )

    for tma in (False, True):
        for kind, config in default_configs(HEAD_DIM, tma).items():
            for stages in (1, 2, 3, 4):
                staged = replace(config, num_stages=stages)
                add(
                    kind,
                    "tma" if tma else "pointers",
                    str(staged),
                    compile_for_hopper(kind == "sparse", staged, HEAD_DIM),
                )
    dense = f"{gluon_sage.BLOCK_M} x {gluon_sage.DENSE_BLOCK_N}, {gluon_sage.DENSE_STAGES} stages"
    sparse = f"{gluon_sage.BLOCK_M} x {gluon_sage.SPARSE_BLOCK_N}, {gluon_sage.SPARSE_STAGES} stages"
    add("gluon dense", "tma", dense, compile_gluon_for_hopper(False))
    add("gluon sparse", "tma", sparse, compile_gluon_for_hopper(True))
    emit(report, args.json_out)


if __name__ == "__main__":
    main()
