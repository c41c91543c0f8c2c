"""The DiT's token-wise work around the matrix products and attention, as small pure functions.

Each function keeps the official numerics (fp32 math, the same casts back to the model dtype at the
same places). Run eagerly, each is a chain of elementwise kernels that reads and writes every
intermediate in fp32; ``compiled()`` hands them to ``torch.compile`` (on CUDA), which fuses each into
one kernel that reads its bf16 inputs once, keeps the fp32 intermediates in registers and writes the
bf16 result once. The eager and compiled versions are the same functions, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from smartdiff.pipeline.fp8 import quantize_rows


def _modulated_norm32(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return normed * (1 + scale[:, None]) + shift[:, None]


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then ``* (1 + scale) + shift`` per batch row, in fp32; x's dtype out."""
    return _modulated_norm32(x, shift, scale, eps).to(x.dtype)


def _affine_norm32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)


def affine_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm with affine in fp32 (the cross-attention's input norm); x's dtype out."""
    return _affine_norm32(x, weight, bias, eps).to(x.dtype)


def _norm_fp8(
    x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, eps: float, norm32: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """On CUDA the Triton kernel (LayerNorm, ``* mul + add``, quantised rows); elsewhere
    ``quantize_rows`` of ``norm32()``, the same norm in PyTorch's fp32 ops."""
    if x.is_cuda:
        from smartdiff.kernels.triton_fp8 import norm_quantize_rows

        return norm_quantize_rows(x, mul, add, eps)
    return quantize_rows(norm32().flatten(0, -2))


def modulated_norm_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``modulated_norm`` of x [B, L, dim] quantised per token for fp8 linears: (e4m3 [B*L, dim], fp32
    scales [B*L, 1]), ``pipeline.fp8.quantize_rows`` of the fp32 norm (not rounded to x's dtype in
    between). On CUDA one Triton kernel (``kernels.triton_fp8.norm_quantize_rows``: x read once from
    memory, one byte per element written); elsewhere these PyTorch ops. Not compiled: the kernel is
    already one pass."""
    return _norm_fp8(x, 1 + scale, shift, eps, lambda: _modulated_norm32(x, shift, scale, eps))


def affine_norm_fp8(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``affine_norm`` quantised per token, as ``modulated_norm_fp8``."""
    return _norm_fp8(x, weight, bias, eps, lambda: _affine_norm32(x, weight, bias, eps))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` per batch row, in fp32; x's dtype out."""
    return (x.float() + y.float() * gate[:, None]).to(x.dtype)


def residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y`` (the cross-attention's residual, no gate), in one pass whatever the layouts."""
    return x + y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis in fp32, cast back, then the weight (the official order of casts)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, L, H, D] by angles [L, 1, D/2]; fp32 math."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """q or k of the self-attention: RMSNorm over the full width, split into heads, RoPE."""
    return rope(rms_norm(x, weight, eps).unflatten(2, (heads, -1)), cos, sin)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation, as Wan) of ``x @ weight.T + bias``.

    In CUDA inference one cuBLASLt matrix product adds the bias and applies the GELU in its epilogue,
    on the fp32 accumulator: the FFN's 4.7x-wide hidden is written once, in bf16, instead of being
    written, read and written again by a separate GELU pass. That entry (torch's own, the one its
    compiler emits for linear + GELU) has no backward: training, and other devices, take two steps.
    """
    if not x.is_cuda or torch.is_grad_enabled():
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    flat = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return flat.view(*x.shape[:-1], weight.shape[0])


@dataclass(frozen=True)
class TokenOps:
    """The set of token-wise functions a DiT runs with: eager, or compiled."""

    modulated_norm: Callable[..., torch.Tensor] = modulated_norm
    affine_norm: Callable[..., torch.Tensor] = affine_norm
    gated_residual: Callable[..., torch.Tensor] = gated_residual
    residual: Callable[..., torch.Tensor] = residual
    rms_norm: Callable[..., torch.Tensor] = rms_norm
    rope: Callable[..., torch.Tensor] = rope
    rms_norm_rope: Callable[..., torch.Tensor] = rms_norm_rope
    compiled: bool = False


EAGER = TokenOps()


def compiled(backend: str | Callable[..., Any] = "inductor") -> TokenOps:
    """The same functions through ``torch.compile`` (one fused kernel each).

    ``fullgraph``: a graph break would silently split a fusion, so it is an error instead. Shapes
    are static for the first video size and become dynamic when a second one arrives (torch's
    automatic dynamic shapes): a worker serving many sizes and frame counts compiles each function
    twice, not once per size up to torch's recompile limit and eager after it.
    """

    def fuse(fn: Callable) -> Callable:
        return torch.compile(fn, fullgraph=True, backend=backend)

    return TokenOps(
        modulated_norm=fuse(modulated_norm),
        affine_norm=fuse(affine_norm),
        gated_residual=fuse(gated_residual),
        residual=fuse(residual),
        rms_norm=fuse(rms_norm),
        rope=fuse(rope),
        rms_norm_rope=fuse(rms_norm_rope),
        compiled=True,
    )
