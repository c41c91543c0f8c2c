"""The fp8 linears' input norm (``kernels.triton_fp8.norm_quantize_rows``) against the bf16 norm,
and the per-token quantiser of their other inputs (``quantize_rows_fused``).

At the blocks' shapes of the 1.3B (32,760 tokens x 1,536) and the 14B (75,600 x 5,120), bf16 input
with a large mean: milliseconds per call (``triton.testing.do_bench``) and GB/s (the bf16 row read
and the e4m3 row written) of

- torch's compiled bf16 modulated norm, what the dtype path runs (``pipeline.fused``),
- the fp8 norm at its launch shape, and over a sweep of rows per program and warps,
- the per-token quantiser alone (``quantize_rows_fused``), a bound for a pass that reads bf16 rows
  and writes e4m3 ones,

and whether the fp8 norm's scales equal, and how many of its bytes differ from, PyTorch's fp32 norm
quantised by ``pipeline.fp8.quantize_rows`` (the fp32 sums run in another order). Then the
quantiser of the inputs no norm produces: the attention outputs (the model's width) and the
feed-forward's hidden with the GELU applied on the way (its width), at its launch shape and over a
sweep of chunk widths and warps, with the scales' largest relative difference to PyTorch's GELU
quantised by ``quantize_rows``. Prints JSON.

    python bench/fp8_norm_gpu.py --json-out fp8_norm.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from common import emit

from smartdiff.kernels.triton_fp8 import (
    _norm_quantize_rows_kernel,
    _quantize_rows_kernel,
    launch_shape,
    norm_launch_shape,
    norm_quantize_rows,
    quantize_rows_fused,
)
from smartdiff.pipeline.fp8 import quantize_rows
from smartdiff.pipeline.fused import compiled

SHAPES = {"1.3b": (32760, 1536), "14b": (75600, 5120)}
FFN_WIDTHS = {"1.3b": 8960, "14b": 13824}
EPS = 1e-6


def timer(gigabytes: float):
    """A function timing ``fn`` (``triton.testing.do_bench``): ms and the GB/s of ``gigabytes`` moved."""

    def timed(fn) -> dict:
        ms = triton.testing.do_bench(fn, rep=200)
        return {"ms": round(ms, 4), "GB/s": round(gigabytes / ms * 1e3)}

    return timed


def bench_shape(tokens: int, cols: int) -> dict:
    g = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(1, tokens, cols, device="cuda", generator=g) * 3 + 1).to(torch.bfloat16)
    shift = torch.randn(1, cols, device="cuda", generator=g)
    scale = torch.randn(1, cols, device="cuda", generator=g) * 0.1
    timed = timer(tokens * cols * 3 / 1e9)

    normed = F.layer_norm(x.float(), (cols,), eps=EPS) * (1 + scale[:, None]) + shift[:, None]
    expected_values, expected_scales = quantize_rows(normed.flatten(0, 1))
    values, scales = norm_quantize_rows(x, 1 + scale, shift, EPS)
    differing = values.view(torch.uint8) != expected_values.view(torch.uint8)
    bf16_norm = compiled().modulated_norm
    report = {
        "tokens": tokens,
        "cols": cols,
        "scales_equal_reference": bool(torch.allclose(scales, expected_scales, rtol=1e-5)),
        "bytes_differing_from_reference": int(differing.sum()),
        "launch_shape": dict(zip(("block", "rows", "warps"), norm_launch_shape(cols))),
        "bf16_compiled_norm": timed(lambda: bf16_norm(x, shift, scale, EPS)),
        "fp8_norm": timed(lambda: norm_quantize_rows(x, 1 + scale, shift, EPS)),
        "quantiser_alone": timed(lambda: quantize_rows_fused(x.view(tokens, cols))),
        "sweep": {},
    }
    block = triton.next_power_of_2(cols)
    mul, add = (1 + scale).float().contiguous(), shift.float().contiguous()
    out = torch.empty(tokens, cols, dtype=torch.float8_e4m3fn, device="cuda")
    out_scales = torch.empty(tokens, 1, device="cuda")
    for rows in (1, 2, 4, 8):
        for warps in (2, 4, 8, 16):
            if rows * block > 16384 or rows * block // (warps * 32) < 4:
                continue  # more than 16K lanes a program, or fewer than 4 per thread

            def run(rows: int = rows, warps: int = warps) -> None:
                _norm_quantize_rows_kernel[(triton.cdiv(tokens, rows),)](
                    x, mul, add, out, out_scales, tokens, tokens, EPS,
                    COLS=cols, BLOCK=block, ROWS=rows, num_warps=warps,
                )  # fmt: skip

            report["sweep"][f"rows {rows}, warps {warps}"] = timed(run)
    return report


def bench_quantiser(tokens: int, cols: int, gelu: bool) -> dict:
    """The per-token quantiser on rows of ``cols`` (Gaussian, as a hidden before its GELU)."""
    x = torch.randn(tokens, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    x = x.to(torch.bfloat16)
    _, scales = quantize_rows_fused(x, gelu)
    reference = F.gelu(x.float(), approximate="tanh") if gelu else x
    _, expected_scales = quantize_rows(reference)
    timed = timer(tokens * cols * 3 / 1e9)
    out = torch.empty(tokens, cols, dtype=torch.float8_e4m3fn, device="cuda")
    out_scales = torch.empty(tokens, 1, device="cuda")
    report = {
        "tokens": tokens,
        "cols": cols,
        "gelu": gelu,
        "scales_max_relative_difference": float(((scales - expected_scales).abs() / expected_scales).max()),
        "launch_shape": dict(zip(("block", "warps"), launch_shape(cols))),
        "quantiser": timed(lambda: quantize_rows_fused(x, gelu)),
        "sweep": {},
    }
    for block in (256, 512, 1024, 2048):
        for warps in (1, 2, 4, 8):
            if not 2 <= block // (warps * 32) <= 16:
                continue  # 2 to 16 columns a thread

            def run(block: int = block, warps: int = warps) -> None:
                _quantize_rows_kernel[(tokens,)](
                    x, out, out_scales, tokens, cols, BLOCK=block, GELU=gelu, num_warps=warps
                )

            report["sweep"][f"block {block}, warps {warps}"] = timed(run)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1.3b,14b")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for name in args.models.split(","):
        tokens, width = SHAPES[name]
        report[name] = bench_shape(tokens, width)
        report[f"{name} attention output"] = bench_quantiser(tokens, width, gelu=False)
        report[f"{name} feed-forward hidden"] = bench_quantiser(tokens, FFN_WIDTHS[name], gelu=True)
    emit(report, args.json_out)


if __name__ == "__main__":
    main()
