"""The 8-bit attention of ``kernels.triton_sage`` for Hopper, in Gluon, with the tensor cores kept busy
during the softmax; dense and block-sparse (``kernels.triton_sparge``'s kept lists).

Same operands (``triton_sage.quantize_qkv``), same numerics, same output: int8 Q.K with K smoothing
and per-block scales, the online softmax in fp32 and base 2, fp8 e4m3 P.V with a fresh tensor-core
accumulator per key tile added to an fp32 one (SageAttention2's two levels).

Why a second kernel: in the Triton kernel each key tile runs Q.K, waits for it, runs the softmax,
then P.V, and waits again, so within a warp group the tensor cores idle through every softmax (the
compiled code waits on each product as soon as it is issued; Triton 3.6's ``warp_specialize`` did
not change that, docs/PERFORMANCE.md). Here the program issues the next key tile's Q.K before it
starts this tile's softmax, and waits for it only after this tile's P.V is issued: the product of
tile j+1 runs while the softmax of tile j does. Gluon gives that control (asynchronous warp-group
MMAs, explicit waits, TMA loads into a ring of shared-memory stages with a barrier per stage).

Hopper only (wgmma), head dim 128, 64 query rows per program (one warp group); 128 keys a tile
dense, the map's 64 sparse. Status: the tests compile it for sm_90 with every Triton the project
allows, and ``bench/attention_gpu.py`` runs it on Hopper beside the Triton kernel, which the sage
and sparge backends keep running until this one has been measured faster on the GPU.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from smartdiff.kernels.triton_sage import (
    FP8_MAX,
    LOG2_E,
    KernelConfig,
    QuantizedQKV,
    check_inputs,
    quantize_qkv,
)

HEAD_DIM = 128
BLOCK_M = 64  # query rows per program: one warp group, wgmma's m64
DENSE_BLOCK_N, DENSE_STAGES = 128, 3  # keys a tile (and a K quantisation block); ring stages
SPARSE_BLOCK_N, SPARSE_STAGES = 64, 4  # the block map's key blocks

_LOG2_FP8_MAX = gl.constexpr(math.log2(FP8_MAX))
# Gluon is experimental and its names move: Triton 3.6 and 3.7 call the TMA load
# async_copy_global_to_shared, 3.9 async_load (the kernel was compiled for sm_90 with all three).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


def on_hopper(device: torch.device) -> bool:
    """Whether ``device`` is a Hopper GPU (sm_90), where this kernel runs (at head dim 128)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _check_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_inputs(q, k, v)
    if not on_hopper(q.device) or q.shape[-1] != HEAD_DIM:
        raise ValueError(f"kernels.gluon_sage runs head dim {HEAD_DIM} on Hopper (sm_90) GPUs only")


@gluon.jit
def _load_key_tile(
    k_desc,
    v_desc,
    k_smem,
    v_smem,
    k_bars,
    v_bars,
    key_row0,
    v_row0,
    i,
    key_block,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Start the TMA loads of the program's i-th tile, key block ``key_block`` (K rows from
    ``key_row0``, transposed V rows from ``v_row0``), into ring stage i % STAGES. K and V signal
    separate barriers, so Q.K can start before V has landed."""
    stage = i % STAGES
    mbarrier.expect(k_bars.index(stage), k_desc.block_type.nbytes)
    _tma_load(k_desc, [key_row0 + key_block * BLOCK_N, 0], k_bars.index(stage), k_smem.index(stage))
    mbarrier.expect(v_bars.index(stage), v_desc.block_type.nbytes)
    _tma_load(v_desc, [v_row0, key_block * BLOCK_N], v_bars.index(stage), v_smem.index(stage))


@gluon.jit
def _issue_scores(q_smem, k_smem, k_bars, i, zeros, STAGES: gl.constexpr):
    """Once the program's i-th K tile has landed, start its int32 Q.K on the tensor cores (async)."""
    stage = i % STAGES
    mbarrier.wait(k_bars.index(stage), (i // STAGES) & 1)
    return warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), zeros, use_acc=False, is_async=True)


@gluon.jit
def _issue_pv(p, v_smem, v_bars, i, zeros, STAGES: gl.constexpr):
    """Once the program's i-th V tile has landed, start P (fp8, in registers) times it (async)."""
    stage = i % STAGES
    mbarrier.wait(v_bars.index(stage), (i // STAGES) & 1)
    return warpgroup_mma(p, v_smem.index(stage).permute((1, 0)), zeros, use_acc=False, is_async=True)


@gluon.jit
def _softmax_tile(
    scores, row_max, row_sum, scale, n_valid, MASK: gl.constexpr, BLOCK_N: gl.constexpr, layout: gl.constexpr
):
    """One tile's online-softmax update (steps 3-4 of ``triton_sage``): returns (448 P~ in fp8,
    the accumulator's correction, the new row max and row sum). MASK: columns from ``n_valid`` on
    are padding."""
    s = scores.to(gl.float32)
    if MASK:
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        s = gl.where(gl.expand_dims(cols < n_valid, 0), s * scale, float("-inf"))
        new_max = gl.maximum(row_max, gl.max(s, 1))
        p = gl.exp2(s - gl.expand_dims(new_max - _LOG2_FP8_MAX, 1))
    else:
        # scale > 0: scaling, shifting and the exp2 argument are one FMA per score.
        new_max = gl.maximum(row_max, gl.max(s, 1) * scale)
        p = gl.exp2(s * scale - gl.expand_dims(new_max - _LOG2_FP8_MAX, 1))
    correction = gl.exp2(row_max - new_max)  # 0 on the first tile (row_max = -inf)
    row_sum = row_sum * correction + gl.sum(p, 1)
    p8 = p.to(gl.float8e4nv, fp_downcast_rounding="rtne")
    # triton_sage.fp8_operand_order: V's fp8 keys are stored in this order within each 16.
    p8 = gl.reshape(p8, [p8.shape[0], BLOCK_N // 16, 2, 4, 2])
    p8 = gl.reshape(gl.permute(p8, [0, 1, 3, 2, 4]), [p8.shape[0], BLOCK_N])
    return p8, correction, new_max, row_sum


@gluon.jit
def _key_block(kept, i, SPARSE: gl.constexpr):
    """The key block of the program's i-th tile: i itself, or the i-th entry of its kept list."""
    if SPARSE:
        return gl.load(kept + i)
    else:
        return i


@gluon.jit(do_not_specialize=["n_q", "n_k"])
def _attention_kernel(
    q_desc,
    k_desc,
    v_desc,
    q_scale_ptr,
    k_scale_ptr,
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
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    SPARSE: gl.constexpr,
    MAP_BLOCK_Q: gl.constexpr,
):
    """One program: BLOCK_M queries of one batch and head, over every key block or (SPARSE) over
    the ascending kept list of its map row (``triton_sparge``'s lists). q_desc: Q (bh * padded
    queries, d); k_desc: K (bh * padded keys, d); v_desc: transposed V (bh * d, padded keys)."""
    q_block = gl.program_id(0)
    bh = gl.program_id(1)
    n_q_blocks = gl.cdiv(n_q, BLOCK_M)
    n_k_blocks = gl.cdiv(n_k, BLOCK_N)
    key_row0 = bh * n_k_blocks * BLOCK_N
    v_row0 = bh * HEAD_DIM
    if SPARSE:
        n_map_rows = gl.cdiv(n_q, MAP_BLOCK_Q)
        map_row = q_block // (MAP_BLOCK_Q // BLOCK_M)
        kept = kept_ptr + (bh.to(gl.int64) * n_map_rows + map_row) * n_k_blocks
        n_tiles = gl.load(counts_ptr + bh * n_map_rows + map_row)
    else:
        kept = kept_ptr
        n_tiles = n_k_blocks

    s_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32]
    )
    p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=4)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_mma)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_mma)

    q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, HEAD_DIM, BLOCK_N], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for ring_slot in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(ring_slot), count=1)
        mbarrier.init(v_bars.index(ring_slot), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [(bh * n_q_blocks + q_block) * BLOCK_M, 0], q_bar, q_smem)
    for ahead in gl.static_range(STAGES):
        if ahead < n_tiles:
            _load_key_tile(
                k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, key_row0, v_row0, ahead,
                _key_block(kept, ahead, SPARSE), BLOCK_N, STAGES,
            )  # fmt: skip

    q_scale = gl.load(q_scale_ptr + bh * n_q_blocks + q_block) * qk_scale
    k_scale_head = k_scale_ptr + bh * n_k_blocks
    zeros_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_mma)
    zeros_o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_mma)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_mma)
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)
    row_sum = gl.zeros([BLOCK_M], gl.float32, s_rows)

    mbarrier.wait(q_bar, 0)
    if n_tiles > 0:  # a sparse query block may keep no key block: its output is zeros
        scores = warpgroup_mma_wait(0, deps=(_issue_scores(q_smem, k_smem, k_bars, 0, zeros_s, STAGES),))
        key_block = _key_block(kept, 0, SPARSE)
        for i in range(0, n_tiles - 1):  # the last tile is the only one that may be partial
            next_scores = _issue_scores(q_smem, k_smem, k_bars, i + 1, zeros_s, STAGES)
            scale = q_scale * gl.load(k_scale_head + key_block)
            p, correction, row_max, row_sum = _softmax_tile(
                scores, row_max, row_sum, scale, n_k, False, BLOCK_N, s_mma
            )
            pv = _issue_pv(gl.convert_layout(p, p_operand), v_smem, v_bars, i, zeros_o, STAGES)
            scores, pv = warpgroup_mma_wait(0, deps=(next_scores, pv))
            # Both products that read this stage are done: refill it with the tile STAGES ahead.
            if i + STAGES < n_tiles:
                _load_key_tile(
                    k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, key_row0, v_row0, i + STAGES,
                    _key_block(kept, i + STAGES, SPARSE), BLOCK_N, STAGES,
                )  # fmt: skip
            acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1) + pv
            key_block = _key_block(kept, i + 1, SPARSE)

        scale = q_scale * gl.load(k_scale_head + key_block)
        p, correction, row_max, row_sum = _softmax_tile(
            scores, row_max, row_sum, scale, n_k - key_block * BLOCK_N, True, BLOCK_N, s_mma
        )
        pv = _issue_pv(gl.convert_layout(p, p_operand), v_smem, v_bars, n_tiles - 1, zeros_o, STAGES)
        pv = warpgroup_mma_wait(0, deps=(pv,))
        acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1) + pv

    mbarrier.invalidate(q_bar)
    for ring_slot in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(ring_slot))
        mbarrier.invalidate(v_bars.index(ring_slot))

    # Step 6: undo V's scale and divide by the row sum (both carry P~'s factor 448). A row that
    # attended to nothing has acc 0 and row sum 0: it writes zeros, as the reference does.
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_mma))
    v_scale = gl.load(v_scale_ptr + bh * HEAD_DIM + dims)
    row_sum = gl.convert_layout(row_sum, o_rows)
    row_sum = gl.where(row_sum > 0.0, row_sum, 1.0)
    out = acc * gl.expand_dims(v_scale, 0) / gl.expand_dims(row_sum, 1)
    batch = bh // n_heads
    head = bh % n_heads
    rows = (q_block * BLOCK_M + gl.arange(0, BLOCK_M, layout=o_rows)).to(gl.int64)
    dst = out_ptr + batch.to(gl.int64) * stride_ob + head * stride_oh
    dst = dst + gl.expand_dims(rows, 1) * stride_on + gl.expand_dims(dims, 0) * stride_od
    gl.store(dst, out.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(rows < n_q, 1))


def describe(x: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A TMA descriptor of 2-D ``x`` whose box is one ``block`` tile, in wgmma's shared layout."""
    dtype = gl.int8 if x.dtype == torch.int8 else gl.float8e4nv
    return TensorDescriptor.from_tensor(x, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def descriptors(
    qkv: QuantizedQKV, block_n: int
) -> tuple[TensorDescriptor, TensorDescriptor, TensorDescriptor]:
    """TMA descriptors of the quantised operands: Q (bh * padded queries, d), K (bh * padded keys,
    d), transposed V (bh * d, padded keys)."""
    d = qkv.q.shape[-1]
    return (
        describe(qkv.q.view(-1, d), [BLOCK_M, d]),
        describe(qkv.k.view(-1, d), [block_n, d]),
        describe(qkv.v.view(-1, qkv.v.shape[-1]), [d, block_n]),
    )


def _launch(
    qkv: QuantizedQKV,
    out: torch.Tensor,
    block_n: int,
    stages: int,
    lists: tuple[torch.Tensor, torch.Tensor] | None = None,
    map_block_q: int = 128,
) -> torch.Tensor:
    """Run the kernel on operands quantised with BLOCK_M-query and ``block_n``-key blocks, into
    ``out`` (batch, n_q, heads, 128). ``lists``: the kept key blocks and their counts per
    ``map_block_q``-query row (``triton_sparge``), for the block-sparse kernel; None for dense."""
    b, n_q, h, d = out.shape
    q_desc, k_desc, v_desc = descriptors(qkv, block_n)
    kept, counts = lists if lists is not None else (qkv.k_scale, qkv.k_scale)  # unread when dense
    _attention_kernel[(triton.cdiv(n_q, BLOCK_M), b * h)](
        q_desc, k_desc, v_desc, qkv.q_scale, qkv.k_scale, qkv.v_scale, out, kept, counts, *out.stride(),
        n_q, qkv.n_k, h, d**-0.5 * LOG2_E,
        HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, SPARSE=lists is not None,
        MAP_BLOCK_Q=map_block_q, num_warps=4,
    )  # fmt: skip
    return out


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``triton_sage.sage_attention`` with fp8 P.V, on Hopper at head dim 128."""
    _check_runs(q, k, v)
    config = KernelConfig(BLOCK_M, DENSE_BLOCK_N, num_warps=4, num_stages=DENSE_STAGES, tma=True)
    qkv = quantize_qkv(q, k, v, config, pv_fp8=True)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return _launch(qkv, out, DENSE_BLOCK_N, DENSE_STAGES)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kept: torch.Tensor,
    counts: torch.Tensor,
    map_block_q: int,
    k_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """``triton_sparge.attend_kept_blocks`` with fp8 P.V, on Hopper at head dim 128: over the kept
    lists of ``map_block_q``-query rows of SPARSE_BLOCK_N-key blocks."""
    _check_runs(q, k, v)
    config = KernelConfig(BLOCK_M, SPARSE_BLOCK_N, num_warps=4, num_stages=SPARSE_STAGES, tma=True)
    qkv = quantize_qkv(q, k, v, config, pv_fp8=True, k_mean=k_mean)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return _launch(qkv, out, SPARSE_BLOCK_N, SPARSE_STAGES, (kept, counts), map_block_q)
