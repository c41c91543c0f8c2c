"""Checkpoint folders as users download them: the official Wan layout and the Diffusers layout.

Official:  config.json, diffusion_pytorch_model.safetensors (or shards + .index.json),
           models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, google/umt5-xxl/ (tokenizer);
           Wan2.2-A14B keeps one DiT in high_noise_model/ and one in low_noise_model/.
Diffusers: model_index.json, transformer/ (+ transformer_2/ for A14B), text_encoder/, vae/, tokenizer/.

Every module is built on the meta device and its weights assigned once, in the target dtype.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from smartdiff.pipeline.config import DiTConfig, ModelConfig, list_model_names, load_model_config
from smartdiff.pipeline.dit import FP32_PARAMETERS, WanDiT, diffusers_dit_key_to_official
from smartdiff.pipeline.loading import (
    CheckpointError,
    assign_weights,
    find_model_weights,
    read_safetensors,
    read_weights,
    rename_keys,
    require_file,
)

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
DIFFUSERS_EXPERT_DIRS = ("transformer", "transformer_2")  # high-noise first, as Wan2.2 uses them


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder, its layout and the model it holds."""

    root: Path
    layout: str  # "official" or "diffusers"
    model: ModelConfig

    @property
    def expert_dirs(self) -> list[Path]:
        """One folder per DiT, in the order the sampler uses them."""
        if self.layout == "diffusers":
            return [self.root / d for d in DIFFUSERS_EXPERT_DIRS[: len(self.model.experts)]]
        if self.model.is_moe:
            return [self.root / name for name in self.model.experts]
        return [self.root]


def open_checkpoint(root: Path | str, model_name: str | None = None) -> Checkpoint:
    """Inspect a checkpoint folder: its layout and which model it is (checked against ``model_name``)."""
    root = Path(root)
    if not root.exists():
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(root)):
            hint = (
                " Loading from a model hub at run time is not supported:"
                " download the checkpoint and pass its folder."
            )
        raise CheckpointError(f"checkpoint folder {root} does not exist.{hint}")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder")
    layout = (
        "diffusers"
        if (root / "model_index.json").is_file() or (root / "transformer").is_dir()
        else "official"
    )
    found = _identify(root, layout)
    if model_name is not None and found != model_name:
        raise CheckpointError(f"{root} holds {found}, not {model_name}")
    return Checkpoint(root, layout, load_model_config(found))


def _dit_shape(folder: Path, layout: str) -> tuple[int, int, int, int]:
    """(dim, ffn_dim, num_layers, num_heads) of the DiT in ``folder``, from config.json or the weights."""
    config_path = folder / "config.json"
    if config_path.is_file():
        raw = json.loads(config_path.read_text())
        if "num_attention_heads" in raw:  # Diffusers
            heads = raw["num_attention_heads"]
            return heads * raw["attention_head_dim"], raw["ffn_dim"], raw["num_layers"], heads
        if "dim" in raw:  # official
            return raw["dim"], raw["ffn_dim"], raw["num_layers"], raw["num_heads"]
    # No config: read shapes from the safetensors headers (no tensor data is loaded).
    weights = find_model_weights(folder)
    files = (
        sorted({folder / f for f in json.loads(weights.read_text())["weight_map"].values()})
        if weights.name.endswith(".json")
        else [weights]
    )
    shapes: dict[str, list[int]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = f.get_slice(key).get_shape()
    if layout == "diffusers":
        shapes = {diffusers_dit_key_to_official(k): v for k, v in shapes.items()}
    dim = shapes["patch_embedding.weight"][0]
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    return dim, shapes["blocks.0.ffn.0.weight"][0], layers, dim // 128  # Wan heads are 128 wide


def _identify(root: Path, layout: str) -> str:
    """Name of the model config whose DiT matches the checkpoint's."""
    if layout == "diffusers":
        experts = [root / d for d in DIFFUSERS_EXPERT_DIRS if (root / d).is_dir()]
    else:
        experts = [root / "high_noise_model", root / "low_noise_model"]
        experts = experts if experts[0].is_dir() else [root]
    shape = _dit_shape(experts[0], layout)
    for name in list_model_names():
        model = load_model_config(name)
        d = model.dit
        if (d.dim, d.ffn_dim, d.num_layers, d.num_heads) == shape and len(model.experts) == len(experts):
            return name
    raise CheckpointError(
        f"{root}: a DiT of dim {shape[0]}, ffn {shape[1]}, {shape[2]} layers, {shape[3]} heads "
        f"with {len(experts)} expert(s) matches no known model ({', '.join(list_model_names())})"
    )


def load_dit(
    folder: Path, layout: str, config: DiTConfig, dtype: torch.dtype, device: torch.device
) -> WanDiT:
    path = find_model_weights(folder)
    state = read_safetensors(path)
    if layout == "diffusers":
        state = rename_keys(state, diffusers_dit_key_to_official)
    with torch.device("meta"):
        dit = WanDiT(config)
    assign_weights(dit, state, path, dtype, device, keep_fp32=FP32_PARAMETERS)
    return dit.eval().requires_grad_(False)


def load_vae(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device):
    from smartdiff.pipeline.vae import WanVAE, diffusers_vae_key_to_official

    if checkpoint.layout == "diffusers":
        path = find_model_weights(checkpoint.root / "vae")
        rename = partial(diffusers_vae_key_to_official, config=checkpoint.model.vae)
        state = rename_keys(read_safetensors(path), rename)
    else:
        path = require_file(checkpoint.root / VAE_FILE, "VAE weights")
        state = read_weights(path)
    with torch.device("meta"):
        vae = WanVAE(checkpoint.model.vae)
    assign_weights(vae, state, path, dtype, device)
    return vae.eval().requires_grad_(False)


def load_text_encoder(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device):
    from smartdiff.pipeline.text_encoder import (
        TextEncoder,
        build_text_encoder,
        load_diffusers_t5_state,
        load_official_t5_state,
        load_tokenizer,
    )

    if checkpoint.layout == "diffusers":
        source = checkpoint.root / "text_encoder"
        state = load_diffusers_t5_state(source)
        tokenizer = load_tokenizer(checkpoint.root / "tokenizer")
    else:
        source = require_file(checkpoint.root / T5_FILE, "T5 encoder weights")
        state = load_official_t5_state(source)
        tokenizer = load_tokenizer(checkpoint.root / TOKENIZER_DIR)
    model = build_text_encoder(checkpoint.model.t5)
    assign_weights(model, state, source, dtype, device)
    return TextEncoder(model.eval().requires_grad_(False), tokenizer, checkpoint.model.dit.text_len)
