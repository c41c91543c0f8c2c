"""The Wan diffusion transformer (DiT), with the official checkpoint's module names.

Numerics follow the official model: modulation (shift, scale, gate) math in fp32, q and k
RMS-normalised over the full width before the head split, 3D RoPE with interleaved pairs, the
timestep sinusoid cosine half first, text padded with zeros to ``text_len`` before its MLP.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from smartdiff.kernels import AttentionBackend, get_backend
from smartdiff.pipeline.config import DiTConfig
from smartdiff.pipeline.cuda_graphs import GraphedForward
from smartdiff.pipeline.fp8 import FP8Linear, QuantizedRows, linear_outputs
from smartdiff.pipeline.fused import EAGER, TokenOps, affine_norm_fp8, linear_gelu, modulated_norm_fp8
from smartdiff.pipeline.fused import compiled as compiled_token_ops
from smartdiff.pipeline.loading import CheckpointError

# Parameters kept in fp32 whatever the model dtype: all of them feed the modulation math.
FP32_PARAMETERS = re.compile(r"(^|\.)modulation$|^time_embedding\.|^time_projection\.")


def timestep_embedding(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first, computed in float64 as the official code does."""
    half = freq_dim // 2
    exponent = torch.arange(half, dtype=torch.float64, device=t.device) / half
    angles = t.to(torch.float64)[:, None] * torch.pow(10000.0, -exponent)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head given to frames, height, width (128 -> 44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(head_dim: int, grid: tuple[int, int, int], device: torch.device, theta: float = 10000.0):
    """cos and sin of the 3D rotary angles for a (frames, height, width) patch grid: [L, 1, head_dim/2]."""
    angles = []
    for axis, (channels, size) in enumerate(zip(rope_split(head_dim), grid)):
        inv_freq = 1.0 / theta ** (
            torch.arange(0, channels, 2, dtype=torch.float64, device=device) / channels
        )
        pos = torch.arange(size, dtype=torch.float64, device=device)
        a = torch.outer(pos, inv_freq)  # [size, channels/2]
        shape = [1, 1, 1, a.shape[1]]
        shape[axis] = size
        angles.append(a.view(shape).expand(*grid, a.shape[1]))
    angle = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)
    return torch.cos(angle).float(), torch.sin(angle).float()


def by_token_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``fn`` applied to ``chunks`` token ranges of x [B, L, ...] in turn (for token-local work)."""
    if chunks == 1:
        return fn(x)
    return torch.cat([fn(part) for part in x.chunk(chunks, dim=1)], dim=1)


class FeedForward(nn.Sequential):
    """Linear, GELU (tanh), Linear. A Sequential, so the weights keep the official names (``ffn.0``,
    ``ffn.2``); the first product and the GELU run as one (``fused.linear_gelu``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        gelu = nn.GELU(approximate="tanh")  # applied by linear_gelu; here for the layout and the names
        super().__init__(nn.Linear(in_dim, hidden_dim), gelu, nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        up, _, down = self
        if isinstance(up, nn.Linear):
            return down(linear_gelu(x, up.weight, up.bias))
        return down(up(x), gelu=True)  # fp8 (pipeline.fp8): the GELU runs in down's quantisation


class RMSNorm(nn.Module):
    """Holds the weight; the math is ``fused.rms_norm``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class LayerNorm(nn.LayerNorm):
    """Holds eps (and weight and bias when affine); the math is in ``fused``: fp32 whatever the dtype."""


class Attention(nn.Module):
    """Self- or cross-attention; with ``qk_norm`` (every released Wan), q and k pass an RMSNorm over
    the full width before the head split."""

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(dim, eps) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor | QuantizedRows,
        context: torch.Tensor | QuantizedRows,
        attention: AttentionBackend,
        ops: TokenOps = EAGER,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        chunks: int = 1,
    ) -> torch.Tensor:
        if x is context:  # self-attention: q, k and v read the same tokens
            q, k, v = linear_outputs((self.q, self.k, self.v), x)
        else:
            q, (k, v) = self.q(x), linear_outputs((self.k, self.v), context)
        q = self._heads(ops, q, self.norm_q, rope, chunks)
        k = self._heads(ops, k, self.norm_k, rope, chunks)
        return self.o(attention(q, k, v.unflatten(2, (self.num_heads, -1))).flatten(2))

    def _heads(
        self,
        ops: TokenOps,
        x: torch.Tensor,
        norm: RMSNorm | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        chunks: int,
    ) -> torch.Tensor:
        """q or k [B, L, dim] -> [B, L, heads, head_dim]: RMSNorm (if any), head split, RoPE (if given).
        With RoPE, ``chunks`` > 1 runs token ranges in turn (small fp32 temporaries)."""
        if rope is None:
            x = x if norm is None else ops.rms_norm(x, norm.weight, norm.eps)
            return x.unflatten(2, (self.num_heads, -1))
        parts = zip(x.chunk(chunks, 1), rope[0].chunk(chunks, 0), rope[1].chunk(chunks, 0))
        rotated = [
            ops.rope(p.unflatten(2, (self.num_heads, -1)), cos, sin)
            if norm is None
            else ops.rms_norm_rope(p, norm.weight, norm.eps, self.num_heads, cos, sin)
            for p, cos, sin in parts
        ]
        return rotated[0] if chunks == 1 else torch.cat(rotated, dim=1)


class AttentionReuse(Protocol):
    """Per block and CFG branch: returns a stored attention output or computes (and stores) one."""

    def self_attention(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    def cross_attention(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor: ...


@dataclass
class DiTInputs:
    """Everything the block stack and the head need for one forward, computed once."""

    x: torch.Tensor  # [B, L, dim] patch tokens
    grid: tuple[int, int, int]
    time_embedding: torch.Tensor  # [B, dim] fp32: the head's modulation input
    time: torch.Tensor  # [B, 6, dim] fp32: the blocks' modulation input
    context: torch.Tensor  # [B, text_len, dim]
    rope: tuple[torch.Tensor, torch.Tensor]


class WanBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = Attention(dim, config.num_heads, eps, config.qk_norm)
        # The cross-attention's input norm (every released Wan has it: ``cross_attn_norm``).
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else None
        self.cross_attn = Attention(dim, config.num_heads, eps, config.qk_norm)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, config.ffn_dim, dim)
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        # >1 (memory level 4): token-local work (modulation, RoPE, the whole FFN half) runs on this
        # many token chunks, so its fp32 temporaries and the 4.7x-wide FFN hidden are never whole.
        self.token_chunks = 1

    def forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionBackend,
        reuse: AttentionReuse | None = None,
        cross_attention: AttentionBackend | None = None,
        ops: TokenOps = EAGER,
    ) -> torch.Tensor:
        """x [B, L, dim]; time [B, 6, dim] fp32 (the projected timestep); context [B, text_len, dim].

        ``reuse`` (PAB) may serve the self- and cross-attention outputs from an earlier step.
        ``cross_attention`` (default: the one ``attention`` names) attends to the text: sequence
        parallelism wraps only the self-attention. ``ops`` runs the token-wise work (eager, or
        compiled: pipeline.fused).
        """
        cross_attention = cross_attention or attention.for_cross_attention()
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + time).unbind(1)
        chunks, eps = self.token_chunks, self.norm1.eps
        # fp8 linears read their normalised inputs as e4m3 rows made by the norm itself (not with
        # token chunks, memory level 4: there each linear quantises its chunk's bf16 input).
        quantized = chunks == 1 and isinstance(self.ffn[0], FP8Linear)

        def normalised(norm: Callable, norm_fp8: Callable, part: torch.Tensor, *args: torch.Tensor):
            with torch.profiler.record_function("dit.input_norm"):  # named in profiles
                if quantized:
                    return QuantizedRows.of(norm_fp8(part, *args, eps), part)
                return norm(part, *args, eps)

        def modulated(part: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
            return normalised(ops.modulated_norm, modulated_norm_fp8, part, shift, scale)

        h = by_token_chunks(lambda p: modulated(p, shift_sa, scale_sa), x, chunks)
        if reuse is None:
            y = self.self_attn(h, h, attention, ops, rope, chunks)
        else:
            y = reuse.self_attention(lambda: self.self_attn(h, h, attention, ops, rope, chunks))
        x = ops.gated_residual(x, y, gate_sa)

        if self.norm3 is None:
            h = x
        else:
            h = normalised(ops.affine_norm, affine_norm_fp8, x, self.norm3.weight, self.norm3.bias)
        if reuse is None:
            y = self.cross_attn(h, context, cross_attention, ops)
        else:
            y = reuse.cross_attention(lambda: self.cross_attn(h, context, cross_attention, ops))
        x = ops.residual(x, y)

        def feed_forward(part: torch.Tensor) -> torch.Tensor:
            return ops.gated_residual(part, self.ffn(modulated(part, shift_ff, scale_ff)), gate_ff)

        return by_token_chunks(feed_forward, x, chunks)


class Head(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        out = math.prod(config.patch_size) * config.out_dim
        self.norm = LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, out)
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim))

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor, ops: TokenOps = EAGER) -> torch.Tensor:
        shift, scale = (self.modulation.float() + time_embedding[:, None]).unbind(1)
        return self.head(ops.modulated_norm(x, shift, scale, self.norm.eps))


class WanDiT(nn.Module):
    """Wan text-to-video DiT. ``forward(latents, timesteps, context)`` predicts the flow velocity."""

    def __init__(self, config: DiTConfig, attention: AttentionBackend | None = None):
        super().__init__()
        self.config = config
        dim = config.dim
        self.set_attention(attention or get_backend("sdpa"))
        self.ops = EAGER
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = FeedForward(config.text_dim, dim, dim)
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphed: GraphedForward | None = None

    def set_attention(self, attention: AttentionBackend, cross: AttentionBackend | None = None) -> None:
        """``cross`` (default ``attention``) is the backend of the cross-attention to the text, or
        rather the one it names for that (``AttentionBackend.for_cross_attention``)."""
        self.attention = attention
        self.cross_attention = (cross or attention).for_cross_attention()

    def compile_token_ops(self) -> None:
        """Run the token-wise work through ``torch.compile`` (fused kernels; for CUDA)."""
        self.ops = compiled_token_ops()

    def use_cuda_graphs(self, pool: tuple | None = None) -> None:
        """Replay ``forward`` from a CUDA graph per input shape (``pipeline.cuda_graphs``); ``pool``
        is shared with the other experts of a pipeline."""
        self.graphed = GraphedForward(self.eager_forward, pool)

    def set_token_chunks(self, chunks: int) -> None:
        for block in self.blocks:
            block.token_chunks = chunks

    def non_block_modules(self) -> list[nn.Module]:
        """Embeddings and head: what stays on the GPU when the blocks are streamed."""
        return [module for name, module in self.named_children() if name != "blocks"]

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, str(device))
        # Every grid's tables are kept (a model supports a few sizes): a CUDA graph captured at one
        # size reads them at every replay, after other sizes have run.
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.config.head_dim, grid, device)
        return self._rope_cache[key]

    def pad_context(self, context: list[torch.Tensor]) -> torch.Tensor:
        """Per-prompt T5 states [len_i, text_dim] -> [B, text_len, text_dim], zero padded."""
        text_len = self.config.text_len
        return torch.stack(
            [F.pad(c[:text_len], (0, 0, 0, text_len - min(len(c), text_len))) for c in context]
        )

    def embed_time(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B] -> (time embedding [B, dim], projected modulation [B, 6, dim]), fp32.

        Both MLPs hold fp32 weights (``FP32_PARAMETERS``), so this runs in fp32 at any model dtype.
        """
        embedding = self.time_embedding(timestep_embedding(self.config.freq_dim, timesteps))
        return embedding, self.time_projection(embedding).unflatten(1, (6, self.config.dim))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F, H, W], timesteps [B], context [B, text_len, text_dim] -> velocity."""
        if self.graphed is not None:
            return self.graphed(latents, timesteps, context)
        return self.eager_forward(latents, timesteps, context)

    def eager_forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        inputs = self.prepare(latents, timesteps, context)
        return self.finish(self.run_blocks(inputs), inputs)

    def prepare(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> DiTInputs:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(latents.to(dtype))
        grid = tuple(x.shape[2:])
        time_embedding, time = self.embed_time(timesteps)
        return DiTInputs(
            # Contiguous tokens: the transposed view would carry its layout (channels apart by the
            # token count) through every residual sum, and each fp8 input norm would copy it first
            # (33 ms of a 1.3B forward on an H100).
            x=x.flatten(2).transpose(1, 2).contiguous(),
            grid=grid,
            time_embedding=time_embedding,
            time=time,
            context=self.text_embedding(context.to(dtype)),
            rope=self.rope(grid, x.device),
        )

    def run_blocks(self, inputs: DiTInputs, reuse: list[AttentionReuse] | None = None) -> torch.Tensor:
        """The block stack on the patch tokens; ``reuse`` gives one AttentionReuse per block (PAB)."""
        x = inputs.x
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                inputs.time,
                inputs.context,
                inputs.rope,
                self.attention,
                None if reuse is None else reuse[i],
                self.cross_attention,
                self.ops,
            )
        return x

    def finish(self, x: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        """Head and unpatchify: tokens after the blocks -> velocity [B, C, F, H, W] in fp32."""
        return self.unpatchify(self.head(x, inputs.time_embedding, self.ops), inputs.grid).float()

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, p_t*p_h*p_w*C] -> [B, C, F, H, W]."""
        p = self.config.patch_size
        x = x.reshape(x.shape[0], *grid, *p, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], self.config.out_dim, *(g * s for g, s in zip(grid, p)))


_DIFFUSERS_DIT_RENAMES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^patch_embedding\.", "patch_embedding."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def diffusers_dit_key_to_official(key: str) -> str:
    """A key of diffusers' WanTransformer3DModel -> the official (our) name."""
    for pattern, replacement in _DIFFUSERS_DIT_RENAMES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    raise CheckpointError(f"unknown key {key!r} in a Diffusers-layout transformer")
