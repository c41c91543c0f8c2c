"""LoRAs merged into the DiT's weights at load time: a LoRA costs nothing per step.

For a weight ``W`` of the DiT, a LoRA file holds a low-rank pair (``down`` A [rank, in], ``up`` B
[out, rank], an optional ``alpha``) and/or full deltas (``diff`` for the weight, ``diff_b`` for the
bias, as step-distill LoRAs carry for norms and biases too). Merged in fp32::

    W' = W + strength * (alpha / rank) * B @ A + strength * diff        b' = b + strength * diff_b

(no ``alpha``: alpha = rank; ``diff_m`` is a full delta of a block's or the head's modulation).
Several LoRAs stack. Key formats users have:

- official module names (ComfyUI, LightX2V's distill LoRAs, musubi), with or without a
  ``diffusion_model.`` prefix: ``blocks.0.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` (or
  ``.lora_A.weight`` / ``.lora_B.weight``), ``.alpha``, ``.diff``, ``.diff_b``;
- kohya: ``lora_unet_`` + the module path with ``_`` for ``.``:
  ``lora_unet_blocks_0_self_attn_q.lora_down.weight``;
- Diffusers / PEFT: diffusers' module names under ``transformer.``:
  ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight``.

Nothing is skipped silently: a key that maps to no weight of the DiT, a pair whose product does not
fit the weight, or a file of no known format is an error that names the key and the shapes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smartdiff.pipeline.config import LoraConfig
from smartdiff.pipeline.dit import diffusers_dit_key_to_official
from smartdiff.pipeline.fp8 import dequantize_rows
from smartdiff.pipeline.loading import CheckpointError, read_safetensors

_PARTS = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "alpha": "alpha",
    "diff": "diff",
    "diff_b": "diff_b",
    "diff_m": "diff_m",
}
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>" + "|".join(re.escape(part) for part in _PARTS) + r")$")


@dataclass
class _Module:
    """What one LoRA file holds for one module of the DiT."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # part -> the key it came from


def _official_module(key: str, kohya: dict[str, str]) -> tuple[str, str]:
    """(official module name, part) of one LoRA key; CheckpointError if it is of no known format."""
    match = _KEY.match(key)
    if match is None:
        known = ", ".join(_PARTS)
        raise CheckpointError(f"LoRA key {key!r} is of no known format (a module name, then one of {known})")
    module, part = match["module"], match["part"]
    if module.startswith("lora_unet_"):  # kohya: the module path with "_" for "."
        if module.removeprefix("lora_unet_") not in kohya:
            raise CheckpointError(f"LoRA key {key!r} maps to no weight of the DiT")
        return kohya[module.removeprefix("lora_unet_")], part
    for prefix in ("diffusion_model.", "base_model.model."):
        module = module.removeprefix(prefix)
    if module.startswith("transformer."):  # Diffusers / PEFT: diffusers' module names
        try:
            module = diffusers_dit_key_to_official(module.removeprefix("transformer.") + ".weight")
        except CheckpointError:
            raise CheckpointError(f"LoRA key {key!r} maps to no weight of the DiT") from None
        module = module.removesuffix(".weight")
    return module, part


def read_lora(path: Path, weights: dict[str, torch.Size]) -> dict[str, _Module]:
    """A LoRA file's contents by the official name of the module they change, checked against the
    DiT's ``weights`` (name -> shape)."""
    state = read_safetensors(Path(path))
    if not state:
        raise CheckpointError(f"{path}: the LoRA file holds no tensors")
    kohya = {name.removesuffix(".weight").replace(".", "_"): name.removesuffix(".weight") for name in weights}
    modules: dict[str, _Module] = defaultdict(_Module)
    for key, tensor in state.items():
        try:
            module, part = _official_module(key, kohya)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        target = _target(module, _PARTS[part], weights)
        if target not in weights:
            raise CheckpointError(f"{path}: LoRA key {key!r} maps to no weight of the DiT ({target})")
        entry = modules[module]
        entry.parts[_PARTS[part]] = tensor
        entry.keys[_PARTS[part]] = key
    return dict(modules)


def lora_deltas(path: Path, strength: float, weights: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The fp32 change a LoRA makes to each weight it touches, ``strength`` included."""
    deltas: dict[str, torch.Tensor] = {}
    for module, entry in read_lora(path, weights).items():
        parts, keys = entry.parts, entry.keys
        weight = _target(module, "diff", weights)
        if ("down" in parts) != ("up" in parts):
            have = keys.get("down") or keys.get("up")
            raise CheckpointError(f"{path}: {have} has no partner (a low-rank pair needs both down and up)")
        if "down" in parts:
            down, up = parts["down"].float(), parts["up"].float()
            rank = down.shape[0]
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank:
                pair = f"{keys['down']} {list(down.shape)} and {keys['up']} {list(up.shape)}"
                raise CheckpointError(f"{path}: {pair} are no low-rank pair")
            alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
            target = weights[weight]
            if (up.shape[0], down.shape[1]) != (target[0], target[1:].numel()):
                raise CheckpointError(
                    f"{path}: {keys['up']} {list(up.shape)} @ {keys['down']} {list(down.shape)} does not fit "
                    f"{weight} {list(target)}"
                )
            _add(deltas, weight, (up @ down).reshape(target) * (strength * alpha / rank))
        for part in ("diff", "diff_b", "diff_m"):
            name = weight if part == "diff" else _target(module, part, weights)
            if part in parts:
                delta = parts[part].float()
                if delta.shape != weights[name]:
                    raise CheckpointError(
                        f"{path}: {keys[part]} {list(delta.shape)} does not fit {name} {list(weights[name])}"
                    )
                _add(deltas, name, delta * strength)
        if "alpha" in parts and "down" not in parts:
            raise CheckpointError(f"{path}: {keys['alpha']} belongs to no low-rank pair")
    return deltas


def _target(module: str, part: str, weights: dict[str, torch.Size]) -> str:
    """The parameter a part changes: the module's bias (diff_b), the modulation of a block or the head
    (diff_m, LightX2V's name), its weight, or the module itself when it is a bare parameter (a block's
    modulation, which a plain ``diff`` may change too)."""
    if part == "diff_b":
        return f"{module}.bias"
    if part == "diff_m":
        return f"{module}.modulation"
    return f"{module}.weight" if f"{module}.weight" in weights or module not in weights else module


def _add(deltas: dict[str, torch.Tensor], name: str, delta: torch.Tensor) -> None:
    deltas[name] = deltas[name] + delta if name in deltas else delta


def merge_loras(
    state: dict[str, torch.Tensor],
    loras: Sequence[LoraConfig],
    expert_index: int = 0,
    experts: int = 1,
    fp8_scales: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``state`` (a DiT's weights by official name) with the LoRAs for this expert merged in, in
    fp32 (the loader casts, or quantises, afterwards). An fp8 weight a LoRA changes is dequantised
    first (its scale leaves ``fp8_scales``): LoRAs merge before quantisation."""
    chosen = [lora for lora in loras if lora.applies_to(expert_index, experts)]
    if not chosen:
        return state
    scales = fp8_scales if fp8_scales is not None else {}
    weights = {name: tensor.shape for name, tensor in state.items()}
    for lora in chosen:
        for name, delta in lora_deltas(lora.file, lora.strength, weights).items():
            base = dequantize_rows(state[name], scales.pop(name)) if name in scales else state[name].float()
            state[name] = base + delta
    return state
