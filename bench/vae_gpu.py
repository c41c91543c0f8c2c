"""VAE decode on the GPU: ours against diffusers' AutoencoderKLWan holding the same weights.

For each ``--sizes`` entry (81 frames: 21 latent frames), random Wan2.1 VAE weights drawn on the GPU
in ``--dtype``, the same latents decoded by:

- diffusers' ``AutoencoderKLWan.decode`` (one latent frame at a time), as users run it, and with
  cuDNN's autotuner on (``torch.backends.cudnn.benchmark``);
- ours (``WanVAE.decode``: channels-last, cuDNN's autotuner on, the fused norm writing each causal
  convolution's input window) for each ``--chunks`` entry (latent frames per decoder pass after the
  first, ``WanVAE.decode_chunk``), and tiled (the level-1+ decode) at the fastest chunk.

Each row: median seconds over ``--repeats`` decodes after one warm-up, and the peak GPU memory of a
decode. The fastest of ours is compared with diffusers' output (relative L2 difference), and the
heaviest CUDA kernels of one of its decodes are listed (profiler). Prints one JSON object, then a table.

    python bench/vae_gpu.py
    python bench/vae_gpu.py --sizes 832x480 --chunks 1,4,20 --json-out vae.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import GB, emit, relative_difference, report_header

from smartdiff.pipeline.config import VAEConfig, load_model_config
from smartdiff.pipeline.tiny import RandomWeights
from smartdiff.pipeline.vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    WanVAE,
    diffusers_vae_arguments,
    diffusers_vae_key_to_official,
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def diffusers_vae(ours: WanVAE, config: VAEConfig, dtype: torch.dtype):
    """diffusers' AutoencoderKLWan holding our weights."""
    from diffusers import AutoencoderKLWan

    with torch.device("cuda"):
        theirs = AutoencoderKLWan(**diffusers_vae_arguments(config))
    state = ours.state_dict()
    theirs.load_state_dict({k: state[diffusers_vae_key_to_official(k, config)] for k in theirs.state_dict()})
    return theirs.to(dtype).eval().requires_grad_(False)


def measure(decode, repeats: int) -> tuple[dict, torch.Tensor]:
    """Median seconds of ``decode()`` after one warm-up, and the peak memory of one call."""
    decode()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        video = decode()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) / GB
    return {"s": round(statistics.median(times), 3), "peak_gb": round(peak, 1)}, video


def heaviest_kernels(decode, top: int = 12) -> list[dict]:
    """The CUDA kernels of one decode with the most device time (ms, share of all kernel time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.device_time_total for e in kernels) or 1.0
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    return [
        {
            "kernel": e.key[:100],
            "ms": round(e.device_time_total / 1000, 1),
            "share": round(e.device_time_total / total, 3),
            "calls": e.count,
        }
        for e in kernels[:top]
    ]


def bench_size(ours: WanVAE, theirs, size: str, chunks: list[int], repeats: int) -> dict:
    width, height = (int(v) for v in size.split("x"))
    _, down_h, down_w = ours.config.stride
    generator = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, ours.config.z_dim, 21, height // down_h, width // down_w, generator=generator,
                          device="cuda")  # fmt: skip
    mean = torch.tensor(LATENTS_MEAN, device="cuda").view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENTS_STD, device="cuda").view(1, -1, 1, 1, 1)
    raw = (latents * std + mean).to(ours.dtype)  # diffusers decodes unnormalised latents

    def theirs_decode() -> torch.Tensor:
        with torch.no_grad():
            return theirs.decode(raw, return_dict=False)[0]

    def ours_decode(chunk: int, tiled: bool = False):
        def decode() -> torch.Tensor:
            ours.decode_chunk = chunk
            return ours.tiled_decode(latents) if tiled else ours.decode(latents)

        return decode

    rows: dict[str, dict] = {}
    outputs: dict[str, torch.Tensor] = {}
    for autotune in (False, True):
        torch.backends.cudnn.benchmark = autotune
        name = "diffusers, autotuned" if autotune else "diffusers"
        rows[name], outputs["diffusers"] = measure(theirs_decode, repeats)
    for chunk in chunks:
        name = f"ours, chunk {chunk}"
        rows[name], outputs[name] = measure(ours_decode(chunk), repeats)
        print(f"{size} {name}: {rows[name]}", flush=True)
    fastest = min((name for name in outputs if name.startswith("ours")), key=lambda name: rows[name]["s"])
    chunk = int(fastest.removeprefix("ours, chunk "))
    rows[f"ours tiled, chunk {chunk}"], _ = measure(ours_decode(chunk, tiled=True), repeats)
    report = {
        "size": f"{size}x81",
        "rows": rows,
        "fastest": fastest,
        "fastest_vs_diffusers": round(rows["diffusers"]["s"] / rows[fastest]["s"], 2),
        "relative_difference_to_diffusers": relative_difference(outputs[fastest], outputs["diffusers"]),
        "kernels_of_fastest": heaviest_kernels(ours_decode(chunk)),
    }
    ours.decode_chunk = WanVAE.DECODE_CHUNK
    torch.backends.cudnn.benchmark = False
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--sizes", default="832x480,1280x720")
    parser.add_argument("--chunks", default="1,2,4,10,20")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    model = load_model_config(args.model)
    dtype = DTYPES[args.dtype]
    ours = RandomWeights(model, draw_device="cuda").vae(dtype, torch.device("cuda"))
    theirs = diffusers_vae(ours, model.vae, dtype)
    report = report_header(model) | {"dtype": args.dtype, "sizes": []}
    chunks = [int(c) for c in args.chunks.split(",")]
    for size in args.sizes.split(","):
        report["sizes"].append(bench_size(ours, theirs, size, chunks, args.repeats))
        torch.cuda.empty_cache()
    emit(report, args.json_out)
    for entry in report["sizes"]:
        print(f"\n{entry['size']}: fastest {entry['fastest']}, {entry['fastest_vs_diffusers']}x diffusers, "
              f"difference {entry['relative_difference_to_diffusers']}")  # fmt: skip
        for name, row in entry["rows"].items():
            print(f"  {name:<34} {row['s']:>7.3f} s {row['peak_gb']:>6.1f} GB")


if __name__ == "__main__":
    main()
