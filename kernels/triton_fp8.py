"""Per-token e4m3 quantisation of a linear layer's input (pipeline/fp8.py's CUDA path).

One program per row (token) walks the row in chunks of BLOCK columns twice: first for the row's max
|x|, then to write the e4m3 values and the fp32 scale; the second pass mostly reads from L2. With the
GELU (the feed-forward's second layer: the GELU its fp8 product cannot fuse runs here instead, so the
wide hidden is read once from memory) the tanh GELU is applied in fp32 in both passes. Small chunks
keep a program's registers few and many programs resident per SM, which hides the memory latency
(a whole row per program, 16,384 lanes for the 1.3B feed-forward's 8,960 columns, left one program
per SM and reached about 0.9 TB/s on an H100). Numerics are ``pipeline.fp8.quantize_rows``': scale =
max|x| / 448 (at least 1e-12), values x * (1 / scale) rounded to nearest even, clamped to +-448; with
the GELU, that of x in fp32 (no bf16 rounding of the hidden in between, unlike the unfused path).
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


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + _tanh((x + 0.044715 * x * x * x) * _GELU_C))


@triton.jit(do_not_specialize=["n_rows"])
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_rows, n_cols, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, out_row = x_ptr + row * n_cols, out_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    largest = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
        if GELU:
            x = _gelu(x)
        largest = tl.maximum(largest, tl.abs(x))
    scale = tl.maximum(tl.max(largest, axis=0) / _FP8_MAX, _MIN_SCALE)
    inverse = tl.div_rn(1.0, scale)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            x = _gelu(x)
        values = tl.minimum(tl.maximum(x * inverse, -_FP8_MAX), _FP8_MAX)
        tl.store(out_row + start + cols, values.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(scale_ptr + row, scale)


def launch_shape(cols: int) -> tuple[int, int]:
    """(BLOCK, warps) for rows of ``cols``: chunks of 1,024 columns, or 512 or 256 where those divide
    the row and 1,024 does not (1,536 and 13,824: no masked tail), 8 bf16 per thread at most."""
    block = next((b for b in (1024, 512, 256) if cols % b == 0), 1024)
    return block, max(1, block // 256)


def quantize_rows_fused(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scales [rows, 1]) of a 2-D tensor, GELU (tanh) first if ``gelu``."""
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block, warps = launch_shape(cols)
    _quantize_rows_kernel[(rows,)](x, out, scale, rows, cols, BLOCK=block, GELU=gelu, num_warps=warps)
    return out, scale
