"""Reading weight files and assigning them to modules built on the meta device.

Every mismatch is an error that names the file, the key and both shapes, so a user holding the
wrong download learns which file is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file or folder that does not match the model it is loaded into."""


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path} does not exist")
    return path


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, or of a sharded set given its ``.index.json``."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        require_file(path, "shard index")
        weight_map = json.loads(path.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_tensors = read_safetensors(path.parent / shard, device)
            expected = {k for k, v in weight_map.items() if v == shard}
            if set(shard_tensors) != expected:
                missing = sorted(expected - set(shard_tensors))[:3]
                extra = sorted(set(shard_tensors) - expected)[:3]
                raise CheckpointError(
                    f"{path.parent / shard}: does not hold what {path.name} lists "
                    f"(missing {missing}, unlisted {extra})"
                )
            tensors.update(shard_tensors)
        return tensors
    require_file(path, "weights file")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict, read without executing pickled code (``weights_only``)."""
    require_file(path, "weights file")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.name.endswith((".safetensors", ".index.json")):
        return read_safetensors(path)
    return read_torch_file(path)


def find_model_weights(folder: Path) -> Path:
    """``diffusion_pytorch_model`` weights in a folder: the shard index if sharded, else the one file."""
    for name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"missing model weights: {folder} holds neither diffusion_pytorch_model.safetensors "
        "nor diffusion_pytorch_model.safetensors.index.json"
    )


def rename_keys(state: Mapping[str, torch.Tensor], rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    return {rename(key): value for key, value in state.items()}


def assign_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: Path | str,
    dtype: torch.dtype,
    device: str | torch.device,
    keep_fp32: re.Pattern[str] | None = None,
) -> nn.Module:
    """Assign ``state`` to a module built on the meta device: strict names and shapes.

    ``state`` is consumed (emptied) as tensors move, so a weight is never held twice. Floating
    tensors become ``dtype``, except names matching ``keep_fp32`` and e4m3 weights (``pipeline.fp8``:
    the module holds them as they are). Buffers that are not in the
    state dict (computed constants) must be re-created by the module afterwards.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {list(state[key].shape)} in the file, "
                f"the model expects {list(target.shape)}"
            )
    converted = {}
    for key in expected:
        tensor = state.pop(key)
        cast = dtype
        if tensor.dtype == torch.float8_e4m3fn:
            cast = tensor.dtype
        elif not tensor.is_floating_point() or (keep_fp32 is not None and keep_fp32.search(key)):
            cast = torch.float32 if tensor.is_floating_point() else tensor.dtype
        converted[key] = tensor.to(device=device, dtype=cast)
    module.load_state_dict(converted, strict=True, assign=True)
    return module


def _preview(keys: list[str]) -> str:
    more = " ..." if len(keys) > 5 else ""
    return f"{keys[:5]}{more} ({len(keys)} in all)"
