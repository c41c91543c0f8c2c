"""Our Triton attention kernels compiled for Hopper (sm_90) on any machine, no GPU needed.

Triton's whole pipeline runs, down to a cubin (ptxas included): a kernel that would not build on
the GPU fails here, and what the compiler made of a config (its shared memory) can be read. Used by
the tests and by ``bench/kernel_build.py``.
"""

from __future__ import annotations

from dataclasses import replace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.triton_sage import CONFIGS, KernelConfig, _sage_attention_kernel
from kernels.triton_sparge import MAP_BLOCK_Q, SPARSE_CONFIGS, _block_sparse_sage_kernel

HOPPER = GPUTarget("cuda", 90, 32)


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
    signature = {
        name: "constexpr" if name in constexprs else operands.get(name, "i32") for name in kernel.arg_names
    }
    source = ASTSource(
        kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=HOPPER, options=options)


def default_configs(head_dim: int, tma: bool) -> dict[str, KernelConfig]:
    """The dense and sparse kernels' default configs for ``head_dim``, with or without TMA loads."""
    return {
        "dense": replace(CONFIGS[head_dim], tma=tma),
        "sparse": replace(SPARSE_CONFIGS[head_dim], tma=tma),
    }
