"""``smartdiff generate``: one video on this machine, with a progress bar."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smartdiff.pipeline.config import LoraConfig, load_profile
from smartdiff.pipeline.params import ParamError, add_request_arguments, request_from_args, validate_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="profile name (configs/profiles/NAME.yaml)")
    source.add_argument("--model-dir", type=Path, help="checkpoint folder (official or Diffusers layout)")
    parser.add_argument("--model", help="model name the checkpoint must hold (default: detected)")
    add_request_arguments(parser)
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH[:EXPERT]]",
        help="a LoRA merged into the DiT at load (strength default 1; expert high, low or both for "
        "Wan2.2); repeat to stack, after the profile's own",
    )
    parser.add_argument("--attn", help="attention backend (default: the profile's, else sdpa)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="default: auto")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    parser.add_argument(
        "--low-mem-level",
        type=int,
        choices=range(5),
        help="memory level 0-4 (default: the "
        "profile's, else 0): 1 tiled VAE, 2 streamed T5, 3 streamed DiT, 4 chunked FFN",
    )
    parser.add_argument("--out", type=Path, required=True, help="output .mp4")


def run(args: argparse.Namespace) -> int:
    # Imported here so that argument errors answer before torch loads.
    from tqdm import tqdm

    from smartdiff.pipeline.checkpoint import open_checkpoint
    from smartdiff.pipeline.loading import CheckpointError
    from smartdiff.pipeline.video import write_mp4
    from smartdiff.pipeline.wan import WanPipeline

    profile = None  # a checkpoint folder on this machine: every strategy, the model's defaults
    try:
        if args.profile:
            profile = load_profile(args.profile)
            root, model_name = profile.checkpoint_dir, profile.model
            attention, dtype = args.attn or profile.attention, args.dtype or profile.dtype
            level = profile.low_mem_level if args.low_mem_level is None else args.low_mem_level
            if profile.model == "tiny" and not root.exists():
                from smartdiff.pipeline.tiny import write_tiny_checkpoint

                print(f"writing the tiny checkpoint to {root}", file=sys.stderr)
                write_tiny_checkpoint(root)
        else:
            root, model_name = args.model_dir, args.model
            attention, dtype = args.attn or "sdpa", args.dtype or "auto"
            level = args.low_mem_level or 0
        loras = (*(profile.loras if profile else ()), *map(LoraConfig.parse, args.lora))
        model = open_checkpoint(root, model_name).model
        params = validate_params(request_from_args(args), model, profile)
        pipe = WanPipeline.from_checkpoint(
            root, model.name, args.device, loras, dtype=dtype, attention=attention, low_mem_level=level
        )
    except (ParamError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    bar = tqdm(total=params.steps, unit="step", file=sys.stderr)

    def progress(stage: str, step: int, total: int) -> None:
        bar.set_description(stage)
        if stage == "denoise":
            bar.update(step - bar.n)

    result = pipe.generate(params, progress)
    bar.close()
    write_mp4(result.frames, args.out, fps=result.fps)
    summary = {
        "cache": result.cache,
        "out": str(args.out),
        "model": model.name,
        "attention": result.attention,
        "loras": result.loras,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        **params.to_dict(),
    }
    summary.pop("negative_prompt")
    print(json.dumps(summary, ensure_ascii=False))
    return 0
