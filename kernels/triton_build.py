"""Our Triton kernels (attention, fp8 quantisation) compiled for Hopper (sm_90) on any machine, no GPU needed.

Triton's whole pipeline runs, down to a cubin (ptxas included): a kernel that would not build on
the GPU fails here, and what the compiler made of a config (its shared memory) can be read. Used by
the tests and by ``bench/kernel_build.py``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from smartdiff.kernels.triton_fp8 import (
    _norm_quantize_rows_kernel,
    _quantize_rows_kernel,
    launch_shape,
    norm_launch_shape,
)
from smartdiff.kernels.triton_norm import SUM_BLOCK, SUM_WARPS, _residual_sum_kernel, _rms_norm_rows_kernel
from smartdiff.kernels.triton_norm import launch_shape as vae_norm_launch_shape
from smartdiff.kernels.triton_sage import CONFIGS, HOPPER_REGISTERS, KernelConfig, _sage_attention_kernel
from smartdiff.kernels.triton_sparge import (
    MAP_BLOCK_Q,
    SPARSE_CONFIGS,
    _block_sparse_sage_kernel,
    _select_kernel,
)

HOPPER = GPUTarget("cuda", 90, 32)
# What one Hopper multiprocessor shares among its resident programs besides its registers
# (``triton_sage.HOPPER_REGISTERS``): 228 KB of shared memory, of which each program also takes 1 KB.
HOPPER_SHARED = 228 * 1024
PROGRAM_RESERVED_SHARED = 1024


def compile_for_hopper(sparse: bool, config: KernelConfig, head_dim: int):
    """The dense (``sparse=False``) or block-sparse attention kernel at ``config``, bf16 out, fp8 P.V,
    compiled for sm_90; returns Triton's compiled kernel (``.asm["cubin"]``, ``.metadata.shared``)."""
    kernel = _block_sparse_sage_kernel if sparse else _sage_attention_kernel
    d = head_dim
    if config.tma:
        operands = {
            "q": f"tensordesc<i8[{config.block_m}, {d}]>",
            "k": f"tensordesc<i8[{config.block_n}, {d}]>",
            "v": f"tensordesc<fp8e4nv[{d}, {config.block_n}]>",
        }
    else:
        operands = {"q": "*i8", "k": "*i8", "v": "*fp8e4nv"}
    operands |= dict.fromkeys(("q_scale_ptr", "k_scale_ptr", "v_scale_ptr"), "*fp32")
    operands |= {"out_ptr": "*bf16", "kept_ptr": "*i32", "counts_ptr": "*i32", "qk_scale": "fp32"}
    constexprs = {
        "HEAD_DIM": d, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "PV_FP8": True, "TMA": config.tma
    }  # fmt: skip
    if sparse:
        constexprs["MAP_BLOCK_Q"] = MAP_BLOCK_Q
    return _compile(
        kernel, operands, constexprs, config.num_warps, config.num_stages, max_registers=config.max_registers
    )


def compile_gluon_for_hopper(sparse: bool):
    """``kernels.gluon_sage``'s kernel, dense or block-sparse at its default tiles, bf16 out, for sm_90."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from smartdiff.kernels import gluon_sage

    d, block_m = gluon_sage.HEAD_DIM, gluon_sage.BLOCK_M
    if sparse:
        block_n, stages = gluon_sage.SPARSE_BLOCK_N, gluon_sage.SPARSE_STAGES
    else:
        block_n, stages = gluon_sage.DENSE_BLOCK_N, gluon_sage.DENSE_STAGES

    def descriptor(dtype, block: list[int]) -> str:  # the type of a descriptor gluon_sage would pass
        x = torch.empty(4 * block[0], block[1], dtype=dtype)
        return mangle_type(gluon_sage.describe(x, block))

    operands = {
        "q_desc": descriptor(torch.int8, [block_m, d]),
        "k_desc": descriptor(torch.int8, [block_n, d]),
        "v_desc": descriptor(torch.float8_e4m3fn, [d, block_n]),
        "out_ptr": "*bf16", "kept_ptr": "*i32", "counts_ptr": "*i32", "qk_scale": "fp32",
    }  # fmt: skip
    operands |= dict.fromkeys(("q_scale_ptr", "k_scale_ptr", "v_scale_ptr"), "*fp32")
    constexprs = {
        "HEAD_DIM": d, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages, "SPARSE": sparse,
        "MAP_BLOCK_Q": MAP_BLOCK_Q,
    }  # fmt: skip
    return _compile(gluon_sage._attention_kernel, operands, constexprs, 4, 1, source=GluonASTSource)


def compile_selection_for_hopper(n_pad: int, use_cdf: bool, use_sim: bool):
    """The block map's selection kernel for rows of ``n_pad`` key blocks, compiled for sm_90."""
    operands = {name: "*fp32" for name in ("score_ptr", "sim_q_ptr", "sim_k_ptr")}
    operands |= {
        "mask_ptr": "*u8",
        "kept_ptr": "*i32",
        "counts_ptr": "*i32",
        "cdf": "fp32",
        "sim_threshold": "fp32",
    }
    constexprs = {"USE_CDF": use_cdf, "USE_SIM": use_sim, "N_PAD": n_pad}
    return _compile(_select_kernel, operands, constexprs, num_warps=4, num_stages=1)


def compile_fp8_quantize_for_hopper(cols: int, gelu: bool):
    """The per-token e4m3 quantisation of bf16 rows of ``cols`` (kernels/triton_fp8.py), for sm_90."""
    block, warps = launch_shape(cols)
    operands = {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
    return _compile(
        _quantize_rows_kernel, operands, {"BLOCK": block, "GELU": gelu}, num_warps=warps, num_stages=1
    )


def compile_fp8_norm_for_hopper(cols: int):
    """The LayerNorm quantised per token of bf16 rows of ``cols`` (kernels/triton_fp8.py), for sm_90."""
    block, rows, warps = norm_launch_shape(cols)
    operands = {
        "x_ptr": "*bf16", "mul_ptr": "*fp32", "add_ptr": "*fp32", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
        "eps": "fp32",
    }  # fmt: skip
    constexprs = {"COLS": cols, "BLOCK": block, "ROWS": rows}
    return _compile(_norm_quantize_rows_kernel, operands, constexprs, num_warps=warps, num_stages=1)


def compile_vae_norm_for_hopper(channels: int, silu: bool, bias: bool):
    """The VAE's fused channel norm (and SiLU, and a convolution's bias) of channels-last bf16
    tensors of ``channels`` (kernels/triton_norm.py), for sm_90."""
    c_block, rows = vae_norm_launch_shape(channels)
    operands = {
        "x_ptr": "*bf16",
        "gamma_ptr": "*bf16",
        "bias_ptr": "*bf16",
        "out_ptr": "*bf16",
        "scale": "fp32",
    }
    constexprs = {"C": channels, "C_BLOCK": c_block, "ROWS": rows, "SILU": silu, "BIAS": bias}
    return _compile(_rms_norm_rows_kernel, operands, constexprs, num_warps=4, num_stages=1)


def compile_vae_residual_sum_for_hopper(channels: int):
    """The VAE's residual sum with a convolution's bias, channels-last bf16 of ``channels``
    (kernels/triton_norm.py), for sm_90."""
    operands = {
        "y_ptr": "*bf16",
        "bias_ptr": "*bf16",
        "skip_ptr": "*bf16",
        "out_ptr": "*bf16",
        "numel": "i64",
    }
    constexprs = {"C": channels, "BLOCK": SUM_BLOCK}
    return _compile(_residual_sum_kernel, operands, constexprs, num_warps=SUM_WARPS, num_stages=1)


def _compile(
    kernel,
    operands: dict,
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    source=ASTSource,
    max_registers: int | None = None,
):
    """``kernel`` compiled for sm_90; arguments not in ``operands`` or ``constexprs`` are i32.
    ``source``: Triton's ``ASTSource``, or Gluon's for a Gluon kernel; ``max_registers``: ptxas's
    maxnreg."""
    signature = {
        name: "constexpr" if name in constexprs else operands.get(name, "i32") for name in kernel.arg_names
    }
    source = source(
        kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    )
    options = {"num_warps": num_warps, "num_stages": num_stages, "maxnreg": max_registers}
    return triton.compile(source, target=HOPPER, options=options)


def default_configs(head_dim: int, tma: bool) -> dict[str, KernelConfig]:
    """The dense and sparse kernels' default configs for ``head_dim``, with or without TMA loads."""
    return {
        "dense": replace(CONFIGS[head_dim], tma=tma),
        "sparse": replace(SPARSE_CONFIGS[head_dim], tma=tma),
    }


def _cuobjdump(compiled, flag: str) -> str:
    """``cuobjdump <flag>`` of a kernel compiled here, with the cuobjdump that ships with Triton."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, flag, str(cubin)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout


def resource_usage(compiled) -> dict[str, int]:
    """A kernel compiled here, as its cubin says (``cuobjdump -res-usage``): registers a thread,
    stack bytes a thread (spills), shared memory a program (Triton's dynamic share), and how many of
    its programs fit on one Hopper multiprocessor at once (registers and shared memory both)."""
    usage = {
        key: int(value)
        for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", _cuobjdump(compiled, "-res-usage"))
    }
    threads = compiled.metadata.num_warps * 32
    shared = compiled.metadata.shared
    by_registers = HOPPER_REGISTERS // (-(-usage["REG"] // 8) * 8 * threads)
    by_shared = HOPPER_SHARED // (shared + PROGRAM_RESERVED_SHARED)
    return {
        "registers": usage["REG"],
        "spill_bytes": usage["STACK"] + usage["LOCAL"],
        "shared_bytes": shared,
        "programs_per_multiprocessor": min(by_registers, by_shared),
    }


def instruction_counts(compiled) -> dict[str, int]:
    """How many instructions of each opcode, modifiers included ("SHFL.BFLY", "MUFU.EX2"), a
    compiled kernel's SASS holds, over the whole kernel (each loop body counted once)."""
    sass = _cuobjdump(compiled, "-sass")
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)", sass)
    return dict(Counter(opcodes))
