"""Per-token e4m3 quantisation of a linear layer's input (pipeline/fp8.py's CUDA path).

One program per row (token) walks the row in chunks of BLOCK columns twice: first for the row's max
|x|, then to write the e4m3 values and the fp32 scale; the second pass mostly reads from L2. The
first pass asks L2 to keep what it reads; the second reads the chunks back to front (the last read
first) and streams its output past the cache (2-3% faster than front to front on an H100). Chunks
keep a program's registers few and several programs resident per SM, which hides the memory latency
(a whole row per program, 16,384 lanes for the 1.3B feed-forward's 8,960 columns, left one program
per SM and reached about 0.9 TB/s on an H100); ``LAUNCH_SHAPES`` says how wide. Numerics are
``pipeline.fp8.quantize_rows``': scale = max|x| / 448 (at least 1e-12), values x * (1 / scale)
rounded to nearest even, clamped to +-448.

With the GELU (the feed-forward's second layer: the GELU its fp8 product cannot fuse runs here
instead, so the wide hidden is read once from memory) the tanh GELU is applied in fp32, as
x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3): the tanh form's value with
one exponential and one division per element, no bf16 rounding of the hidden in between (unlike the
unfused path). The GELU runs once per element, in the second pass only: the first finds the row's
largest |GELU(x)| from three of its x, with comparisons alone. |GELU| grows with x above 0; below,
it grows with x up to GELU's minimum at x = -0.75246 and shrinks from there to 0. So the largest
|GELU| over the row is that of the row's largest x, of its largest x at or below the minimum, or of
its smallest x at or above it. That halves the special-function instructions (the exponential and
the division); on an H100 it made the 1.3B hidden's pass 7% faster, the memory traffic being what
bounds it (docs/PERFORMANCE.md).

``norm_quantize_rows`` does the same for the LayerNorms that feed fp8 linears (the block's input
norms, modulated or affine). A program holds one whole row in registers (the 1.3B's 1,536 or the
14B's 5,120 columns, padded to a power of two): the row is read once and one byte per element
written, where a norm in bf16 followed by the quantiser reads and writes the row twice. Mean, then
the variance of the deviations from it (no cancellation when the mean is large), as LayerNorm's:
biased variance, eps inside the square root. One row and 2 warps per program were the fastest of a
sweep on an H100 (1-8 rows, 2-16 warps) at both widths: 0.091 ms a call at the 1.3B's 32,760 tokens
and 0.544 ms at the 14B's 75,600, against 0.105 and 0.714 for the kernel this replaced (each row in
chunks, three passes) and 0.140 and 1.459 for torch's compiled bf16 norm.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_FP8_MAX = tl.constexpr(448.0)
_MIN_SCALE = tl.constexpr(1e-12)
_GELU_C = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_ARGMIN = tl.constexpr(-0.7524614)  # where the tanh GELU is smallest (-0.17004)


@triton.jit
def _gelu(x):
    u = (x + 0.044715 * x * x * x) * _GELU_C
    return x / (1.0 + tl.exp(-2.0 * u))  # 0.5 x (1 + tanh(u)); exp overflows to inf: x / inf = 0


@triton.jit
def _abs_gelu_or_zero(x):
    """|GELU(x)|, 0 for the infinities that stand for 'no such element' in the first pass."""
    return tl.where(tl.abs(x) < float("inf"), tl.abs(_gelu(x)), 0.0)


@triton.jit(do_not_specialize=["n_rows"])
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_rows, n_cols, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, out_row = x_ptr + row * n_cols, out_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    # The row's largest |x| or, with the GELU, the candidates for its largest |GELU| (module
    # docstring): the largest x, the largest at or below GELU's minimum, the smallest at or above it.
    # A masked lane reads 0, whose |GELU| is 0: as a candidate it never raises the maximum.
    largest = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    left = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    right = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if GELU:
            largest = tl.maximum(largest, x)
            left = tl.maximum(left, tl.where(x <= _GELU_ARGMIN, x, float("-inf")))
            right = tl.minimum(right, tl.where(x >= _GELU_ARGMIN, x, float("inf")))
        else:
            largest = tl.maximum(largest, tl.abs(x))
    if GELU:
        amax = tl.maximum(
            tl.maximum(_abs_gelu_or_zero(tl.max(largest, axis=0)), _abs_gelu_or_zero(tl.max(left, axis=0))),
            _abs_gelu_or_zero(tl.min(right, axis=0)),
        )
    else:
        amax = tl.max(largest, axis=0)
    scale = tl.maximum(amax / _FP8_MAX, _MIN_SCALE)
    inverse = tl.div_rn(1.0, scale)
    # Back to front: the chunks the first pass read last are the likeliest to be in cache still.
    last = tl.cdiv(n_cols, BLOCK) - 1
    for chunk in range(0, last + 1):
        start = (last - chunk) * BLOCK
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if GELU:
            x = _gelu(x)
        values = tl.minimum(tl.maximum(x * inverse, -_FP8_MAX), _FP8_MAX)
        values = values.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        tl.store(out_row + start + cols, values, mask=mask, eviction_policy="evict_first")
    tl.store(scale_ptr + row, scale)


# (BLOCK, warps) by row width, the fastest of bench/fp8_norm_gpu.py's sweep on an H100 (chunks of 256
# to 2,048 columns, 1 to 8 warps): the Wan widths of the attention outputs (1,536, 5,120) and of the
# feed-forward's hidden (8,960, 13,824). Wide chunks win although most end in a masked tail: fewer
# programs are resident at once, so the rows their first pass read are still in L2 for the second
# (the 1.3B hidden: 0.44 ms at 1,024 x 4 warps against 0.57 at 256 x 1).
LAUNCH_SHAPES: dict[int, tuple[int, int]] = {
    1536: (2048, 4),
    5120: (2048, 8),
    8960: (1024, 4),
    13824: (2048, 4),
}


def launch_shape(cols: int) -> tuple[int, int]:
    """(BLOCK, warps) for rows of ``cols``: ``LAUNCH_SHAPES``' entry, else 2,048 columns and 4 warps
    (the choice at most of the swept widths)."""
    return LAUNCH_SHAPES.get(cols, (2048, 4))


def quantize_rows_fused(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scales [rows, 1]) of a 2-D tensor, GELU (tanh) first if ``gelu``."""
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block, warps = launch_shape(cols)
    _quantize_rows_kernel[(rows,)](x, out, scale, rows, cols, BLOCK=block, GELU=gelu, num_warps=warps)
    return out, scale


@triton.jit(do_not_specialize=["n_rows", "rows_per_batch"])
def _norm_quantize_rows_kernel(
    x_ptr, mul_ptr, add_ptr, out_ptr, scale_ptr, n_rows, rows_per_batch, eps,
    COLS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    in_row = cols < COLS
    mask = (row < n_rows) & in_row
    x = tl.load(x_ptr + row * COLS + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1)[:, None] / COLS
    deviation = tl.where(in_row, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(deviation * deviation, axis=1)[:, None] / COLS + eps)
    mod = (row // rows_per_batch) * COLS + cols  # the row's batch's entry of ``mul`` and ``add``
    mul = tl.load(mul_ptr + mod, mask=mask, other=0.0)
    add = tl.load(add_ptr + mod, mask=mask, other=0.0)
    y = deviation * rstd * mul + add
    scale = tl.maximum(tl.max(tl.abs(y), axis=1)[:, None] / _FP8_MAX, _MIN_SCALE)
    values = tl.minimum(tl.maximum(y * tl.div_rn(1.0, scale), -_FP8_MAX), _FP8_MAX)
    tl.store(out_ptr + row * COLS + cols, values.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(scale_ptr + row, scale, mask=row < n_rows)


def norm_launch_shape(cols: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, warps) of the norm for rows of ``cols``: one whole row (padded to a power of two)
    per program, 2 warps (the module docstring's sweep)."""
    return triton.next_power_of_2(cols), 1, 2


def norm_quantize_rows(
    x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm (no affine) of x [B, L, D] over D, then ``* mul + add`` (fp32, [B, D] per batch row
    or [D] for every row), quantised per row: (e4m3 [B*L, D], fp32 scales [B*L, 1]), as
    ``pipeline.fp8.quantize_rows`` of the fp32 result."""
    x = x.contiguous()
    batch, tokens, cols = x.shape
    mul, add = (t.float().expand(batch, cols).contiguous() for t in (mul, add))
    out = torch.empty(batch * tokens, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(batch * tokens, 1, dtype=torch.float32, device=x.device)
    block, rows, warps = norm_launch_shape(cols)
    n_rows = batch * tokens
    _norm_quantize_rows_kernel[(triton.cdiv(n_rows, rows),)](
        x, mul, add, out, scale, n_rows, tokens, eps, COLS=cols, BLOCK=block, ROWS=rows, num_warps=warps
    )
    return out, scale
