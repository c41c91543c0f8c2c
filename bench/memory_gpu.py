"""Peak GPU memory per stage and seconds per denoising step at every memory level.

For each model: writes a random-weight checkpoint in the official layout (if missing), then for
each level loads a fresh pipeline and generates one video with a few steps. Prints JSON and a table.

    python bench/memory_gpu.py --model wan2.1-t2v-14b --checkpoint /tmp/wan14 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from common import GB, emit, ensure_checkpoint, report_header

from smartdiff.pipeline.config import load_model_config
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.wan import WanPipeline


def measure_level(checkpoint: Path, model_name: str, level: int, request: dict) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe = WanPipeline.from_checkpoint(checkpoint, model_name, "cuda", low_mem_level=level)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    resident = torch.cuda.memory_allocated()
    params = validate_params(request, pipe.model)
    pipe.generate(validate_params({**request, "steps": 1, "frames": 1}, pipe.model))  # warm-up
    result = pipe.generate(params)
    row = {
        "level": level,
        "load_s": round(load_s, 1),
        "resident_gb": round(resident / GB, 2),
        "peak_gb": {stage: round(b / GB, 2) for stage, b in result.peak_memory.items()},
        "seconds_per_step": round(result.seconds["denoise"] / params.steps, 3),
        "vae_decode_s": round(result.seconds["vae_decode"], 2),
        "text_encode_s": round(result.seconds["text_encode"], 3),
    }
    del pipe, result
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--size")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    model = load_model_config(args.model)
    report = report_header(model)
    ensure_checkpoint(args.checkpoint, model, report)
    request = {
        "prompt": "a red ball bouncing on a beach",
        "frames": args.frames,
        "steps": args.steps,
        "seed": 0,
        "size": args.size or model.sampling.size,
    }
    report["shape"] = f"{request['size']}x{args.frames}"
    report["steps"] = args.steps
    report["levels"] = []
    for level in args.levels:
        report["levels"].append(measure_level(args.checkpoint, model.name, level, request))
        print(json.dumps(report["levels"][-1]), flush=True)
    base = report["levels"][0]["seconds_per_step"]
    for row in report["levels"]:
        row["time_vs_first"] = round(row["seconds_per_step"] / base, 3)
        row["peak_gb_overall"] = max(row["peak_gb"].values())
    emit(report, args.json_out)
    print(f"{'level':>5} {'text_encode':>11} {'denoise':>8} {'vae':>6} {'peak':>6} {'s/step':>7} {'x':>6}")
    for row in report["levels"]:
        p = row["peak_gb"]
        print(
            f"{row['level']:>5} {p['text_encode']:>11} {p['denoise']:>8} {p['vae_decode']:>6} "
            f"{row['peak_gb_overall']:>6} {row['seconds_per_step']:>7} {row['time_vs_first']:>6}"
        )


if __name__ == "__main__":
    main()
