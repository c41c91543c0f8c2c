"""Peak GPU memory per stage and seconds per denoising step at every memory level, per expert.

For each level: builds a fresh pipeline (random weights drawn in memory on the GPU, no file, unless
``--checkpoint`` names a folder: written with random weights if missing), warms it up as a worker does
(one forward per expert), then generates one video with a few steps. Every step records its seconds,
its expert and the GPU memory each expert holds; every change of expert records the change's own
seconds. For Wan2.2 the report gives each expert's seconds per step, the switch's cost, and what the
idle expert holds before and after the switch. Prints JSON, then a table.

    python bench/memory_gpu.py --model wan2.1-t2v-14b --steps 2
    python bench/memory_gpu.py --model wan2.2-t2v-a14b --steps 6 --levels 0 3
    python bench/memory_gpu.py --profile wan2.2-a14b-sparge-lowmem --steps 6 --levels 3

At shift 12, 6 steps run the timesteps 999 983 959 922 (high-noise expert) then 856 705 (low-noise):
a shortened schedule that crosses the expert switch (40 steps switch between steps 26 and 27).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import replace
from itertools import chain
from pathlib import Path

import torch
from common import GB, add_attention_options, emit, model_weights, report_header

from smartdiff.pipeline.checkpoint import ModelWeights
from smartdiff.pipeline.config import ProfileConfig, load_model_config, load_profile
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.schedulers import make_scheduler
from smartdiff.pipeline.wan import WanPipeline


def expert_gb(pipe: WanPipeline, index: int) -> float:
    """GPU memory held by one expert: its parameters and buffers on the device, and the blocks its
    streamer has copied there (level 3+)."""
    dit = pipe.experts[index]
    tensors = {id(t): t for t in chain(dit.parameters(), dit.buffers()) if t.is_cuda}
    if pipe.streamers:
        copies = chain.from_iterable(c for c, _ in pipe.streamers[index].loaded.values())
        tensors.update({id(t): t for t in copies})
    return round(sum(t.numel() * t.element_size() for t in tensors.values()) / GB, 3)


class StepRecorder:
    """Per denoising step: seconds (the switch included), timestep, expert, each expert's GPU memory;
    per change of expert: its own seconds."""

    def __init__(self, pipe: WanPipeline, timesteps: list[int]):
        self.pipe = pipe
        self.timesteps = timesteps
        self.steps: list[dict] = []
        self.switches: list[dict] = []
        self.last_expert: int | None = None
        self.step_start = 0.0
        self.switch_seconds = 0.0  # of the step under way
        self._activate = pipe.activate_expert
        pipe.activate_expert = self.activate  # the pipeline calls it at the start of every step

    def activate(self, index: int) -> None:
        torch.cuda.synchronize()
        self.step_start = time.perf_counter()
        self.switch_seconds = 0.0
        self._activate(index)
        if index != self.last_expert:
            torch.cuda.synchronize()
            self.switch_seconds = round(time.perf_counter() - self.step_start, 3)
            self.switches.append(
                {"before_step": len(self.steps), "to_expert": index, "seconds": self.switch_seconds}
            )
            self.last_expert = index

    def progress(self, stage: str, step: int, total: int) -> None:
        if stage != "denoise":
            return
        torch.cuda.synchronize()
        self.steps.append(
            {
                "step": step - 1,
                "timestep": self.timesteps[step - 1],
                "expert": self.last_expert,
                "seconds": round(time.perf_counter() - self.step_start, 3),
                "switch_seconds": self.switch_seconds,
                "expert_gb": [expert_gb(self.pipe, i) for i in range(len(self.pipe.experts))],
            }
        )


def expert_summary(steps: list[dict], switches: list[dict]) -> dict:
    """Seconds per step of each expert (median, switches left out), and the mid-run switch with the
    idle expert's memory."""
    summary = {}
    for expert in sorted({s["expert"] for s in steps}):
        seconds = [s["seconds"] - s["switch_seconds"] for s in steps if s["expert"] == expert]
        summary[f"expert_{expert}_seconds_per_step"] = round(statistics.median(seconds), 3)
    mid_run = [s for s in switches if 0 < s["before_step"] < len(steps)]
    if mid_run:
        switch = mid_run[0]
        before, after = steps[switch["before_step"] - 1], steps[switch["before_step"]]
        summary["switch"] = {
            "between_steps": [before["step"], after["step"]],
            "seconds": switch["seconds"],
            "idle_expert_gb_before": before["expert_gb"][switch["to_expert"]],
            "idle_expert_gb_after": after["expert_gb"][before["expert"]],
        }
    return summary


def measure_level(weights: ModelWeights, profile: ProfileConfig, level: int, request: dict) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe = WanPipeline.from_profile(replace(profile, low_mem_level=level), "cuda", weights)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    resident = torch.cuda.memory_allocated()
    warm_up_s = pipe.warm_up()
    params = validate_params(request, pipe.model)
    timesteps = make_scheduler(params.solver, params.steps, params.shift).timesteps.tolist()
    recorder = StepRecorder(pipe, timesteps)
    result = pipe.generate(params, recorder.progress)
    row = {
        "level": level,
        "load_s": round(load_s, 1),
        "warm_up_s": round(warm_up_s, 1),
        "resident_gb": round(resident / GB, 2),
        "peak_gb": {stage: round(b / GB, 2) for stage, b in result.peak_memory.items()},
        "seconds_per_step": round(result.seconds["denoise"] / params.steps, 3),
        "vae_decode_s": round(result.seconds["vae_decode"], 2),
        "text_encode_s": round(result.seconds["text_encode"], 3),
        "attention_sparsity": result.attention_sparsity,
        "steps": recorder.steps,
        "switches": recorder.switches,
        **expert_summary(recorder.steps, recorder.switches),
    }
    del pipe, result, recorder
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--profile", help="run as this profile does (attention, compile); its model wins")
    add_attention_options(parser)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder, written if missing")
    parser.add_argument("--size")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    if args.profile:
        profile = load_profile(args.profile)
        model = load_model_config(profile.model)
    else:
        model = load_model_config(args.model)
        profile = ProfileConfig(name="bench", model=model.name, checkpoint="none")
    profile = replace(profile, attention_options={**profile.attention_options, **args.attention_options})
    report = report_header(model)
    report["profile"] = profile.name
    report["attention"] = {"backend": profile.attention, **profile.attention_options}
    weights = model_weights(args.checkpoint, model, report)
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
        report["levels"].append(measure_level(weights, profile, level, request))
        print(json.dumps({k: v for k, v in report["levels"][-1].items() if k != "steps"}), flush=True)
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
        if "switch" in row:
            s, high, low = row["switch"], row["expert_0_seconds_per_step"], row["expert_1_seconds_per_step"]
            print(
                f"      experts s/step {high} / {low}, "
                f"switch {s['seconds']} s, idle expert {s['idle_expert_gb_before']} GB before, "
                f"{s['idle_expert_gb_after']} GB after"
            )


if __name__ == "__main__":
    main()
