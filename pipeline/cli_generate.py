"""``smartdiff generate``: one video on this machine, with a progress bar."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from smartdiff.pipeline.config import GEMMS, LoraConfig, ProfileConfig, load_profile
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
    parser.add_argument(
        "--dit-weights",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a single-file DiT in place of the checkpoint's (official or ComfyUI names, bf16 or "
        "LightX2V/ComfyUI scaled fp8); once per expert",
    )
    parser.add_argument(
        "--gemm", choices=GEMMS, help="the DiT blocks' linear layers (default: the profile's, else dtype)"
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


def with_overrides(
    profile: ProfileConfig,
    args: argparse.Namespace,
    loras: tuple[LoraConfig, ...],
    dit_files: tuple[str, ...],
) -> ProfileConfig:
    """The profile with what the command line sets instead (its LoRAs stack after the profile's)."""
    return replace(
        profile,
        attention=args.attn or profile.attention,
        dtype=args.dtype or profile.dtype,
        low_mem_level=profile.low_mem_level if args.low_mem_level is None else args.low_mem_level,
        gemm=args.gemm or profile.gemm,
        loras=profile.loras + loras,
        dit_weights=dit_files or profile.dit_weights,
    )


def run(args: argparse.Namespace) -> int:
    # Imported here so that argument errors answer before torch loads.
    from tqdm import tqdm

    from smartdiff.pipeline.checkpoint import open_checkpoint
    from smartdiff.pipeline.loading import CheckpointError
    from smartdiff.pipeline.video import write_mp4
    from smartdiff.pipeline.wan import WanPipeline

    profile = None  # a checkpoint folder on this machine: every strategy, the model's defaults
    try:
        loras = tuple(map(LoraConfig.parse, args.lora))
        dit_files = tuple(str(path.expanduser().resolve()) for path in args.dit_weights)
        if args.profile:
            profile = with_overrides(load_profile(args.profile), args, loras, dit_files)
            if profile.model == "tiny" and not profile.checkpoint_dir.exists():
                from smartdiff.pipeline.tiny import write_tiny_checkpoint

                print(f"writing the tiny checkpoint to {profile.checkpoint_dir}", file=sys.stderr)
                write_tiny_checkpoint(profile.checkpoint_dir)
            model = open_checkpoint(profile.checkpoint_dir, profile.model).model
            params = validate_params(request_from_args(args), model, profile)
            pipe = WanPipeline.from_profile(profile, args.device)
        else:
            model = open_checkpoint(args.model_dir, args.model).model
            params = validate_params(request_from_args(args), model)
            pipe = WanPipeline.from_checkpoint(
                args.model_dir,
                model.name,
                args.device,
                loras,
                dit_files,
                dtype=args.dtype or "auto",
                attention=args.attn or "sdpa",
                low_mem_level=args.low_mem_level or 0,
                gemm=args.gemm or "dtype",
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
        "gemm": result.gemm,
        "loras": result.loras,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        **params.to_dict(),
    }
    summary.pop("negative_prompt")
    print(json.dumps(summary, ensure_ascii=False))
    return 0
