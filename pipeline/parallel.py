"""Several processes (one per GPU) for one job: CFG parallel and sequence parallel (Ulysses x ring).

Layout
------
A job runs on ``cfg * ring * ulysses`` processes of one ``torch.distributed`` world. Rank r sits at::

    cfg_rank = r // (ring * ulysses)    ring_rank = (r // ulysses) % ring    ulysses_rank = r % ulysses

so a Ulysses group is neighbouring ranks (its all-to-alls, one before and one after every
self-attention, are the heaviest traffic: keep them inside one NVLink domain), a ring group strides
by ``ulysses``, and the two CFG halves are the two halves of the world (they exchange one velocity
per step). Groups, built once by every rank in the same order (``build_layout``):

- Ulysses group: same cfg and ring rank.        - ring group: same cfg and Ulysses rank.
- sequence group: same cfg rank (``ulysses * ring`` ranks holding the tokens of one CFG branch).
- CFG pair: same ring and Ulysses rank.

For cfg 2 x ulysses 2 x ring 2: Ulysses [0,1] [2,3] [4,5] [6,7]; ring [0,2] [1,3] [4,6] [5,7];
sequence [0-3] [4-7]; CFG [0,4] [1,5] [2,6] [3,7]. A degree of 1 builds no group and sends nothing.

CFG parallel
------------
The CFG rank 0 evaluates the conditional branch of a step and rank 1 the unconditional one; an
all_gather in the pair gives every rank both velocities, the same bytes everywhere (as the sequence
group's gather does for one branch), and the guidance and solver step are elementwise, so the latents
stay identical on all ranks without being broadcast. With guidance 1 (no unconditional pass) both
ranks evaluate the conditional branch.

Sequence parallel
-----------------
``WanDiT.prepare`` (patch, text and time embeddings) runs whole on every rank; it is cheap next to
the blocks. The L patch tokens are zero-padded to a multiple of S = ulysses * ring, and sequence
rank ``s = ring_rank * ulysses + ulysses_rank`` keeps tokens ``[s * L_pad / S, (s + 1) * L_pad / S)``
and the same rows of the RoPE tables. Everything in a block except self-attention is token-local
and runs on the shard unchanged. Cross-attention's keys are the text context (replicated), so it runs
the profile's backend on the local queries, with no communication. Self-attention:

1. Ulysses all-to-all: q, k, v [B, L_pad/S, H, D] -> [B, L_pad/ring, H/ulysses, D], i.e. every token
   of this ring rank's contiguous chunk, for this rank's share of the heads.
2. Without ring: the profile's backend on the real tokens only (sliced to L), the output re-padded.
   With ring: the K/V chunk travels around the ring group (``batch_isend_irecv`` to the next rank and
   from the previous one; the next transfer overlaps the current chunk's compute). Each step attends
   the local queries to one chunk, keeping the log-sum-exp, and merges it into the running result.
3. The inverse all-to-all.

After the blocks an all_gather in the sequence group rebuilds [B, L_pad, dim], the padding is
dropped, and the head runs whole on every rank (``WanDiT.finish``).

Padding
-------
A padding token must never be a key: it would take softmax weight from every real query. Without
ring the padding is sliced off before the backend. In the ring, the chunk of ring rank j holds
``clamp(L - j * L_pad / ring, 0, L_pad / ring)`` real keys, and only those enter its partial; a
chunk with none is skipped (so no -inf log-sum-exp reaches the merge). Padding queries compute
values nobody reads: every other operation is token-local, and the gather drops them.

Numerics
--------
A partial attention over key block i, in fp32: ``lse_i = logsumexp(q k_i^T / sqrt(d))`` and
``out_i = softmax(q k_i^T / sqrt(d)) v_i``. Two partials merge as ``lse = logaddexp(lse_a, lse_b)``,
``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``: both exponents are <= 0, so nothing
overflows, and the result is exact softmax attention over the union of the blocks. The ring's
partials use ``attention_with_lse``, plain torch on CPU and CUDA alike (queries in chunks, so one
score tile is [B, H/ulysses, 1024, L_pad/ring] fp32); the profile's backend (sdpa, flash, sage, ...) runs
the cross-attention and the Ulysses-only self-attention. In the tests (CPU, fp32) CFG and Ulysses
reproduce the one-process numbers bit for bit, and the ring differs by its other summation order:
about 1e-6 on a DiT forward, 6e-6 on six denoised steps (tests/test_parallel.py).

VAE decode
----------
The group does not share the decode: every rank ends the loop with the same latents, and rank 0
decodes them (and uploads) while the others wait for the next job. On one GPU the decode is 2.5% of
a 1.3B job (docs/PERFORMANCE.md), so it only matters at high degrees (about 15% of the job at 8x);
then the tiled decode's tiles could be spread over the ranks and gathered on rank 0.

A pipeline built with ``velocity_model=ParallelGuidance(layout)`` runs ``WanPipeline.denoise``'s own
loop, the branch evaluations and the guidance of each step done over the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from smartdiff.kernels import AttentionBackend
from smartdiff.pipeline.config import ModelConfig, ParallelConfig
from smartdiff.pipeline.dit import AttentionReuse, DiTInputs, WanDiT
from smartdiff.pipeline.flexcache import COND, UNCOND, FlexCache
from smartdiff.pipeline.wan import DenoiseStep

__all__ = [
    "ParallelConfig",
    "ParallelGuidance",
    "ParallelLayout",
    "ShardedDiT",
    "attention_with_lse",
    "build_layout",
    "group_ranks",
    "merge_partials",
    "sequence_parallel_backend",
]

# Queries per score tile of ``attention_with_lse``: bounds its fp32 scores to [B, H, 1024, keys].
QUERY_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# Layout and process groups


def group_ranks(config: ParallelConfig) -> dict[str, list[list[int]]]:
    """Every group of each kind ("ulysses", "ring", "sequence", "cfg"), as ascending global ranks."""
    cfg, ring, ulysses = range(config.cfg), range(config.ring), range(config.ulysses)

    def rank(c: int, g: int, u: int) -> int:
        return (c * config.ring + g) * config.ulysses + u

    return {
        "ulysses": [[rank(c, g, u) for u in ulysses] for c in cfg for g in ring],
        "ring": [[rank(c, g, u) for g in ring] for c in cfg for u in ulysses],
        "sequence": [[rank(c, g, u) for g in ring for u in ulysses] for c in cfg],
        "cfg": [[rank(c, g, u) for c in cfg] for g in ring for u in ulysses],
    }


@dataclass(frozen=True, eq=False)
class ParallelLayout:
    """This rank's groups. A group's ranks are listed in group-rank order; a group of one is None."""

    config: ParallelConfig
    rank: int
    ulysses_ranks: list[int]
    ring_ranks: list[int]
    sequence_ranks: list[int]
    cfg_ranks: list[int]
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    sequence_group: dist.ProcessGroup | None
    cfg_group: dist.ProcessGroup | None

    @property
    def ulysses_rank(self) -> int:
        return self.ulysses_ranks.index(self.rank)

    @property
    def ring_rank(self) -> int:
        return self.ring_ranks.index(self.rank)

    @property
    def sequence_rank(self) -> int:
        """Which token shard this rank holds: ``ring_rank * ulysses + ulysses_rank``."""
        return self.sequence_ranks.index(self.rank)

    @property
    def cfg_rank(self) -> int:
        """0: this rank evaluates the conditional branch, 1: the unconditional one."""
        return self.cfg_ranks.index(self.rank)


def build_layout(
    config: ParallelConfig, model: ModelConfig, timeout: timedelta | None = None
) -> ParallelLayout:
    """Validate ``config`` against the model and the world, and create the subgroups (collective:
    every rank of the world calls it, once, with the same config). Without an initialised process
    group only the one-process layout is allowed. ``timeout`` bounds every collective of the
    subgroups (torch's default otherwise: 30 minutes on gloo)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    config.validate(model, world)
    mine: dict[str, tuple[list[int], dist.ProcessGroup | None]] = {}
    for kind, groups in group_ranks(config).items():
        for ranks in groups:
            # new_group is collective over the whole world: every rank creates every group.
            group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
            if rank in ranks:
                mine[kind] = (ranks, group)
    return ParallelLayout(
        config=config,
        rank=rank,
        ulysses_ranks=mine["ulysses"][0],
        ring_ranks=mine["ring"][0],
        sequence_ranks=mine["sequence"][0],
        cfg_ranks=mine["cfg"][0],
        ulysses_group=mine["ulysses"][1],
        ring_group=mine["ring"][1],
        sequence_group=mine["sequence"][1],
        cfg_group=mine["cfg"][1],
    )


# ---------------------------------------------------------------------------------------------
# Attention with log-sum-exp and the merge of partials


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_chunk: int = QUERY_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores, all in fp32.

    q [B, Lq, H, D], k and v [B, Lk, H, D] (the registry's layout) -> out [B, Lq, H, D] and
    lse [B, Lq, H]. Queries go ``query_chunk`` at a time so the score tile stays bounded.
    """
    scale = q.shape[-1] ** -0.5
    keys = k.transpose(1, 2).float()  # [B, H, Lk, D]
    values = v.transpose(1, 2).float()
    outs, lses = [], []
    for part in q.split(query_chunk, dim=1):
        scores = part.transpose(1, 2).float() @ keys.transpose(-1, -2) * scale  # [B, H, lq, Lk]
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse[..., None]) @ values)
        lses.append(lse)
    return torch.cat(outs, dim=2).transpose(1, 2), torch.cat(lses, dim=2).transpose(1, 2)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over key blocks a and b from the two partials (out [B, L, H, D], lse [B, L, H]).

    Both weights exp(lse_x - lse) are at most 1, so this never overflows; both lse must be finite.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
    return out, lse


# ---------------------------------------------------------------------------------------------
# Sequence-parallel self-attention


def padded_length(tokens: int, degree: int) -> int:
    """The smallest multiple of ``degree`` that holds ``tokens``."""
    return -(-tokens // degree) * degree


def pad_tokens(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """x zero-padded at the end of ``dim`` to ``length``."""
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, length - x.shape[dim]]
    return F.pad(x, pad)


def shard_tokens(x: torch.Tensor, layout: ParallelLayout, dim: int) -> torch.Tensor:
    """This rank's slice of x along ``dim``, after padding it to a multiple of the sequence degree."""
    degree = layout.config.sequence
    size = padded_length(x.shape[dim], degree) // degree
    # A copy, not a view: the whole padded sequence is freed instead of living as long as the shard.
    return pad_tokens(x, size * degree, dim).narrow(dim, layout.sequence_rank * size, size).clone()


def gather_tokens(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The sequence group's shards [B, L_pad/S, ...] put back in order: [B, L_pad, ...]."""
    parts = [torch.empty_like(x) for _ in layout.sequence_ranks]
    dist.all_gather(parts, x.contiguous(), group=layout.sequence_group)
    return torch.cat(parts, dim=1)


def heads_to_tokens(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Ulysses all-to-all: [B, n, H, D] (own tokens, all heads) -> [B, ulysses * n, H / ulysses, D]
    (the Ulysses group's tokens in order, own heads)."""
    ulysses = layout.config.ulysses
    b, n, h, d = x.shape
    # Slice j of dim 0 goes to Ulysses rank j: our tokens, its heads.
    send = x.reshape(b, n, ulysses, h // ulysses, d).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=layout.ulysses_group)
    # Slice j came from Ulysses rank j: its tokens, our heads.
    return received.permute(1, 0, 2, 3, 4).reshape(b, ulysses * n, h // ulysses, d)


def tokens_to_heads(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The inverse of ``heads_to_tokens``: [B, ulysses * n, H / ulysses, D] -> [B, n, H, D]."""
    ulysses = layout.config.ulysses
    b, m, h, d = x.shape
    n = m // ulysses
    # Slice j of dim 0 goes back to Ulysses rank j: its tokens, our heads.
    send = x.reshape(b, ulysses, n, h, d).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=layout.ulysses_group)
    # Slice j came from Ulysses rank j: our tokens, its heads; heads in rank order restore H.
    return received.permute(1, 2, 0, 3, 4).reshape(b, n, ulysses * h, d)


def pass_along_ring(send: torch.Tensor, receive: torch.Tensor, layout: ParallelLayout) -> list[dist.Work]:
    """Start sending ``send`` to the next ring rank and receiving the previous one's into ``receive``."""
    ranks, here = layout.ring_ranks, layout.ring_rank
    ops = [
        dist.P2POp(dist.isend, send, ranks[(here + 1) % len(ranks)], layout.ring_group),
        dist.P2POp(dist.irecv, receive, ranks[(here - 1) % len(ranks)], layout.ring_group),
    ]
    return dist.batch_isend_irecv(ops)


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ParallelLayout, tokens: int
) -> torch.Tensor:
    """Attention of this ring rank's queries to every ring rank's keys; ``tokens`` are real.

    q, k, v [B, C, h, D] hold the C tokens of chunk ``ring_rank``; at step s this rank holds the K/V
    chunk of ring rank ``ring_rank - s``, and attends only to its real (non-padding) keys.
    """
    ring, chunk = layout.config.ring, k.shape[1]
    kv = torch.stack([k, v]).contiguous()  # one message per step instead of two
    out = lse = None
    for step in range(ring):
        source = (layout.ring_rank - step) % ring
        incoming = torch.empty_like(kv) if step < ring - 1 else None
        transfers = pass_along_ring(kv, incoming, layout) if incoming is not None else []
        real_keys = min(max(tokens - source * chunk, 0), chunk)
        if real_keys > 0:  # a chunk of padding only adds nothing (and would have lse -inf)
            part = attention_with_lse(q, kv[0, :, :real_keys], kv[1, :, :real_keys])
            out, lse = part if out is None else merge_partials(out, lse, *part)
        for transfer in transfers:
            transfer.wait()
        if incoming is not None:
            kv = incoming
    # Some chunk holds real keys (tokens >= 1), so out is set.
    return out.to(q.dtype)


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ParallelLayout,
    inner: AttentionBackend,
    tokens: int,
) -> torch.Tensor:
    """Self-attention of this rank's token shard [B, L_pad/S, H, D] over all ``tokens`` real tokens."""
    if layout.config.ulysses > 1:
        batch = q.shape[0]
        q, k, v = heads_to_tokens(torch.cat([q, k, v]), layout).split(batch)
    if layout.config.ring > 1:
        out = ring_attention(q, k, v, layout, tokens)
    else:
        # All tokens are here: drop the padding queries and keys, then restore the shape.
        out = pad_tokens(inner(q[:, :tokens], k[:, :tokens], v[:, :tokens]), q.shape[1], dim=1)
    if layout.config.ulysses > 1:
        out = tokens_to_heads(out, layout)
    return out


def sequence_parallel_backend(
    layout: ParallelLayout, inner: AttentionBackend, tokens: int
) -> AttentionBackend:
    """The self-attention backend for one forward over ``tokens`` real patch tokens."""
    config = layout.config
    core = "torch-lse-ring" if config.ring > 1 else inner.implementation
    return AttentionBackend(
        name=f"usp-{inner.name}",
        implementation=f"ulysses{config.ulysses}xring{config.ring}({core})",
        error_class=inner.error_class,
        fn=partial(sequence_parallel_attention, layout=layout, inner=inner, tokens=tokens),
    )


# ---------------------------------------------------------------------------------------------
# The DiT on a token shard


class ShardedDiT:
    """A WanDiT evaluated on this rank's token shard, with WanDiT's calling interface (``__call__``,
    ``prepare``, ``run_blocks``, ``finish``, ``blocks``), so FlexCache drives it unchanged: TeaCache
    residuals and PAB attention outputs are then kept per shard. Every rank of the sequence group
    must make the same calls; ``__call__`` returns the whole velocity on every one of them."""

    def __init__(self, dit: WanDiT, layout: ParallelLayout, attention: AttentionBackend):
        self.dit = dit
        self.layout = layout
        self.attention = attention  # the profile's backend: cross-attention, Ulysses-only core

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.dit.blocks

    @property
    def sharded(self) -> bool:
        return self.layout.config.sequence > 1

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        inputs = self.prepare(latents, timesteps, context)
        return self.finish(self.run_blocks(inputs), inputs)

    def prepare(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> DiTInputs:
        """``WanDiT.prepare`` with x and the RoPE rows cut to this rank's shard (grid stays whole)."""
        inputs = self.dit.prepare(latents, timesteps, context)
        if not self.sharded:
            return inputs
        cos, sin = inputs.rope
        rope = (shard_tokens(cos, self.layout, 0), shard_tokens(sin, self.layout, 0))
        return replace(inputs, x=shard_tokens(inputs.x, self.layout, 1), rope=rope)

    def self_attention_for(self, tokens: int) -> AttentionBackend:
        if not self.sharded:
            return self.attention
        return sequence_parallel_backend(self.layout, self.attention, tokens)

    def run_blocks(self, inputs: DiTInputs, reuse: list[AttentionReuse] | None = None) -> torch.Tensor:
        """The block stack on the shard; the DiT's own backends are restored afterwards."""
        saved = self.dit.attention, self.dit.cross_attention
        self.dit.set_attention(self.self_attention_for(math.prod(inputs.grid)), cross=self.attention)
        try:
            return self.dit.run_blocks(inputs, reuse)
        finally:
            self.dit.set_attention(*saved)

    def finish(self, x: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        """Gather the shards, drop the padding, then the head and unpatchify of ``WanDiT.finish``."""
        if self.sharded:
            x = gather_tokens(x, self.layout)[:, : math.prod(inputs.grid)]
        return self.dit.finish(x, inputs)


# ---------------------------------------------------------------------------------------------
# The denoising loop


def exchange_branches(velocity: torch.Tensor, layout: ParallelLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) velocity from this rank's branch and its CFG partner's."""
    both = [torch.empty_like(velocity) for _ in layout.cfg_ranks]
    dist.all_gather(both, velocity.contiguous(), group=layout.cfg_group)
    return both[COND], both[UNCOND]


class ParallelGuidance:
    """The pipeline's velocity model on a process group (``WanPipeline(velocity_model=...)``): every
    rank of the layout runs the same denoising loop on the same latents, text states and parameters,
    and gets the same velocity at every step. ``result.cache`` then counts this rank's evaluations
    only (one branch per step under CFG parallel)."""

    def __init__(self, layout: ParallelLayout):
        self.layout = layout

    def branches(
        self, dit: WanDiT, cache: FlexCache, step: DenoiseStep, with_uncond: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sharded = ShardedDiT(dit, self.layout, dit.attention)

        def branch_velocity(branch: int) -> torch.Tensor:
            context = step.cond if branch == COND else step.uncond
            return cache.forward(sharded, step.expert, branch, step.index, step.latents, step.t, context)

        if not with_uncond:  # every rank computes the conditional velocity
            return branch_velocity(COND), None
        if self.layout.config.cfg == 1:
            return branch_velocity(COND), branch_velocity(UNCOND)
        # COND on CFG rank 0, UNCOND on 1
        return exchange_branches(branch_velocity(self.layout.cfg_rank), self.layout)
