"""What the GPU benchmarks share: the report header and the random-weight checkpoint they run on."""

from __future__ import annotations

import datetime
import gc
import json
import time
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.tiny import write_random_checkpoint


def report_header(model: ModelConfig) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": model.name,
    }


def ensure_checkpoint(path: Path, model: ModelConfig, report: dict) -> None:
    """Write a random-weight official-layout checkpoint of ``model`` at ``path`` unless one is there."""
    if path.exists():
        return
    start = time.perf_counter()
    write_random_checkpoint(path, model, device="cuda", dtype=torch.bfloat16)
    report["write_checkpoint_s"] = round(time.perf_counter() - start, 1)
    gc.collect()
    torch.cuda.empty_cache()


def emit(report: dict, json_out: Path | None) -> None:
    """Print the report as JSON, and write it to ``json_out`` if given."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_out:
        json_out.write_text(text)
