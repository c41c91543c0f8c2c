"""Random-weight Wan models: written as checkpoints in the official file layout, or drawn in memory.

``smartdiff tiny-model`` uses it for a few-MB model that tests and the demo run on a CPU; the GPU
benchmarks use ``RandomWeights`` for full-size models, drawn in memory with no file at all (the speed
of dense work does not depend on weight values). Weights are drawn from a seeded generator, so a seed
always gives the same checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from smartdiff.pipeline.checkpoint import (
    T5_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    dit_from_state,
    text_encoder_from_state,
    vae_from_state,
)
from smartdiff.pipeline.config import LoraConfig, ModelConfig, load_model_config
from smartdiff.pipeline.dit import WanDiT
from smartdiff.pipeline.text_encoder import (
    TINY_VOCABULARY,
    TextEncoder,
    build_text_encoder,
    hf_t5_key_to_official,
    tiny_tokenizer,
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
    """Random tensors for every entry of a meta-built module's state dict, drawn on ``device``."""
    generator = torch.Generator(device).manual_seed(seed)
    return {
        key: random_tensor(key, meta.shape, generator, device).to(dtype)
        for key, meta in module.state_dict().items()
    }


def dit_config_json(model: ModelConfig) -> dict:
    """The official ``config.json`` of the DiT, with every setting stated (the official key names)."""
    return {"_class_name": "WanModel", "model_type": "t2v", **asdict(model.dit)}


def random_dit_state(model: ModelConfig, index: int, seed: int, device: torch.device, dtype: torch.dtype):
    """The random weights of DiT expert ``index`` (official names)."""
    with torch.device("meta"):
        dit = WanDiT(model.dit)
    return random_state(dit, seed + 1 + index, device, dtype)


def random_vae_state(model: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype):
    with torch.device("meta"):
        vae = WanVAE(model.vae)
    return random_state(vae, seed + 10, device, dtype)


def random_t5_state(model: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype):
    """The random weights of the UMT5 encoder (Hugging Face names)."""
    return random_state(build_text_encoder(model.t5), seed + 20, device, dtype)


class RandomWeights:
    """Random weights of ``model``'s real shapes, drawn on ``draw_device`` into the modules the loader
    builds (``checkpoint.*_from_state``): no file is written or read, so a benchmark can run a model
    larger than any disk it has. A seed gives the weights ``write_random_checkpoint`` writes."""

    def __init__(
        self,
        model: ModelConfig,
        seed: int = 0,
        draw_device: torch.device | str = "cpu",
        loras: Sequence[LoraConfig] = (),
    ):
        self.model = model
        self.seed = seed
        self.loras = tuple(loras)
        self.draw_device = torch.device(draw_device)
        self.origin = f"random (seed {seed}), drawn in memory on {self.draw_device}: no checkpoint file"

    def dit(self, index: int, dtype: torch.dtype, device: torch.device, gemm: str = "dtype") -> WanDiT:
        state = random_dit_state(self.model, index, self.seed, self.draw_device, dtype)
        experts = (index, len(self.model.experts))
        return dit_from_state(self.model.dit, state, self.origin, dtype, device, self.loras, experts, gemm)

    def text_encoder(self, dtype: torch.dtype, device: torch.device) -> TextEncoder:
        state = random_t5_state(self.model, self.seed, self.draw_device, dtype)
        tokenizer = tiny_tokenizer(TINY_VOCABULARY)
        return text_encoder_from_state(self.model, state, self.origin, tokenizer, dtype, device)

    def vae(self, dtype: torch.dtype, device: torch.device) -> WanVAE:
        state = random_vae_state(self.model, self.seed, self.draw_device, dtype)
        return vae_from_state(self.model.vae, state, self.origin, dtype, device)


def write_dit(
    folder: Path,
    model: ModelConfig,
    index: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    shards: int = 1,
) -> None:
    """DiT expert ``index``: config.json, diffusion_pytorch_model.safetensors (or ``shards`` + index)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in random_dit_state(model, index, seed, device, dtype).items()}
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
    index_file = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


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
    folders = [root / expert for expert in model.experts] if model.is_moe else [root]
    for index, folder in enumerate(folders):
        write_dit(folder, model, index, seed, device, dtype, dit_shards)
    vae_state = random_vae_state(model, seed, device, dtype)
    torch.save({k: v.cpu() for k, v in vae_state.items()}, root / VAE_FILE)
    t5_state = random_t5_state(model, seed, device, dtype)
    torch.save({hf_t5_key_to_official(k): v.cpu() for k, v in t5_state.items()}, root / T5_FILE)
    write_tiny_tokenizer(root / TOKENIZER_DIR, TINY_VOCABULARY)
    return root


def write_tiny_checkpoint(root: Path, seed: int = 0, model_name: str = "tiny") -> Path:
    return write_random_checkpoint(root, load_model_config(model_name), seed)
