"""4-step CFG-free videos and fp8 products against 50-step CFG and bf16, side by side in one run.

For one model and video shape, with random weights drawn in memory (the speed of dense work does not
depend on weight values), and for each ``--gemms`` entry ("dtype": the model's bf16, "fp8": e4m3
products, pipeline/fp8.py), the pipeline is built as a profile would build it (``--attention``,
token-wise work compiled, warmed up) and measured:

- one DiT forward (median ms) and, from the profiler's table of that forward, the time of its linear
  layers: the matrix products (``aten::addmm``/``mm``/``_addmm_activation``/``_scaled_mm``), the
  blocks' input norms (``dit.input_norm``: with fp8 they write the e4m3 rows q/k/v, the
  cross-attention's q and the first feed-forward layer read) and, for fp8, the other activations'
  quantisation (with the feed-forward's GELU in it; any separate GELU pass is counted too). Norms
  are counted on both sides because fp8 moves work into them. The same profile gives the GPU's busy
  and idle milliseconds within that forward (``linear_layers.gpu``) and the kernels launched inside
  the norm and quantisation ranges (``linear_layers.kernels_in_ranges``: a range that reads more
  than its kernel shows what else it holds). The fp8 forward's output is
  compared with the bf16 one (relative L2 difference);
- one whole 4-step CFG-free video (``distill``, timesteps 1000/750/500/250, shift 5, guidance 1):
  seconds per stage, end to end, and peak GPU memory;
- the 50-step CFG video of the same pipeline, projected from what was measured: its text encode
  and VAE decode as in the 4-step video, plus 100 forwards at the measured forward time (running
  it would take 20 minutes at 14B 720p). The report marks it ``projected``.

Prints one JSON object (and a short table).

    python bench/distill_fp8_gpu.py --model wan2.1-t2v-1.3b --json-out distill_1.3b.json
    python bench/distill_fp8_gpu.py --model wan2.1-t2v-14b --size 1280x720 --attention sage
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from common import relative_difference

from smartdiff.pipeline.config import load_model_config
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.tiny import RandomWeights
from smartdiff.pipeline.wan import WanPipeline

GB = 1024**3
PRODUCTS = ("aten::addmm", "aten::mm", "aten::_addmm_activation", "aten::_scaled_mm")
LINEAR_OPS = PRODUCTS + ("dit.input_norm",)
FP8_EXTRA = ("fp8.quantize_activations", "aten::gelu")  # what the fp8 path adds around its products


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (the pipeline's warm_up compiled at this shape already)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(sorted(times)[len(times) // 2], 2), out


def linear_time(fn, device: torch.device, gemm: str) -> dict:
    """Milliseconds of the linear layers in one call of ``fn``, from the profiler's op table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    ops = {e.key: e for e in prof.key_averages()}

    def ms(key: str) -> float:
        event = ops.get(key)
        if event is None:
            return 0.0
        total = event.device_time_total if device.type == "cuda" else event.cpu_time_total
        return total / 1000

    parts = {key: round(ms(key), 2) for key in LINEAR_OPS + (FP8_EXTRA if gemm == "fp8" else ()) if ms(key)}
    report = {"ms": round(sum(parts.values()), 2), "parts": parts}
    if device.type == "cuda":
        report["gpu"] = kernel_occupancy(prof)
        report["kernels_in_ranges"] = {
            name: kernels_in_range(prof, name) for name in ("dit.input_norm", "fp8.quantize_activations")
        }
    return report


def kernels_in_range(prof, name: str) -> dict:
    """The kernels that ran on the GPU inside the ranges called ``name`` (the range's GPU-side span,
    so Triton's launches count as much as torch's): {kernel: [ms, calls]}, busiest first. What a
    range's time is made of."""
    from torch.autograd import DeviceType

    gpu_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = [
        (e.time_range.start, e.time_range.end) for e in gpu_events if e.is_user_annotation and e.name == name
    ]
    totals: dict[str, list] = {}
    for kernel in (e for e in gpu_events if not e.is_user_annotation):
        start, end = kernel.time_range.start, kernel.time_range.end
        if any(first <= start and end <= last for first, last in spans):
            entry = totals.setdefault(kernel.name[:100], [0.0, 0])
            entry[0] += (end - start) / 1000
            entry[1] += 1
    ordered = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)
    return {kernel: [round(ms, 2), calls] for kernel, (ms, calls) in ordered}


def kernel_occupancy(prof) -> dict:
    """The profiled call's GPU activity: the milliseconds some kernel or copy ran (overlaps counted
    once), and the milliseconds within their span when none did: the GPU waiting for the CPU."""
    from torch.autograd import DeviceType

    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = spans[-1][1] - spans[0][0] if spans else 0.0
    return {"busy_ms": round(busy / 1000, 2), "idle_ms": round((span - busy) / 1000, 2)}


def quantiser_matches_reference(device: torch.device) -> bool:
    """Whether the GPU's fused activation quantisation gives PyTorch's bytes and scales exactly."""
    from smartdiff.kernels.triton_fp8 import quantize_rows_fused
    from smartdiff.pipeline.fp8 import quantize_rows

    x = torch.randn(4096, 5120, device=device, generator=torch.Generator(device).manual_seed(1))
    x = (x * torch.logspace(-3, 2, 4096, device=device)[:, None]).to(torch.bfloat16)
    values, scale = quantize_rows_fused(x)
    expected_values, expected_scale = quantize_rows(x)
    return bool(
        torch.equal(scale, expected_scale)
        and torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    )


def build(weights: RandomWeights, device: torch.device, gemm: str, args: argparse.Namespace) -> WanPipeline:
    pipe = WanPipeline.from_weights(
        weights,
        device,
        attention=args.attention,
        attention_options=args.attention_options,
        compile=device.type == "cuda",
        gemm=gemm,
    )
    pipe.warm_up()
    return pipe


def measure(pipe: WanPipeline, args: argparse.Namespace, device: torch.device, gemm: str) -> dict:
    model = pipe.model
    base = {"prompt": "a red ball bouncing on a beach", "seed": 0, "frames": args.frames}
    if args.size:
        base["size"] = args.size
    distill = validate_params({**base, "solver": "distill", "steps": 4, "shift": 5.0, "guidance": 1.0}, model)
    cond, _ = pipe.encode_text(distill)
    latents = pipe.initial_noise(distill).to(pipe.experts[0].patch_embedding.weight.dtype)
    t = torch.tensor([999], device=device)
    dit = pipe.experts[0]
    report: dict = {"gemm": pipe.gemm, "attention": pipe.attention.implementation}
    with torch.no_grad():
        report["forward_ms"], output = median_ms(lambda: dit(latents, t, cond), device, args.repeats)
        report["linear_layers"] = linear_time(lambda: dit(latents, t, cond), device, gemm)

    pipe.text_encoder.cache.clear()  # the video pays for its text encode, as a new prompt's does
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = pipe.generate(distill)
    total = time.perf_counter() - start
    seconds = {k: round(v, 2) for k, v in result.seconds.items()}
    report["video_4step_cfg_free"] = {
        "seconds": seconds,
        "total_s": round(total, 2),
        "forwards": result.cache.get("computed"),
        "peak_gb": round(torch.cuda.max_memory_allocated(device) / GB, 2) if device.type == "cuda" else None,
    }
    steps = model.sampling.steps
    forwards = 2 * steps  # CFG: two branches per step
    projected = seconds["text_encode"] + forwards * report["forward_ms"] / 1000 + seconds["vae_decode"]
    report[f"video_{steps}step_cfg"] = {
        "projected": True,
        "forwards": forwards,
        "total_s": round(projected, 1),
    }
    report["shape"] = f"{distill.size}x{distill.frames}"
    return report, output.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--size", help="default: the model's")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument(
        "--attention-options", type=json.loads, default={}, help='e.g. {"implementation": "triton"}'
    )
    parser.add_argument("--gemms", default="dtype,fp8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    model = load_model_config(args.model)
    weights = RandomWeights(model, draw_device=device)
    report: dict = {"model": model.name, "torch": torch.__version__, "weights": weights.origin}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    if device.type == "cuda" and "fp8" in args.gemms:
        report["fp8_quantiser_matches_reference"] = quantiser_matches_reference(device)
    outputs = {}
    for gemm in args.gemms.split(","):
        start = time.perf_counter()
        pipe = build(weights, device, gemm, args)
        built_s = time.perf_counter() - start
        report[gemm], outputs[gemm] = measure(pipe, args, device, gemm)
        report[gemm]["build_and_warm_up_s"] = round(built_s, 1)
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))
    if "dtype" in outputs and "fp8" in outputs:
        report["fp8_forward_relative_difference"] = relative_difference(outputs["fp8"], outputs["dtype"])
        report["fp8_linear_speedup"] = round(
            report["dtype"]["linear_layers"]["ms"] / report["fp8"]["linear_layers"]["ms"], 2
        )
        products = {
            g: sum(report[g]["linear_layers"]["parts"].get(k, 0.0) for k in PRODUCTS) for g in outputs
        }
        report["fp8_products_speedup"] = round(products["dtype"] / products["fp8"], 2)
        report["fp8_forward_speedup"] = round(report["dtype"]["forward_ms"] / report["fp8"]["forward_ms"], 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    print(f"{'gemm':<6} {'forward ms':>11} {'linears ms':>11} {'4-step s':>9} {'peak GB':>8} {'CFG s':>8}")
    for gemm in outputs:
        r = report[gemm]
        cfg = next(v for k, v in r.items() if k.endswith("step_cfg"))
        video = r["video_4step_cfg_free"]
        print(
            f"{gemm:<6} {r['forward_ms']:>11} {r['linear_layers']['ms']:>11} {video['total_s']:>9} "
            f"{video['peak_gb']!s:>8} {cfg['total_s']:>8}"
        )


if __name__ == "__main__":
    main()
