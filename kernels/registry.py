"""One registry of attention backends, one calling convention.

Every backend takes q, k, v shaped (batch, tokens, heads, head_dim) in bf16, fp16 or fp32 and
returns the same shape and dtype. A backend that is asked for and cannot run here raises
``BackendUnavailable`` when it is resolved (at worker start), never substitutes another kernel.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run on this machine."""


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    # What actually runs, e.g. "torch-sdpa-cudnn": recorded in each job's result.
    implementation: str
    # "exact", "8bit" or "sparse": the error class a profile may allow.
    error_class: str
    fn: AttentionFn
    # The backend of the cross-attention to the text, where it is not this one (block-sparse
    # selection would drop whole blocks of the prompt's tokens). None: this backend.
    cross: AttentionBackend | None = None

    def for_cross_attention(self) -> AttentionBackend:
        return self.cross or self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(q, k, v)


# name -> module that defines ``build(device, **options) -> AttentionBackend`` (imported only when asked
# for). ``auto`` tries the others, so it must stay out of its own candidate list (it skips itself).
_BACKEND_MODULES: dict[str, str] = {
    "sdpa": "smartdiff.kernels.sdpa",
    "flash_attn": "smartdiff.kernels.flash",
    "sage": "smartdiff.kernels.sage",
    "sparge": "smartdiff.kernels.sparge",
    "auto": "smartdiff.kernels.auto",
}


def package_version(dist: str) -> str:
    """Installed version of a distribution, for implementation strings."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def needs_cuda(device: torch.device) -> list[str]:
    """The problem to report when a CUDA-only backend is asked for elsewhere (none on CUDA)."""
    return [] if device.type == "cuda" else [f"needs a CUDA device (asked for {device.type})"]


def in_half_precision(fn: AttentionFn) -> AttentionFn:
    """Run a bf16/fp16-only kernel on any input: fp32 runs in bf16, the output keeps the input dtype."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = q.dtype
        if dtype == torch.float32:
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        return fn(q, k, v).to(dtype)

    return attend


def available_backends() -> list[str]:
    return sorted(_BACKEND_MODULES)


def get_backend(name: str, device: torch.device | str = "cpu", **options: object) -> AttentionBackend:
    """Resolve backend ``name`` for ``device``; raises if it is unknown or cannot run there.

    ``options`` go to the backend's ``build`` (e.g. ``topk`` for sparge, ``allow`` for auto); an
    option the backend does not take is a ValueError, not silently dropped.
    """
    if name not in _BACKEND_MODULES:
        raise BackendUnavailable(
            f"unknown attention backend {name!r} (known: {', '.join(available_backends())})"
        )
    module = importlib.import_module(_BACKEND_MODULES[name])
    dev = torch.device(device)
    if options:
        try:
            inspect.signature(module.build).bind(dev, **options)
        except TypeError as e:
            raise ValueError(f"backend {name!r} does not take options {sorted(options)}: {e}") from e
    return module.build(dev, **options)
