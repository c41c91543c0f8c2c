"""FlashAttention from the flash-attn package: FA3 (``flash_attn_interface``, Hopper) when present,
else FA2 (``flash_attn``). Its layout (batch, tokens, heads, head_dim) is the registry's.

FlashAttention takes bf16/fp16 only. An fp32 input is cast to bf16 and the output back to fp32 (the
pipeline runs in bf16 anyway); the implementation string says so, so a job's record shows it.
"""

from __future__ import annotations

import importlib

import torch

from smartdiff.kernels.registry import (
    AttentionBackend,
    AttentionFn,
    BackendUnavailable,
    in_half_precision,
    needs_cuda,
    package_version,
)

_INSTALL = (
    "pip install flash-attn --no-build-isolation (FlashAttention 2); for FlashAttention 3 on Hopper "
    "build hopper/ from github.com/Dao-AILab/flash-attention, which installs flash_attn_interface"
)


def _load() -> tuple[str, object]:
    """(label, flash_attn_func) of the newest FlashAttention importable here; raises ImportError."""
    errors = []
    for module, label, dist in (
        ("flash_attn_interface", "flash-attn-3", "flash_attn_3"),
        ("flash_attn", "flash-attn-2", "flash_attn"),
    ):
        try:
            fn = importlib.import_module(module).flash_attn_func
        except Exception as e:  # a broken install (missing .so, wrong CUDA) is unavailable too
            errors.append(f"{module}: {e}")
            continue
        return f"{label}-{package_version(dist)}", fn
    raise ImportError("; ".join(errors))


def _first_output(flash_attn_func: AttentionFn) -> AttentionFn:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, softmax_lse)

    return attend


def build(device: torch.device) -> AttentionBackend:
    problems = needs_cuda(device)
    try:
        label, fn = _load()
    except ImportError as e:  # _load folds every failure into one ImportError
        problems.append(f"the flash-attn package is not importable ({e}): {_INSTALL}")
    if problems:
        raise BackendUnavailable("attention backend 'flash_attn' unavailable: " + "; ".join(problems))
    return AttentionBackend(
        "flash_attn", f"{label} (fp32 inputs run in bf16)", "exact", in_half_precision(_first_output(fn))
    )
