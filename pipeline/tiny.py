"""Writing random-weight Wan checkpoints in the official file layout.

``smartdiff tiny-model`` uses it for a few-MB model that tests and the demo run on a CPU; the GPU
benchmark uses it for full-size checkpoints (the speed of dense work does not depend on weight
values). Weights are drawn from a seeded generator, so a seed always gives the same checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from smartdiff.pipeline.checkpoint import T5_FILE, TOKENIZER_DIR, VAE_FILE
from smartdiff.pipeline.config import ModelConfig, load_model_config
from smartdiff.pipeline.dit import WanDiT
from smartdiff.pipeline.text_encoder import (
    TINY_VOCABULARY,
    build_text_encoder,
    hf_t5_key_to_official,
    write_tiny_tokenizer,
)
from smartdiff.pipeline.vae import WanVAE


def random_tensor(
    key: str, shape: torch.Size, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """A plausible random value for a parameter, chosen by its name and shape."""
    leaf = key.rsplit(".", 1)[-1]
    normal = torch.randn(shape, generator=generator, device=device)
    if "norm" in key or leaf == "gamma":
        return 1.0 + 0.02 * normal
    if leaf == "bias":
        return 0.02 * normal
    if leaf == "modulation":
        return normal / math.sqrt(shape[-1])
    if "embedding.weight" in key and len(shape) == 2 and "text_embedding" not in key and "time" not in key:
        return normal  # token and relative-position tables
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return normal / math.sqrt(fan_in)


def random_state(
    module: nn.Module, seed: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Random tensors for every entry of a meta-built module's state dict, on the CPU."""
    generator = torch.Generator(device).manual_seed(seed)
    return {
        key: random_tensor(key, meta.shape, generator, device).to(dtype).cpu()
        for key, meta in module.state_dict().items()
    }


def dit_config_json(model: ModelConfig) -> dict:
    """The official ``config.json`` of the DiT, with every setting stated (the official key names)."""
    return {"_class_name": "WanModel", "model_type": "t2v", **asdict(model.dit)}


def write_dit(
    folder: Path, model: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype, shards: int = 1
) -> None:
    """One DiT: config.json and diffusion_pytorch_model.safetensors (or ``shards`` files + index)."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        dit = WanDiT(model.dit)
    state = random_state(dit, seed, device, dtype)
    (folder / "config.json").write_text(json.dumps(dit_config_json(model), indent=2))
    if shards == 1:
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
        save_file({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_checkpoint(
    root: Path,
    model: ModelConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    dit_shards: int = 1,
) -> Path:
    """A complete official-layout checkpoint of ``model`` with random weights and the small tokenizer."""
    root = Path(root)
    device = torch.device(device)
    root.mkdir(parents=True, exist_ok=True)
    if model.is_moe:
        for i, expert in enumerate(model.experts):
            write_dit(root / expert, model, seed + 1 + i, device, dtype, dit_shards)
    else:
        write_dit(root, model, seed + 1, device, dtype, dit_shards)

    with torch.device("meta"):
        vae = WanVAE(model.vae)
    torch.save(random_state(vae, seed + 10, device, dtype), root / VAE_FILE)

    t5 = build_text_encoder(model.t5)
    t5_state = random_state(t5, seed + 20, device, dtype)
    torch.save({hf_t5_key_to_official(k): v for k, v in t5_state.items()}, root / T5_FILE)

    write_tiny_tokenizer(root / TOKENIZER_DIR, TINY_VOCABULARY)
    return root


def write_tiny_checkpoint(root: Path, seed: int = 0, model_name: str = "tiny") -> Path:
    return write_random_checkpoint(root, load_model_config(model_name), seed)
