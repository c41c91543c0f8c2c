"""This project's block-sparse 8-bit attention (SpargeAttn-style), in Triton.

Two steps:
  1. The block map: ``kernels.reference.block_mask``'s rule (mean-pooled block scores, top-k or CDF
     selection, never dropping a block whose tokens are not alike), on blocks of MAP_BLOCK_Q query
     x MAP_BLOCK_K key tokens. The pooling (block means and self-similarities, K smoothed) is one
     Triton pass over Q and one over K (``pool_blocks``) instead of several fp32 copies of both; the
     block scores are the reference's (one matrix product), and the selection (softmax, ranking,
     top-k or CDF cut, the similarity rule) and the kept lists are one Triton program per query
     block (``block_map``).
  2. The kernel: per query block, a compact list of its kept key blocks (ascending) and their count
     (``block_map`` writes them; ``kept_block_lists`` derives them from any mask);
     the program visits only those, with the per-tile code and 8-bit numerics of
     ``kernels.triton_sage`` (int8 Q.K with K smoothing, fp8 e4m3 or fp16 P.V, fp32 online softmax).
     Quantisation covers all tokens (the K mean, the per-channel V scale), as upstream and
     ``kernels.reference.sparge_reference`` do. A query block that keeps no key block outputs zeros.

The kernel's key tiles are the map's key blocks (BLOCK_N = MAP_BLOCK_K), so each kept map block is
exactly one kernel step per program; its query tiles are the map's query blocks or a half of one
(BLOCK_M = 64 shares the list of its 128-token map block). ``sparge_attention`` returns the block
map with the output so a caller can log the fraction of blocks computed
(``kernels.sparge.SparsityStats`` sums it per job).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from smartdiff.kernels.reference import check_selection, topk_count
from smartdiff.kernels.triton_sage import (
    LOG2_E,
    KernelConfig,
    attend_key_block,
    check_inputs,
    empty_softmax_state,
    for_device,
    launch_per_token_block,
    load_query_block,
    load_token_block,
    quantize_qkv,
    store_output,
    tma_descriptors,
    token_mean,
)

MAP_BLOCK_Q = 128
MAP_BLOCK_K = 64


# Tuned on an H200 with bench/attention_gpu.py --sweep (head dim 128 at the 1.3B shape, half the
# blocks kept, V still quantised in PyTorch: 6.0 ms on 64-token query tiles with 4 warps, 3 stages and
# TMA loads; 7.0-7.4 ms at the same tiles with pointer loads, 8.3 ms on the map's 128-token blocks
# with 8 warps; head dim 64 is not tuned).
SPARSE_CONFIGS: dict[int, KernelConfig] = {
    64: KernelConfig(block_m=MAP_BLOCK_Q, block_n=MAP_BLOCK_K, num_warps=4, num_stages=3, tma=True),
    128: KernelConfig(block_m=MAP_BLOCK_Q // 2, block_n=MAP_BLOCK_K, num_warps=4, num_stages=3, tma=True),
}


def sparse_config(head_dim: int, device: torch.device) -> KernelConfig:
    """The kernel's tile and launch choice for ``head_dim`` on ``device`` (``for_device``)."""
    return for_device(SPARSE_CONFIGS[head_dim], device)


@triton.jit(do_not_specialize=["n_tokens"])
def _pool_kernel(
    x_ptr,
    mean_ptr,
    pooled_ptr,
    sim_ptr,
    n_tokens,
    n_heads,
    stride_b,
    stride_n,
    stride_h,
    stride_d,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr,
):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    n_blocks = tl.num_programs(0)
    x = load_token_block(
        x_ptr, mean_ptr, block, bh, n_tokens, n_heads, stride_b, stride_n, stride_h, stride_d,
        HEAD_DIM, BLOCK, SUBTRACT_MEAN,
    )  # fmt: skip
    dims = tl.arange(0, HEAD_DIM)
    count = tl.minimum(n_tokens - block * BLOCK, BLOCK).to(tl.float32)
    # Mean over all token pairs of cos(x_i, x_j) = ||sum of unit vectors||^2 / count^2.
    # One reciprocal per token, not a division per element (a division is a long instruction
    # sequence, and this kernel would be bound by it instead of by its loads).
    inverse_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)
    unit_sum = tl.sum(x * inverse_norm[:, None], 0)
    out = pooled_ptr + (bh.to(tl.int64) * n_blocks + block) * HEAD_DIM
    tl.store(out + dims, tl.sum(x, 0) / count)
    tl.store(sim_ptr + bh * n_blocks + block, tl.sum(unit_sum * unit_sum) / (count * count))


def pool_blocks(
    x: torch.Tensor, block: int, mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (batch, tokens, heads, d) -> block means fp32 (batch, heads, blocks, d) and self-similarities
    (batch, heads, blocks), as ``kernels.reference`` pools; ``mean`` (batch, heads, d) fp32 is
    subtracted first if given."""
    b, n, h, d = x.shape
    n_blocks = triton.cdiv(n, block)
    pooled = torch.empty(b, h, n_blocks, d, dtype=torch.float32, device=x.device)
    sim = torch.empty(b, h, n_blocks, dtype=torch.float32, device=x.device)
    num_warps = 8 if d * block > 8192 else 4  # at most 64 fp32 values of the tile per thread
    launch_per_token_block(_pool_kernel, x, block, mean, (pooled, sim), num_warps)
    return pooled, sim


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 whose signed order is x's order (negative floats have their magnitude bits
    flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _largest_key_reaching(key, weight, need):
    """The largest int32 T with sum(weight where key >= T) >= need (weights >= 0), found bit by bit
    from the top: 32 masked sums over the row instead of a sort of it. The smallest int32 if no T
    reaches ``need``."""
    reaches_zero = tl.sum(tl.where(key >= 0, weight, 0)) >= need
    prefix = tl.where(reaches_zero, 0, -2147483648)
    for bit in tl.static_range(30, -1, -1):
        candidate = prefix | (1 << bit)  # two's complement: setting a lower bit raises the value
        prefix = tl.where(tl.sum(tl.where(key >= candidate, weight, 0)) >= need, candidate, prefix)
    return prefix


@triton.jit
def _select_kernel(
    score_ptr,
    sim_q_ptr,
    sim_k_ptr,
    mask_ptr,
    kept_ptr,
    counts_ptr,
    n_q_blocks,
    n_k_blocks,
    keep_topk,
    cdf,
    sim_threshold,
    USE_CDF: tl.constexpr,
    USE_SIM: tl.constexpr,
    N_PAD: tl.constexpr,
):
    """One query block's row of ``select_blocks``, and its kept key blocks as an ascending list.

    Key blocks rank by score, ties by the lower index first. Scores rank as the reference's softmax
    probabilities do, except where those underflow to a tie at 0. No sort: the score of the last
    kept block is searched for bit by bit (``_largest_key_reaching``: top-k counts blocks, the CDF
    cut sums their probabilities), then the row keeps every block scoring above it and, among those
    scoring exactly it, the lowest indices until the count (or the mass) is reached. The CDF cut's
    running sums add in index order where the reference's add in rank order: the two can differ by
    a rounding where a prefix's mass lands on ``cdf`` itself.
    """
    row = tl.program_id(0)
    bh = tl.program_id(1)
    keys = tl.arange(0, N_PAD)
    valid = keys < n_k_blocks
    line = bh.to(tl.int64) * n_q_blocks + row
    score = tl.load(score_ptr + line * n_k_blocks + keys, mask=valid, other=float("-inf"))
    if USE_SIM:  # a block whose tokens are not alike is always kept, and never ranked
        k_unlike = tl.load(sim_k_ptr + bh * n_k_blocks + keys, mask=valid, other=0.0) <= sim_threshold
        q_unlike = tl.load(sim_q_ptr + line) <= sim_threshold
        score = tl.where(k_unlike, float("-inf"), score)
        always = tl.where(q_unlike, valid, k_unlike)
    else:
        always = keys < 0  # none
    rank_key = _ordered_key(score)
    if USE_CDF:
        # The smallest prefix of the ranked softmax whose mass reaches cdf, plus the crossing block.
        p = tl.where(score > float("-inf"), tl.exp(score - tl.max(score)), 0.0)
        p = p / tl.maximum(tl.sum(p), 1e-38)  # no alike key: all zeros, and all kept below anyway
        last = _largest_key_reaching(rank_key, p, cdf)
        above, tied = rank_key > last, rank_key == last
        mass_before = tl.sum(tl.where(above, p, 0.0)) + tl.cumsum(tl.where(tied, p, 0.0)) - p
        keep_tied = tied & (mass_before < cdf)
    else:
        last = _largest_key_reaching(rank_key, valid.to(tl.int32), keep_topk)
        above, tied = rank_key > last, rank_key == last
        keep_tied = tied & (tl.cumsum(tied.to(tl.int32)) <= keep_topk - tl.sum(above.to(tl.int32)))
    keep = (above | keep_tied | always) & valid
    tl.store(mask_ptr + line * n_k_blocks + keys, keep.to(tl.uint8), mask=valid)
    keep32 = keep.to(tl.int32)
    tl.store(kept_ptr + line * n_k_blocks + tl.cumsum(keep32) - 1, keys, mask=keep)
    tl.store(counts_ptr + line, tl.sum(keep32))


@dataclass(frozen=True)
class BlockMap:
    mask: torch.Tensor  # bool (batch, heads, query blocks, key blocks), True = compute
    kept: torch.Tensor  # int32 (batch*heads, query blocks, key blocks): kept key blocks first, ascending
    counts: torch.Tensor  # int32 (batch*heads, query blocks): how many of ``kept`` are valid


def block_map(
    q: torch.Tensor,
    k: torch.Tensor,
    topk: float | None = None,
    cdf: float | None = None,
    sim_threshold: float | None = 0.6,
    k_mean: torch.Tensor | None = None,
) -> BlockMap:
    """``kernels.reference.block_mask`` on MAP_BLOCK_Q x MAP_BLOCK_K blocks, K smoothed, with the
    pooling and the selection in Triton, and the kept lists the sparse kernel reads. ``k_mean``: K's
    mean over tokens (``token_mean``), if the caller has it already."""
    check_selection(topk, cdf)
    k_mean = token_mean(k) if k_mean is None else k_mean
    pq, sim_q = pool_blocks(q, MAP_BLOCK_Q)
    pk, sim_k = pool_blocks(k, MAP_BLOCK_K, mean=k_mean)
    (b, h, n_q_blocks, d), n_k_blocks = pq.shape, pk.shape[-2]
    score = (pq @ pk.transpose(-1, -2)).mul_(d**-0.5)  # the reference's scores, bit for bit
    mask = torch.empty(b, h, n_q_blocks, n_k_blocks, dtype=torch.uint8, device=q.device)
    kept = torch.empty(b * h, n_q_blocks, n_k_blocks, dtype=torch.int32, device=q.device)
    counts = torch.empty(b * h, n_q_blocks, dtype=torch.int32, device=q.device)
    n_pad = triton.next_power_of_2(n_k_blocks)
    _select_kernel[(n_q_blocks, b * h)](
        score, sim_q, sim_k, mask, kept, counts, n_q_blocks, n_k_blocks,
        topk_count(topk, n_k_blocks) if topk is not None else 0,
        cdf if cdf is not None else 0.0,
        sim_threshold if sim_threshold is not None else 0.0,
        USE_CDF=cdf is not None, USE_SIM=sim_threshold is not None, N_PAD=n_pad,
        num_warps=4 if n_pad <= 1024 else 8,
    )  # fmt: skip
    return BlockMap(mask.view(torch.bool), kept, counts)


def kept_block_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mask (B, H, nq, nk) -> kept key blocks per query block, ascending, then the others
    (int32 (B*H, nq, nk); only the first ``count`` entries are read), and counts (int32 (B*H, nq))."""
    flat = mask.flatten(0, 1)
    counts = flat.sum(dim=-1, dtype=torch.int32)
    # A stable descending sort of 1/0 puts the kept indices first, in ascending order.
    order = torch.sort(flat.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return order.to(torch.int32).contiguous(), counts.contiguous()


@triton.jit(do_not_specialize=["n_q", "n_k"])
def _block_sparse_sage_kernel(
    q,
    q_scale_ptr,
    k,
    k_scale_ptr,
    v,
    v_scale_ptr,
    out_ptr,
    kept_ptr,
    counts_ptr,
    stride_ob,
    stride_on,
    stride_oh,
    stride_od,
    n_q,
    n_k,
    n_heads,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAP_BLOCK_Q: tl.constexpr,
    PV_FP8: tl.constexpr,
    TMA: tl.constexpr,
):
    """q, k, v: the quantised operands' TMA descriptors if TMA, else their pointers."""
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    n_map_rows = tl.cdiv(n_q, MAP_BLOCK_Q)
    map_row = q_block // (MAP_BLOCK_Q // BLOCK_M)  # the map block this query tile lies in
    n_k_blocks = tl.cdiv(n_k, BLOCK_N)
    q, q_scale = load_query_block(q, q_scale_ptr, bh, q_block, n_q, qk_scale, HEAD_DIM, BLOCK_M, TMA)
    if TMA:
        k_src, v_src = k, v
    else:
        k_src = k + bh.to(tl.int64) * n_k_blocks * BLOCK_N * HEAD_DIM
        v_src = v + bh.to(tl.int64) * HEAD_DIM * n_k_blocks * BLOCK_N
    k_scale_head = k_scale_ptr + bh * n_k_blocks
    kept = kept_ptr + (bh.to(tl.int64) * n_map_rows + map_row) * n_k_blocks
    n_kept = tl.load(counts_ptr + bh * n_map_rows + map_row)

    # The list ascends, so a kept partial last key block (index n_k // BLOCK_N) is its last entry:
    # the only one that needs the column mask. Without a partial block no index equals n_k // BLOCK_N.
    last = tl.load(kept + tl.maximum(n_kept - 1, 0))
    tail_kept = (n_kept > 0) & (last == n_k // BLOCK_N)

    acc, row_max, row_sum = empty_softmax_state(BLOCK_M, HEAD_DIM)
    for i in range(0, n_kept - tail_kept.to(tl.int32)):
        key_block = tl.load(kept + i)
        acc, row_max, row_sum = attend_key_block(
            acc, row_max, row_sum, q, q_scale, k_src, k_scale_head, v_src, bh, key_block, n_k,
            HEAD_DIM, BLOCK_N, PV_FP8, False, TMA,
        )  # fmt: skip
    if tail_kept:
        acc, row_max, row_sum = attend_key_block(
            acc, row_max, row_sum, q, q_scale, k_src, k_scale_head, v_src, bh, last, n_k,
            HEAD_DIM, BLOCK_N, PV_FP8, True, TMA,
        )  # fmt: skip
    store_output(
        acc, row_sum, v_scale_ptr, out_ptr, bh, q_block, n_q, n_heads,
        stride_ob, stride_on, stride_oh, stride_od, HEAD_DIM, BLOCK_M, PV_FP8,
    )  # fmt: skip


def block_sparse_sage_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    pv_fp8: bool = True,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """8-bit attention over the kept blocks of ``mask`` only; same shape and dtype as q.

    ``mask`` is bool (batch, heads, ceil(n_q / 128), ceil(n_k / 64)), True = compute. ``config``
    overrides the tile and launch choice (BLOCK_N must be the map's 64, BLOCK_M 128 or 64), and the
    loads (``tma``).
    """
    check_inputs(q, k, v)
    b, n_q, h, _ = q.shape
    expected = (b, h, triton.cdiv(n_q, MAP_BLOCK_Q), triton.cdiv(k.shape[1], MAP_BLOCK_K))
    if mask.dtype != torch.bool or tuple(mask.shape) != expected or mask.device != q.device:
        raise ValueError(f"mask must be bool {expected} on {q.device}, got {mask.dtype} {tuple(mask.shape)}")
    kept, counts = kept_block_lists(mask)
    return attend_kept_blocks(q, k, v, kept, counts, pv_fp8, config)


def attend_kept_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kept: torch.Tensor,
    counts: torch.Tensor,
    pv_fp8: bool,
    config: KernelConfig | None,
    k_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel over kept-block lists (``kept_block_lists`` or ``block_map``'s); ``k_mean``:
    ``token_mean(k)``, if the caller has it."""
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    config = config or sparse_config(d, q.device)
    if config.block_m not in (MAP_BLOCK_Q, MAP_BLOCK_Q // 2) or config.block_n != MAP_BLOCK_K:
        raise ValueError(
            f"the kernel's tiles must be {MAP_BLOCK_Q} or {MAP_BLOCK_Q // 2} query x {MAP_BLOCK_K} key tokens"
        )
    qkv = quantize_qkv(q, k, v, config, pv_fp8, k_mean)
    out = torch.empty(b, n_q, h, d, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(n_q, config.block_m), b * h)
    q_in, k_in, v_in = tma_descriptors(qkv, config) if config.tma else (qkv.q, qkv.k, qkv.v)
    _block_sparse_sage_kernel[grid](
        q_in,
        qkv.q_scale,
        k_in,
        qkv.k_scale,
        v_in,
        qkv.v_scale,
        out,
        kept,
        counts,
        *out.stride(),
        n_q,
        n_k,
        h,
        d**-0.5 * LOG2_E,
        HEAD_DIM=d,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        MAP_BLOCK_Q=MAP_BLOCK_Q,
        PV_FP8=pv_fp8,
        TMA=config.tma,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        maxnreg=config.max_registers,
    )
    return out


def sparge_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: float | None = None,
    cdf: float | None = None,
    sim_threshold: float | None = 0.6,
    pv_fp8: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block map (``block_map``, exactly one of topk and cdf) then the block-sparse kernel.

    Returns (output, block mask); ``mask.float().mean()`` is the fraction of blocks computed.
    """
    check_inputs(q, k, v)
    k_mean = token_mean(k)  # K smoothing's mean, for the block map and for the quantisation
    blocks = block_map(q, k, topk=topk, cdf=cdf, sim_threshold=sim_threshold, k_mean=k_mean)
    out = attend_kept_blocks(q, k, v, blocks.kept, blocks.counts, pv_fp8, None, k_mean)
    return out, blocks.mask
