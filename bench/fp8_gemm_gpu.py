"""Can our own fp8 product beat ``torch._scaled_mm`` at Wan's linear-layer shapes?

The fp8 DiT (pipeline/fp8.py) runs every block linear as one ``torch._scaled_mm`` with row-wise
scales (per token for the activations, per output channel for the weights), fast accumulation, the
bias in the epilogue and bf16 out. On an H100 on 2026-12-07 those products ran at about 840 TFLOP/s
at 14B 720p, 42% of the card's dense e4m3 peak, which caps the fp8 linear layers at about 1.5x
bf16's (docs/PERFORMANCE.md). This benchmark times, at each linear shape of the 1.3B (32,760
tokens) and 14B (75,600 tokens) blocks:

- bf16 ``F.linear`` (the dtype path's product),
- ``torch._scaled_mm`` as ``FP8Linear.product`` calls it,
- the Triton kernel below (the same operands, scales and epilogue) over a sweep of tile configs,

checks each Triton result against ``torch._scaled_mm``'s (relative L2 difference; a config counts
only below 2e-2), and sums every product of one forward's blocks per implementation (the best config
per shape for Triton). Prints JSON, then a table. No weights or pipeline: random e4m3 operands of
the real shapes. On an H200 (2026-12-07, docs/PERFORMANCE.md) torch's product ran at 1,200-1,290
TFLOP/s and ours did not beat it at any shape (1.19x slower summed over the 1.3B forward, equal at
the 14B's), so ``FP8Linear`` keeps ``torch._scaled_mm``.

Two more questions, asked of torch's product at the same shapes: how much of its time the row-wise
scales cost (the same product with one scale per tensor, ``tensorwise``, and with the scales per
1x128 block of K on both sides, ``blockwise_1x128``, cuBLAS's other Hopper recipe, which would let
a producer write its own block scales), and whether the self-attention's q, k and v would run
faster as one product of three times the width (``qkv_as_one``, beside three products).

    python bench/fp8_gemm_gpu.py --json-out fp8_gemm.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
import triton.language as tl
from common import emit, relative_difference

from smartdiff.pipeline.fp8 import quantize_rows


@triton.jit
def _scaled_mm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """c [M, N] bf16 = (a [M, K] e4m3 @ b [N, K] e4m3 ^T) * a_scale[m] * b_scale[n] + bias[n].
    K is a multiple of BLOCK_K; tiles are visited GROUP_M row-tiles at a time, for L2 reuse of b."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * tiles_n)) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major
    mask_m, mask_n = offs_m[:, None] < M, offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs, mask=mask_m, other=0.0), tl.load(b_ptrs, mask=mask_n, other=0.0), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc * a_scale[:, None] * b_scale[None, :] + bias[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, out.to(tl.bfloat16), mask=mask_m & mask_n)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); GROUP_M 8 throughout.
CONFIGS = [
    (128, 256, 128, 8, 3),
    (128, 256, 128, 8, 4),
    (256, 128, 128, 8, 3),
    (256, 128, 128, 8, 4),
    (128, 128, 128, 4, 4),
    (128, 128, 128, 8, 5),
    (128, 256, 64, 8, 4),
    (64, 256, 128, 4, 4),
]

# One block's products: (name, in, out, how many per block), per model; tokens at the default size.
MODELS = {
    "1.3b": (
        32760,
        30,
        [("q,k,v,o + cross q,o", 1536, 1536, 6), ("ffn1", 1536, 8960, 1), ("ffn2", 8960, 1536, 1)],
    ),
    "14b": (
        75600,
        40,
        [("q,k,v,o + cross q,o", 5120, 5120, 6), ("ffn1", 5120, 13824, 1), ("ffn2", 13824, 5120, 1)],
    ),
}


def triton_scaled_mm(a, b, a_scale, b_scale, bias, config) -> torch.Tensor:
    block_m, block_n, block_k, warps, stages = config
    (m, k), n = a.shape, b.shape[0]
    if k % block_k:
        raise ValueError(f"K={k} is not a multiple of BLOCK_K={block_k}")
    c = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _scaled_mm_kernel[grid](
        a, b, a_scale, b_scale, bias, c, m, n, k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c


def other_recipes(a, b, a_scale, b_scale, bias) -> dict:
    """torch's product at the same shape with per-tensor scales, and with 1x128 block scales (each
    row's and channel's scale repeated over its K blocks: the same product). ms, or the error."""
    (m, k), n = a.shape, b.shape[0]
    from torch.nn.functional import ScalingType, scaled_mm

    blocks = k // 128
    # (rows, K/128), the rows' axis contiguous, as cuBLAS reads them
    scale_a_blocks = a_scale.view(m, 1).expand(m, blocks).t().contiguous().t()
    scale_b_blocks = b_scale.view(n, 1).expand(n, blocks).t().contiguous().t()
    one = torch.ones((), device=a.device)
    candidates = {
        "tensorwise": lambda: torch._scaled_mm(
            a, b.t(), scale_a=one, scale_b=one, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
        ),
        "blockwise_1x128": lambda: scaled_mm(
            a,
            b.t(),
            scale_a_blocks,
            ScalingType.BlockWise1x128,
            scale_b_blocks,
            ScalingType.BlockWise1x128,
            bias=bias,
            output_dtype=torch.bfloat16,
        ),
    }
    results = {}
    for name, fn in candidates.items():
        try:
            fn()
            results[name] = {"ms": round(triton.testing.do_bench(fn), 3)}
        except Exception as error:  # an unsupported recipe is reported, not fatal
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return results


def time_shape(tokens: int, k: int, n: int, ours: bool = True) -> dict:
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=g) * 0.1
    a, a_scale = quantize_rows(x)
    b, b_scale = quantize_rows(w)
    b_scale = b_scale.view(-1)
    flop = 2 * tokens * k * n

    def tflops(ms: float) -> float:
        return round(flop / ms / 1e9, 1)

    bias_bf16 = bias.to(torch.bfloat16)

    def scaled_mm() -> torch.Tensor:
        return torch._scaled_mm(
            a, b.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), bias=bias_bf16,
            out_dtype=torch.bfloat16, use_fast_accum=True,
        )  # fmt: skip

    reference = scaled_mm()
    row = {"tokens": tokens, "in": k, "out": n}
    bf16_ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w, bias_bf16))
    mm_ms = triton.testing.do_bench(scaled_mm)
    row["bf16_linear"] = {"ms": round(bf16_ms, 3), "tflops": tflops(bf16_ms)}
    row["torch_scaled_mm"] = {"ms": round(mm_ms, 3), "tflops": tflops(mm_ms)}
    row["torch_scaled_mm_other_recipes"] = other_recipes(a, b, a_scale, b_scale, bias_bf16)
    row["triton"] = {}
    for config in CONFIGS if ours else ():
        name = "x".join(map(str, config[:3])) + f" w{config[3]} s{config[4]}"
        try:
            out = triton_scaled_mm(a, b, a_scale, b_scale, bias, config)
            ms = triton.testing.do_bench(lambda c=config: triton_scaled_mm(a, b, a_scale, b_scale, bias, c))
        except Exception as error:  # a config that does not fit (shared memory) is reported, not fatal
            row["triton"][name] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
            continue
        difference = relative_difference(out, reference)
        row["triton"][name] = {
            "ms": round(ms, 3),
            "tflops": tflops(ms),
            "difference_to_scaled_mm": difference,
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="1.3b,14b")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for model in args.models.split(","):
        tokens, blocks, layers = MODELS[model]
        rows, totals = {}, {"bf16_linear": 0.0, "torch_scaled_mm": 0.0, "triton_best": 0.0}
        for name, k, n, count in layers:
            row = rows[name] = time_shape(tokens, k, n)
            ok = [r for r in row["triton"].values() if "ms" in r and r["difference_to_scaled_mm"] < 2e-2]
            row["triton_best_ms"] = min((r["ms"] for r in ok), default=None)
            for key in ("bf16_linear", "torch_scaled_mm"):
                totals[key] += row[key]["ms"] * count * blocks
            totals["triton_best"] += (row["triton_best_ms"] or float("nan")) * count * blocks
            print(model, name, {k: v for k, v in row.items() if k != "triton"}, flush=True)
        width = layers[0][1]
        as_one = time_shape(tokens, width, 3 * width, ours=False)
        three = rows[layers[0][0]]
        as_one["three_products"] = {
            key: round(3 * three[key]["ms"], 3) for key in ("bf16_linear", "torch_scaled_mm")
        }
        report[model] = {
            "shapes": rows,
            "qkv_as_one": as_one,
            "block_products_ms_per_forward": {k: round(v, 1) for k, v in totals.items()},
        }
    emit(report, args.json_out)
    print(f"{'model':<6} {'bf16 ms':>10} {'scaled_mm ms':>13} {'triton ms':>10}")
    for model in args.models.split(","):
        t = report[model]["block_products_ms_per_forward"]
        print(f"{model:<6} {t['bf16_linear']:>10} {t['torch_scaled_mm']:>13} {t['triton_best']:>10}")


if __name__ == "__main__":
    main()
