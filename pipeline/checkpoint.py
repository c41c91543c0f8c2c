"""Checkpoint folders as users download them: the official Wan layout and the Diffusers layout.

Official:  config.json, diffusion_pytorch_model.safetensors (or shards + .index.json),
           models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, google/umt5-xxl/ (tokenizer);
           Wan2.2-A14B keeps one DiT in high_noise_model/ and one in low_noise_model/.
Diffusers: model_index.json, transformer/ (+ transformer_2/ for A14B), text_encoder/, vae/, tokenizer/.

Every module is built on the meta device and its weights assigned once, in the target dtype.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from smartdiff.pipeline.config import (
    GEMMS,
    DiTConfig,
    LoraConfig,
    ModelConfig,
    VAEConfig,
    list_model_names,
    load_model_config,
)
from smartdiff.pipeline.dit import FP32_PARAMETERS, WanDiT, diffusers_dit_key_to_official
from smartdiff.pipeline.fp8 import dequantize_rows, quantize_rows, split_fp8_state, use_fp8_linears
from smartdiff.pipeline.loading import (
    CheckpointError,
    assign_weights,
    find_model_weights,
    read_safetensors,
    read_weights,
    rename_keys,
    require_file,
)
from smartdiff.pipeline.lora import merge_loras
from smartdiff.pipeline.text_encoder import (
    PreTrainedTokenizerBase,
    TextEncoder,
    build_text_encoder,
    load_diffusers_t5_state,
    load_official_t5_state,
    load_tokenizer,
)
from smartdiff.pipeline.vae import WanVAE, diffusers_vae_key_to_official

log = logging.getLogger(__name__)

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
    """Inspect a checkpoint folder: its layout and the model it holds (checked against ``model_name``).

    The DiT is what the checkpoint's own ``config.json`` says, checked against the shapes in its
    weights (or read from those shapes when there is no ``config.json``). A known model whose DiT
    agrees with every stated setting supplies the sampling defaults and allowed sizes; a DiT of
    another shape loads with generic Wan2.1 defaults, and a warning says so.
    """
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
    if layout == "diffusers":
        experts = [root / d for d in DIFFUSERS_EXPERT_DIRS if (root / d).is_dir()]
    else:
        experts = [root / "high_noise_model", root / "low_noise_model"]
        experts = experts if experts[0].is_dir() else [root]
    described = [describe_dit(folder, layout) for folder in experts]
    if any(d != described[0] for d in described[1:]):
        raise CheckpointError(f"{root}: the experts' DiTs differ: {described}")
    known = _known_model(described[0], len(experts))
    if model_name is not None and (known is None or known.name != model_name):
        held = known.name if known else f"a DiT of no known model ({_shape(described[0])})"
        raise CheckpointError(f"{root} holds {held}, not {model_name}")
    return Checkpoint(root, layout, known or _generic_model(root, described[0], len(experts)))


# What a checkpoint's config.json may say beyond the DiT's settings: bookkeeping we skip, and
# settings whose only supported value is the text-to-video one.
_BOOKKEEPING = {"rope_max_seq_len"}  # diffusers' RoPE table length: ours is computed for any grid
_TEXT_TO_VIDEO = {
    "model_type": "t2v",
    "window_size": [-1, -1],
    "image_dim": None,
    "added_kv_proj_dim": None,
    "pos_embed_seq_len": None,
}
# Diffusers settings that say nothing of their own: the width is heads x head width, and diffusers
# normalises q and k whatever its qk_norm says (the weights show whether the norms are there).
_DIFFUSERS_IMPLIED = {"attention_head_dim", "qk_norm"}
# Diffusers' transformer/config.json names -> ours (the official config.json uses ours).
_DIFFUSERS_NAMES = {
    "in_channels": "in_dim",
    "out_channels": "out_dim",
    "num_attention_heads": "num_heads",
    "text_dim": "text_dim",
    "freq_dim": "freq_dim",
    "ffn_dim": "ffn_dim",
    "num_layers": "num_layers",
    "patch_size": "patch_size",
    "eps": "eps",
    "cross_attn_norm": "cross_attn_norm",
}
_DIT_SETTINGS = {f.name for f in fields(DiTConfig)}


def read_dit_config(path: Path) -> dict[str, Any]:
    """The DiT settings a ``config.json`` states (official or Diffusers), under DiTConfig's names.

    A setting this project cannot honour (another model type, image conditioning, an unknown key)
    is an error that names it.
    """
    raw = json.loads(path.read_text())
    diffusers = "num_attention_heads" in raw
    stated: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if key.startswith("_") or key in _BOOKKEEPING or (diffusers and key in _DIFFUSERS_IMPLIED):
            continue
        if key in _TEXT_TO_VIDEO:
            if value != _TEXT_TO_VIDEO[key]:
                raise CheckpointError(
                    f"{path}: {key} {value!r} is not supported: this project runs Wan text-to-video "
                    f"DiTs ({key} {_TEXT_TO_VIDEO[key]!r})"
                )
        elif diffusers and key in _DIFFUSERS_NAMES:
            stated[_DIFFUSERS_NAMES[key]] = value
        elif not diffusers and key in _DIT_SETTINGS:
            stated[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: unknown settings {sorted(unknown)}; this loader cannot honour them")
    if diffusers:
        stated["dim"] = raw["num_attention_heads"] * raw["attention_head_dim"]
    if "patch_size" in stated:
        stated["patch_size"] = tuple(stated["patch_size"])
    return stated


def dit_facts(folder: Path, layout: str) -> tuple[Path, dict[str, tuple[Any, str]]]:
    """The DiT settings its weights determine, each with its evidence (a tensor and its shape), read
    from the safetensors headers alone (no tensor data is loaded). Returns the weights file too."""
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

    def shape(key: str) -> list[int]:
        if key not in shapes:
            raise CheckpointError(f"{weights}: no tensor {key!r}: not a Wan DiT")
        return shapes[key]

    def evidence(key: str) -> str:
        return f"{key} {shape(key)}"

    def presence(key: str) -> tuple[bool, str]:
        return key in shapes, f"{key} {'present' if key in shapes else 'absent'}"

    patch = shape("patch_embedding.weight")
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    facts = {
        "dim": (patch[0], evidence("patch_embedding.weight")),
        "in_dim": (patch[1], evidence("patch_embedding.weight")),
        "patch_size": (tuple(patch[2:]), evidence("patch_embedding.weight")),
        "ffn_dim": (shape("blocks.0.ffn.0.weight")[0], evidence("blocks.0.ffn.0.weight")),
        "num_layers": (layers, f"blocks 0 to {layers - 1}"),
        "text_dim": (shape("text_embedding.0.weight")[1], evidence("text_embedding.0.weight")),
        "freq_dim": (shape("time_embedding.0.weight")[1], evidence("time_embedding.0.weight")),
        "out_dim": (shape("head.head.weight")[0] // math.prod(patch[2:]), evidence("head.head.weight")),
        "qk_norm": presence("blocks.0.self_attn.norm_q.weight"),
        "cross_attn_norm": presence("blocks.0.norm3.weight"),
    }
    return weights, facts


def describe_dit(folder: Path, layout: str) -> dict[str, Any]:
    """The DiT settings of one DiT folder: its config.json, checked against what its weights show,
    completed by the weights where the file is silent (or absent)."""
    weights, facts = dit_facts(folder, layout)
    config_path = folder / "config.json"
    stated = read_dit_config(config_path) if config_path.is_file() else {}
    for key, (value, shown) in facts.items():
        if key in stated and stated[key] != value:
            raise CheckpointError(
                f"{config_path} says {key} {stated[key]!r}, but the weights say {value!r} "
                f"({shown} in {weights.name})"
            )
    return {**{key: value for key, (value, _) in facts.items()}, **stated}


def _known_model(dit: dict[str, Any], experts: int) -> ModelConfig | None:
    """The known model (configs/models) whose DiT agrees with every setting of ``dit``."""
    for name in list_model_names():
        model = load_model_config(name)
        if len(model.experts) == experts and all(getattr(model.dit, k) == v for k, v in dit.items()):
            return model
    return None


def _shape(dit: dict[str, Any]) -> str:
    return f"dim {dit['dim']}, ffn {dit['ffn_dim']}, {dit['num_layers']} layers"


def _generic_model(root: Path, dit: dict[str, Any], experts: int) -> ModelConfig:
    """A DiT of a shape no known model has: Wan2.1's sampling defaults (50 steps, guidance 5, shift 5,
    832x480 or 480x832, 81 frames), the Wan VAE and UMT5-XXL encoder, no TeaCache fit."""
    shape = f"a DiT of {_shape(dit)}"
    if experts > 1:
        raise CheckpointError(
            f"{root}: {shape} in {experts} experts matches no known model ({', '.join(list_model_names())}); "
            "a mixture of experts needs its expert boundary and guidance per expert: add a model config"
        )
    if "num_heads" not in dit:
        if dit["dim"] % 128:
            raise CheckpointError(f"{root}: {shape} and no config.json: the number of heads is unknown")
        dit = {**dit, "num_heads": dit["dim"] // 128}  # the head width of every released Wan
    model = ModelConfig(
        name="custom",
        display_name=f"the Wan DiT in {root.name} (dim {dit['dim']}, {dit['num_layers']} layers)",
        dit=DiTConfig(**dit),
    )
    s = model.sampling
    log.warning(
        "%s: %s, %d heads matches no known model (%s); loading it with generic defaults: %d steps, "
        "guidance %s, shift %s, sizes %s, the Wan VAE and UMT5-XXL text encoder, no TeaCache fit",
        root,
        shape,
        model.dit.num_heads,
        ", ".join(list_model_names()),
        s.steps,
        s.guidance,
        s.shift,
        " ".join(s.sizes),
    )
    return model


class ModelWeights(Protocol):
    """Where a pipeline's weights come from, one module at a time (``WanPipeline.from_weights``)."""

    model: ModelConfig
    origin: str  # said in reports: a checkpoint folder, or random weights drawn in memory
    loras: Sequence[LoraConfig]  # merged into the DiT(s) as they are built

    def dit(self, index: int, dtype: torch.dtype, device: torch.device, gemm: str = "dtype") -> WanDiT: ...

    def text_encoder(self, dtype: torch.dtype, device: torch.device) -> TextEncoder: ...

    def vae(self, dtype: torch.dtype, device: torch.device) -> WanVAE: ...


class CheckpointWeights:
    """The weights of a checkpoint folder (official or Diffusers layout). ``dit_files`` (one per
    expert) replace its DiT weights: single files as ComfyUI and LightX2V share them, bf16 or fp8."""

    def __init__(
        self, checkpoint: Checkpoint, loras: Sequence[LoraConfig] = (), dit_files: Sequence[Path] = ()
    ):
        if dit_files and len(dit_files) != len(checkpoint.model.experts):
            experts = len(checkpoint.model.experts)
            raise CheckpointError(
                f"{checkpoint.model.name} has {experts} DiT(s), {len(dit_files)} DiT files given"
            )
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.loras = tuple(loras)
        self.dit_files = tuple(Path(f) for f in dit_files)
        self.origin = f"checkpoint {checkpoint.root} ({checkpoint.layout} layout)"
        if self.dit_files:
            self.origin += ", DiT from " + ", ".join(f.name for f in self.dit_files)

    def dit(self, index: int, dtype: torch.dtype, device: torch.device, gemm: str = "dtype") -> WanDiT:
        experts = (index, len(self.model.experts))
        if self.dit_files:
            path = self.dit_files[index]
            layout = None  # a single file says by its names
        else:
            path = find_model_weights(self.checkpoint.expert_dirs[index])
            layout = self.checkpoint.layout
        return load_dit(path, layout, self.model.dit, dtype, device, self.loras, experts, gemm)

    def text_encoder(self, dtype: torch.dtype, device: torch.device) -> TextEncoder:
        return load_text_encoder(self.checkpoint, dtype, device)

    def vae(self, dtype: torch.dtype, device: torch.device) -> WanVAE:
        return load_vae(self.checkpoint, dtype, device)


StateDict = dict[str, torch.Tensor]

# The modules, built on the meta device and given their weights once, in the target dtype: the same
# construction whether the weights come from files or are drawn in memory.


# Kept in fp32 whatever the DiT's dtype: the official fp32 parameters and the fp8 weights' scales.
KEEP_FP32 = re.compile(rf"{FP32_PARAMETERS.pattern}|\.weight_scale$")


def dit_from_state(
    config: DiTConfig,
    state: dict[str, torch.Tensor],
    source: Path | str,
    dtype: torch.dtype,
    device: torch.device,
    loras: Sequence[LoraConfig] = (),
    expert: tuple[int, int] = (0, 1),
    gemm: str = "dtype",
) -> WanDiT:
    """The DiT from its weights (official names; an fp8 checkpoint's scales and prefixes are read
    here). ``loras`` for expert ``expert[0]`` of ``expert[1]`` are merged first. ``gemm`` "fp8" runs
    the blocks' linear layers as e4m3 products (``pipeline.fp8``): an fp8 weight is kept as the file
    has it, any other is quantised per output channel; "dtype" runs them in ``dtype`` (an fp8 file's
    weights are dequantised)."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm {gemm!r} is not one of {', '.join(GEMMS)}")
    try:
        scales = split_fp8_state(state)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    merge_loras(state, loras, *expert, fp8_scales=scales)
    with torch.device("meta"):
        dit = WanDiT(config)
    if gemm == "fp8":
        for name in use_fp8_linears(dit):
            weight = f"{name}.weight"
            if weight not in state:
                continue  # assign_weights names what is missing
            if weight in scales:
                scale = scales.pop(weight)
            else:
                state[weight], scale = quantize_rows(state[weight].to(device))
            state[f"{name}.weight_scale"] = scale.reshape(-1)
    for weight, scale in scales.items():  # fp8 weights that do not run in fp8: the model dtype
        state[weight] = dequantize_rows(state[weight], scale)
    assign_weights(dit, state, source, dtype, device, keep_fp32=KEEP_FP32)
    return dit.eval().requires_grad_(False)


def vae_from_state(
    config: VAEConfig,
    state: dict[str, torch.Tensor],
    source: Path | str,
    dtype: torch.dtype,
    device: torch.device,
) -> WanVAE:
    with torch.device("meta"):
        vae = WanVAE(config)
    assign_weights(vae, state, source, dtype, device)
    if device.type == "cuda":
        vae.to_channels_last()
    return vae.eval().requires_grad_(False)


def text_encoder_from_state(
    model: ModelConfig,
    state: StateDict,
    source: Path | str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    device: torch.device,
) -> TextEncoder:
    """``state`` in Hugging Face UMT5 names."""
    encoder = build_text_encoder(model.t5)
    assign_weights(encoder, state, source, dtype, device)
    return TextEncoder(encoder.eval().requires_grad_(False), tokenizer, model.dit.text_len)


def load_dit(
    path: Path,
    layout: str | None,
    config: DiTConfig,
    dtype: torch.dtype,
    device: torch.device,
    loras: Sequence[LoraConfig] = (),
    expert: tuple[int, int] = (0, 1),
    gemm: str = "dtype",
) -> WanDiT:
    """The DiT of a weights file (or shard index, or a folder holding one) in ``layout`` "official"
    or "diffusers"; None: Diffusers' names if the file has them (single files)."""
    path = find_model_weights(path) if Path(path).is_dir() else Path(path)
    state = read_safetensors(path)
    if layout is None:
        layout = "diffusers" if any(key.startswith("condition_embedder.") for key in state) else "official"
    if layout == "diffusers":
        state = rename_keys(state, diffusers_dit_key_to_official)
    return dit_from_state(config, state, path, dtype, device, loras, expert, gemm)


def load_vae(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> WanVAE:
    if checkpoint.layout == "diffusers":
        path = find_model_weights(checkpoint.root / "vae")
        rename = partial(diffusers_vae_key_to_official, config=checkpoint.model.vae)
        state = rename_keys(read_safetensors(path), rename)
    else:
        path = require_file(checkpoint.root / VAE_FILE, "VAE weights")
        state = read_weights(path)
    return vae_from_state(checkpoint.model.vae, state, path, dtype, device)


def load_text_encoder(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> TextEncoder:
    if checkpoint.layout == "diffusers":
        source = checkpoint.root / "text_encoder"
        state = load_diffusers_t5_state(source)
        tokenizer = load_tokenizer(checkpoint.root / "tokenizer")
    else:
        source = require_file(checkpoint.root / T5_FILE, "T5 encoder weights")
        state = load_official_t5_state(source)
        tokenizer = load_tokenizer(checkpoint.root / TOKENIZER_DIR)
    return text_encoder_from_state(checkpoint.model, state, source, tokenizer, dtype, device)
