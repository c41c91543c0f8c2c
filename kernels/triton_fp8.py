"""Per-token e4m3 quantisation of a linear layer's input in one pass (pipeline/fp8.py's CUDA path).

One program per row (token): it loads the row once, optionally applies the tanh GELU in fp32 (the
feed-forward's second layer: the GELU its fp8 product cannot fuse runs here instead, so the wide
hidden is read once), takes the row's max |x|, and writes the e4m3 row and its fp32 scale. Numerics
are ``pipeline.fp8.quantize_rows``': scale = max|x| / 448 (at least 1e-12), values x / scale
rounded to nearest even, clamped to +-448; with the GELU, that of x in fp32 (no bf16 rounding of the
hidden in between, unlike the unfused path).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_FP8_MAX = tl.constexpr(448.0)
_MIN_SCALE = tl.constexpr(1e-12)
_GELU_C = tl.constexpr(math.sqrt(2.0 / math.pi))


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact at both tails in fp32 (exp overflows to inf, giving 1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit(do_not_specialize=["n_rows"])
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_rows, n_cols, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = 0.5 * x * (1.0 + _tanh((x + 0.044715 * x * x * x) * _GELU_C))
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / _FP8_MAX, _MIN_SCALE)
    values = tl.minimum(tl.maximum(tl.div_rn(x, scale), -_FP8_MAX), _FP8_MAX)
    tl.store(out_ptr + row * n_cols + cols, values.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(scale_ptr + row, scale)


def launch_shape(cols: int) -> tuple[int, int]:
    """(BLOCK, warps) for rows of ``cols``: the row in one block, about 32 elements per thread."""
    block = triton.next_power_of_2(cols)
    return block, min(16, max(4, block // 1024))


def quantize_rows_fused(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scales [rows, 1]) of a 2-D tensor, GELU (tanh) first if ``gelu``."""
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block, warps = launch_shape(cols)
    _quantize_rows_kernel[(rows,)](x, out, scale, rows, cols, BLOCK=block, GELU=gelu, num_warps=warps)
    return out, scale
