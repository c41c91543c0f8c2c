"""One DiT forward per attention profile, beside diffusers' forward with the same weights.

Builds the model's DiT directly on the GPU with random bf16 weights (the speed of dense work does not
depend on weight values; no checkpoint is written), then times one forward at the model's default
shape for each variant: token-wise work eager or compiled (``pipeline.fused``), attention ``sdpa``,
our 8-bit ``sage`` and our block-sparse ``sparge``; and diffusers' WanTransformer3DModel holding the
same weights. Each variant's output is compared with diffusers'. With ``--cfg-batch`` each variant
also times both guidance branches as one batch-2 forward (a profile's ``cfg_batch``) against two
forwards of batch 1. With ``--cuda-graphs`` each variant also times its forward replayed from a CUDA
graph (a profile's ``cuda_graphs``, ``pipeline.cuda_graphs``) against the eager one. A profiler
table of the busiest CUDA kernels shows where the time of the exact variants goes. Prints one JSON object.

    python bench/dit_forward_gpu.py --model wan2.1-t2v-1.3b --json-out dit_forward.json
    python bench/dit_forward_gpu.py --skip-diffusers --cuda-graphs --variants compiled-sage,compiled-sparge
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import diffusers_dit, emit, relative_difference, report_header, time_forward

from smartdiff.kernels import get_backend
from smartdiff.kernels.sparge import SparsityStats
from smartdiff.pipeline.config import load_model_config
from smartdiff.pipeline.dit import FP32_PARAMETERS, WanDiT
from smartdiff.pipeline.fused import EAGER
from smartdiff.pipeline.loading import assign_weights
from smartdiff.pipeline.params import parse_size
from smartdiff.pipeline.tiny import random_state
from smartdiff.pipeline.wan import dit_tokens


def build_dit(model_name: str) -> WanDiT:
    config = load_model_config(model_name).dit
    with torch.device("meta"):
        dit = WanDiT(config)
    state = random_state(dit, 0, torch.device("cuda"), torch.bfloat16)
    assign_weights(dit, state, "random", torch.bfloat16, "cuda", keep_fp32=FP32_PARAMETERS)
    return dit.eval().requires_grad_(False)


def top_kernels(fn, count: int = 12) -> list[dict]:
    """The CUDA kernels that took most time in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:count]
    return [
        {"kernel": e.key[:90], "calls": e.count, "ms": round(e.device_time_total / 1000, 2)} for e in rows
    ]


def time_graphed(
    dit: WanDiT, inputs: tuple, eager_out: torch.Tensor, eager_ms: float, stats, repeats: int
) -> dict:
    """The forward replayed from a CUDA graph: ms, speed-up and difference against the eager one,
    and (sparse) whether a replay counts the same blocks as an eager call."""
    dit.use_cuda_graphs()
    try:
        with torch.no_grad():
            dit(*inputs)  # warm-up and capture
            if stats is not None:
                stats.reset()
                dit(*inputs)
                replay_counts = stats.summary()
                stats.reset()
                dit.eager_forward(*inputs)
                eager_counts = stats.summary()
            graphed = time_forward(lambda: dit(*inputs), repeats)
    finally:
        dit.graphed = None
        torch.cuda.empty_cache()
    out = graphed.pop("output")
    result = {
        **graphed,
        "speedup_vs_eager": round(eager_ms / graphed["ms"], 3),
        "relative_difference_to_eager": relative_difference(out, eager_out),
    }
    if stats is not None:
        result["replay_counts_blocks_like_eager"] = replay_counts == eager_counts
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--variants", default="eager-sdpa,compiled-sdpa,compiled-sage,compiled-sparge")
    parser.add_argument(
        "--cfg-batch", action="store_true", help="also time both CFG branches as one batch-2 forward"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="also time each forward replayed from a CUDA graph"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    model = load_model_config(args.model)
    report = report_header(model)
    dit = build_dit(args.model)
    width, height = parse_size(model.sampling.size)
    latent_frames = 1 + (args.frames - 1) // 4
    generator = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, device="cuda", generator=generator)
    latents = latents.to(torch.bfloat16)
    context = torch.randn(1, 512, model.dit.text_dim, device="cuda", generator=generator).to(torch.bfloat16)
    t = torch.tensor([999], device="cuda")
    if args.cfg_batch:  # the two guidance branches as one batch: a second, unconditional context
        pair = (torch.cat([latents, latents]), t.expand(2), torch.cat([context, torch.randn_like(context)]))
    report["shape"] = f"{width}x{height}x{args.frames}"
    report["tokens"] = dit_tokens(model, args.frames, height, width)

    reference = None
    if not args.skip_diffusers:
        ref = diffusers_dit(dit, model)
        with torch.no_grad():
            theirs = time_forward(lambda: ref(latents, t, context, return_dict=False)[0], args.repeats)
        reference = theirs.pop("output")
        report["diffusers"] = theirs
        del ref
        torch.cuda.empty_cache()

    report["variants"] = {}
    for variant in args.variants.split(","):
        ops, attention = variant.split("-")
        stats = SparsityStats() if attention == "sparge" else None
        options = {"implementation": "triton"} if attention in ("sage", "sparge") else {}
        if stats is not None:
            # Random weights give no block alike tokens, so the similarity rule would keep every
            # block; without it the forward runs at the profile's nominal half.
            options.update(topk=0.5, sim_threshold=-1.0, stats=stats)
        try:
            backend = get_backend(attention, "cuda", **options)
        except Exception as error:  # report and go on: one broken kernel must not hide the others
            report["variants"][variant] = {"error": f"{type(error).__name__}: {error}"}
            continue
        dit.set_attention(backend)
        if ops == "compiled":
            dit.compile_token_ops()
        else:
            dit.ops = EAGER
        try:
            with torch.no_grad():
                result = time_forward(lambda: dit(latents, t, context), args.repeats)
                result["top_kernels"] = top_kernels(lambda: dit(latents, t, context))
        except Exception as error:
            report["variants"][variant] = {"error": f"{type(error).__name__}: {error}"}
            continue
        out = result.pop("output")
        result["attention"] = backend.implementation
        if args.cfg_batch:
            with torch.no_grad():
                batched = time_forward(lambda: dit(*pair), args.repeats)
            both = batched.pop("output")
            result["cfg_batch"] = {
                **batched,
                "speedup_vs_two_forwards": round(2 * result["ms"] / batched["ms"], 3),
                "relative_difference_cond": relative_difference(both[:1], out),
            }
        if args.cuda_graphs:
            inputs = (latents, t, context)
            result["cuda_graphs"] = time_graphed(dit, inputs, out, result["ms"], stats, args.repeats)
        if reference is not None:
            result["relative_difference_to_diffusers"] = relative_difference(out, reference)
            result["speedup_vs_diffusers"] = round(report["diffusers"]["ms"] / result["ms"], 3)
        if stats is not None:
            result["sparsity"] = stats.summary()
        report["variants"][variant] = result
        print(variant, {k: v for k, v in result.items() if k != "top_kernels"}, flush=True)

    emit(report, args.json_out)
    print(f"{'variant':<18} {'ms':>9} {'x diffusers':>12} {'rel. diff':>10}")
    if "diffusers" in report:
        print(f"{'diffusers':<18} {report['diffusers']['ms']:>9}")
    for name, r in report["variants"].items():
        if "error" in r:
            print(f"{name:<18} error: {r['error'][:80]}")
        else:
            print(
                f"{name:<18} {r['ms']:>9} {r.get('speedup_vs_diffusers', ''):>12} "
                f"{r.get('relative_difference_to_diffusers', ''):>10}"
            )


if __name__ == "__main__":
    main()
