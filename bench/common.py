"""What the GPU benchmarks share: the report header, the weights they run on, timing helpers."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import torch

from smartdiff.pipeline.checkpoint import CheckpointWeights, ModelWeights, open_checkpoint
from smartdiff.pipeline.config import ModelConfig
from smartdiff.pipeline.dit import diffusers_dit_key_to_official
from smartdiff.pipeline.tiny import RandomWeights, write_random_checkpoint

GB = 1024**3


def report_header(model: ModelConfig) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": model.name,
    }


def model_weights(checkpoint: Path | None, model: ModelConfig, report: dict) -> ModelWeights:
    """The weights a benchmark runs on: random ones drawn on the GPU with no file (``checkpoint``
    None), or a checkpoint folder, written with random weights first if it is missing. The report
    says which."""
    if checkpoint is None:
        weights = RandomWeights(model, draw_device="cuda")
    else:
        if not checkpoint.exists():
            start = time.perf_counter()
            write_random_checkpoint(checkpoint, model, device="cuda", dtype=torch.bfloat16)
            report["write_checkpoint_s"] = round(time.perf_counter() - start, 1)
            gc.collect()
            torch.cuda.empty_cache()
        weights = CheckpointWeights(open_checkpoint(checkpoint, model.name))
    report["weights"] = weights.origin
    return weights


def add_attention_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention-options",
        type=json.loads,
        default={},
        help="JSON merged into the profile's attention options, e.g. '{\"sim_threshold\": -1}' for sparge "
        "on random weights (no two blocks alike: the similarity rule would keep every block)",
    )


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32, to three significant digits."""
    a, b = a.float(), b.float()
    return float(f"{((a - b).norm() / b.norm()).item():.3g}")


def emit(report: dict, json_out: Path | None) -> None:
    """Print the report as JSON, and write it to ``json_out`` if given."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_out:
        json_out.write_text(text)


def time_forward(fn, repeats: int) -> dict:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after two warm-ups, and its memory."""
    for _ in range(2):
        out = fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {
        "ms": round(times[len(times) // 2], 2),
        "ms_min": round(times[0], 2),
        "activation_peak_gb": round((torch.cuda.max_memory_allocated() - before) / GB, 2),
        "output": out,
    }


def diffusers_dit(our_dit, config):
    """diffusers' WanTransformer3DModel holding our DiT's weights, dtypes as from_pretrained gives them."""
    from diffusers import WanTransformer3DModel

    d = config.dit
    with torch.device("cuda"):
        ref = WanTransformer3DModel(
            patch_size=d.patch_size,
            num_attention_heads=d.num_heads,
            attention_head_dim=d.head_dim,
            in_channels=d.in_dim,
            out_channels=d.out_dim,
            text_dim=d.text_dim,
            freq_dim=d.freq_dim,
            ffn_dim=d.ffn_dim,
            num_layers=d.num_layers,
        )
    ours = our_dit.state_dict()
    ref.load_state_dict({k: ours[diffusers_dit_key_to_official(k)] for k in ref.state_dict()})
    ref.to(torch.bfloat16)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, param in ref.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    return ref.eval().requires_grad_(False)
