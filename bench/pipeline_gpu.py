"""Whole-pipeline speed and memory on one GPU, beside diffusers' Wan DiT on the same weights.

Builds the model with random weights drawn in memory on the GPU (or loads ``--checkpoint``, written
with random weights first if the folder is missing) through the loader's module construction, times
one DiT forward of ours and of diffusers' WanTransformer3DModel with the same weights at the same
shape, then generates one whole video.
Prints one JSON object. Random weights: the speed of dense work does not depend on weight values.

``--profile`` runs the way a profile does (attention backend, compile, memory level; the pipeline is
warmed up first, as a worker does before its first job) and ``--request`` adds fields to the video's
request (a feature cache, the CFG cache). TeaCache's skips depend on the weights: with random ones its
speed-up is not the one trained weights give, and the report counts the block stacks it computed; PAB
and the CFG cache follow fixed schedules.

    python bench/pipeline_gpu.py --model wan2.1-t2v-1.3b --json-out result.json
    python bench/pipeline_gpu.py --profile wan2.1-1.3b-sparge --request '{"cfg_cache_interval": 2}'
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import GB, add_attention_options, diffusers_dit, emit, model_weights, report_header, time_forward

from smartdiff.pipeline.config import load_model_config, load_profile
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.video import write_mp4
from smartdiff.pipeline.wan import WanPipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--profile", help="run as this profile does (its model replaces --model)")
    parser.add_argument(
        "--request",
        type=json.loads,
        default={},
        help='more fields of the video\'s request, as JSON: {"flexcache": "pab"}',
    )
    add_attention_options(parser)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder, written if missing")
    parser.add_argument("--size", default=None)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--video-out", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.attention_options and not args.profile:
        parser.error("--attention-options changes a profile's options: it needs --profile")

    profile = load_profile(args.profile) if args.profile else None
    model = load_model_config(profile.model if profile else args.model)
    report = report_header(model)
    weights = model_weights(args.checkpoint, model, report)

    start = time.perf_counter()
    if profile:
        report["profile"] = profile.name
        options = {**profile.attention_options, **args.attention_options}
        report["attention_options"] = options
        pipe = WanPipeline.from_profile(replace(profile, attention_options=options), "cuda", weights)
    else:
        pipe = WanPipeline.from_weights(weights, "cuda")
    torch.cuda.synchronize()
    report["load_s"] = round(time.perf_counter() - start, 1)
    if profile:
        report["warm_up_s"] = round(pipe.warm_up(), 1)
    report["resident_gb"] = round(torch.cuda.memory_allocated() / GB, 2)
    report["attention"] = pipe.attention.implementation

    request = {
        "prompt": "a red ball bouncing on a beach",
        "frames": args.frames,
        "steps": args.steps,
        "seed": 0,
        **args.request,
    }
    if args.size:
        request["size"] = args.size
    params = validate_params(request, model)
    report["shape"] = f"{params.size}x{params.frames}"
    cond, _ = pipe.encode_text(params)
    latents = pipe.initial_noise(params).to(torch.bfloat16)
    t = torch.tensor([999], device="cuda")
    dit = pipe.experts[0]
    with torch.no_grad():
        ours = time_forward(lambda: dit(latents, t, cond), args.repeats)
        report["tokens"] = latents[0, 0].numel() // 4
        report["dit_forward"] = {k: v for k, v in ours.items() if k != "output"}
        if not args.skip_diffusers:
            ref = diffusers_dit(dit, model)
            theirs = time_forward(lambda: ref(latents, t, cond, return_dict=False)[0], args.repeats)
            report["diffusers_dit_forward"] = {k: v for k, v in theirs.items() if k != "output"}
            diff = (ours["output"] - theirs["output"].float()).norm() / theirs["output"].float().norm()
            report["relative_difference_to_diffusers"] = float(f"{diff.item():.3g}")
            report["speedup_vs_diffusers"] = round(theirs["ms"] / ours["ms"], 3)
            del ref
            torch.cuda.empty_cache()

    if not args.skip_video:
        # The forward's timing encoded this prompt; the video pays for its text encode, as a new
        # prompt's does.
        pipe.text_encoder.cache.clear()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = pipe.generate(params)
        report["video"] = {
            "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
            "total_s": round(time.perf_counter() - start, 2),
            "peak_gb": round(torch.cuda.max_memory_allocated() / GB, 2),
            "frames": list(result.frames.shape),
            "attention": result.attention,
            "cache": result.cache,
            "attention_sparsity": result.attention_sparsity,
        }
        if args.video_out:
            start = time.perf_counter()
            try:
                write_mp4(result.frames, args.video_out, fps=result.fps)
                report["video"]["mp4_encode_s"] = round(time.perf_counter() - start, 2)
            except (OSError, RuntimeError) as error:  # no ffmpeg binary on the machine
                report["video"]["mp4"] = f"not written: {error}"

    emit(report, args.json_out)


if __name__ == "__main__":
    main()
