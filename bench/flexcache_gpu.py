"""FlexCache on one GPU: DiT forwards computed and reused, wall time, cache memory, and the cost of
the TeaCache decision, for a whole video with no caching, TeaCache, PAB and the CFG cache (alone
and with PAB). Prints one JSON object.

Random weights: the reuse pattern of TeaCache depends on how the model's time embedding moves,
which random weights do not reproduce; only the speed side (what a given reuse count costs and
saves) carries over to real checkpoints. PAB and the CFG cache follow fixed schedules.

    python bench/flexcache_gpu.py --model wan2.1-t2v-1.3b
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import GB, emit, model_weights, report_header

from smartdiff.pipeline.config import load_model_config
from smartdiff.pipeline.flexcache import _TeaCache, _TeaState
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.wan import WanPipeline


def decision_cost_ms(pipe: WanPipeline, params, repeats: int = 200) -> float:
    """Milliseconds of one TeaCache decision (relative L1 on the GPU, polynomial, one sync)."""
    dit = pipe.experts[0]
    tea = _TeaCache(params, pipe.model)
    state = _TeaState()
    embeddings = [dit.embed_time(torch.tensor([t], device=pipe.device))[0] for t in (999, 990)]
    state.residual = torch.zeros(1, device=pipe.device)
    tea.should_compute(state, embeddings[0], 0, 50)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(repeats):
        tea.should_compute(state, embeddings[i % 2], 10, 50)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder, written if missing")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    model = load_model_config(args.model)
    report = report_header(model)
    pipe = WanPipeline.from_weights(model_weights(args.checkpoint, model, report), "cuda")
    base = {"prompt": "a red ball bouncing on a beach", "frames": args.frames, "steps": args.steps, "seed": 0}
    runs = {
        "none": {},
        "teacache-0.08": {"flexcache": "teacache", "teacache_threshold": 0.08},
        "teacache-0.2": {"flexcache": "teacache", "teacache_threshold": 0.2},
        "pab": {"flexcache": "pab"},
        "cfg-cache-2": {"cfg_cache_interval": 2},
        "cfg-cache-2-below-900": {"cfg_cache_interval": 2, "cfg_cache_end": 900},
        "pab+cfg-cache-2-below-900": {"flexcache": "pab", "cfg_cache_interval": 2, "cfg_cache_end": 900},
    }
    report.update(shape=f"{model.sampling.size}x{args.frames}", steps=args.steps, runs={})
    pipe.generate(validate_params({**base, "steps": 2}, model))  # warm-up
    for name, extra in runs.items():
        params = validate_params({**base, **extra}, model)
        torch.cuda.reset_peak_memory_stats()
        result = pipe.generate(params)
        report["runs"][name] = {
            "denoise_s": round(result.seconds["denoise"], 2),
            "total_s": round(sum(result.seconds.values()), 2),
            "cache": {k: v for k, v in result.cache.items() if k != "peak_cache_bytes"},
            "cache_peak_gb": round(result.cache["peak_cache_bytes"] / GB, 2),
            "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / GB, 2),
        }
    none = report["runs"]["none"]
    step_ms = 1000 * none["denoise_s"] / args.steps
    for entry in report["runs"].values():
        entry["speedup_vs_none"] = round(none["denoise_s"] / entry["denoise_s"], 3)
    cost = decision_cost_ms(pipe, validate_params({**base, **runs["teacache-0.08"]}, model))
    report["teacache_decision_ms"] = round(cost, 3)
    report["decision_share_of_a_step"] = round(2 * cost / step_ms, 5)  # two decisions (cond, uncond) a step
    emit(report, args.json_out)


if __name__ == "__main__":
    main()
