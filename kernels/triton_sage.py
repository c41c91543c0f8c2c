"""This project's 8-bit attention forward kernel, in Triton, with SageAttention2's numerics.

Inputs q, k, v are (batch, tokens, heads, head_dim) in bf16, fp16 or fp32; the output has q's shape
and dtype. Non-causal; head dim 64 or 128; any token counts (the tails are masked), and k/v may have
a different token count from q (cross-attention). Numerics, those of
``kernels.reference.sage_reference`` (the oracle this kernel is tested against):

  1. K smoothing: K minus its mean over tokens, per batch and head (the softmax does not change).
  2. Symmetric int8 per block: Q per block of BLOCK_M tokens, K per block of BLOCK_N tokens,
     scale = max|x| / 127, values round-half-even(x / scale) (``quantize_int8_per_block``, a small
     Triton kernel that also writes the zero padding the main kernel reads without masks).
  3. S = Q_int8 . K_int8^T with int32 accumulation (exact), times scale_q * scale_k times the softmax
     scale 1/sqrt(d) and log2(e), so the softmax runs in base 2 with exp2.
  4. Online softmax in fp32: running row max and row sum of the unquantised P~ = exp2(S - max).
  5. P.V, ``pv_fp8=True`` (SageAttention2, needs sm_89+): P~ in [0, 1] times 448 to fp8 e4m3, V
     divided by a per-channel scale (max over tokens of |V| / 448, per batch and head) to fp8 e4m3.
     Each tile's product is accumulated by the tensor cores, then added to an fp32 accumulator: two
     levels, as SageAttention2, because Hopper's fp8 MMA accumulates with reduced precision.
     ``pv_fp8=False`` (SageAttention1): fp16 P~ and fp16 V, fp32 accumulation.
  6. out = acc * scale_v / row_sum, stored in the input dtype. (In the fp8 path the exp2 itself
     yields 448 P~, so acc and row_sum both carry the 448 and the ratio cancels it.)

Layout of the quantised operands: Q and K int8 (batch*heads, padded tokens, head_dim); V
transposed, (batch*heads, head_dim, padded tokens), so the P.V operand is K-major as Hopper's fp8
MMA wants it, and in fp8 with the keys of each 16 reordered (``fp8_operand_order``) so that P's
registers feed the product without moving between threads. ``kernels.triton_sparge`` runs the
same per-tile code over a block-sparse key list.

A ``KernelConfig`` with ``tma`` has the kernels read the same layouts through host-side TMA
descriptors instead of pointers (sm_90+; Triton then keeps several K and V tiles in flight in
shared memory, ``bench/kernel_build.py`` shows how much). Same numerics; the default on Hopper,
where it measured 8-14% faster than pointer loads; older GPUs read through pointers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite float8 e4m3fn value
LOG2_E = 1.4426950408889634
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Adding and subtracting 1.5 * 2^23 in fp32 leaves x rounded to an integer, half to even (as
# torch.round), for |x| < 2^22; the values rounded here are at most 127. The interpreter has no
# libdevice, so rint is not an option for code that must also run there.
_ROUND_TO_INTEGER = tl.constexpr(12582912.0)
_FP8_MAX = tl.constexpr(FP8_MAX)
_LOG2_FP8_MAX = tl.constexpr(math.log2(FP8_MAX))
_FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny, as the reference


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query tokens per program (and per Q quantisation block)
    block_n: int  # key tokens per step (and per K quantisation block)
    num_warps: int
    num_stages: int
    tma: bool = False  # Q, K and V tiles read by the TMA through descriptors (sm_90+), not pointers
    # Registers a thread may use (ptxas's maxnreg), None for the compiler's choice: a cap lets more
    # programs share a multiprocessor, which is what hides one program's softmax behind another's
    # products (the kernel waits on each product as soon as it is issued). For tuning: no default
    # sets one (``CONFIGS``).
    max_registers: int | None = None


# A Hopper multiprocessor's registers, allocated per warp in steps of 8 a thread.
HOPPER_REGISTERS = 65536


# Tuned on an H200 with bench/attention_gpu.py --sweep (head dim 128 at the 1.3B shape, the whole
# call while V was still quantised in PyTorch: 9.3 ms at 64 x 128 tiles with 4 warps, 2 stages and
# TMA loads; 10.2 ms at the same tiles with pointer loads and 3 stages, 11.9 ms at 128 x 128 with
# 8 warps; head dim 64 is not tuned). BLOCK_M and BLOCK_N are also the Q and K quantisation blocks.
# No register cap: SageAttention2's Hopper kernel runs its 64 x 128 tiles in 167-168 registers, three
# programs to a multiprocessor. Ours took 198 while P moved between threads on its way to P.V; with
# P in ``fp8_operand_order`` Triton 3.6 builds it in 168, three programs at two stages, uncapped.
CONFIGS: dict[int, KernelConfig] = {
    64: KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, tma=True),
    128: KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=2, tma=True),
}


def for_device(config: KernelConfig, device: torch.device) -> KernelConfig:
    """A default config as ``device`` can run it: its tiles read by the TMA on sm_90 and newer,
    through pointers on older GPUs (same numerics, same tiles)."""
    if config.tma and device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return replace(config, tma=False)
    return config


@dataclass(frozen=True)
class QuantizedQKV:
    """Kernel operands; "bh" is batch * heads, token dims are padded to whole blocks with zeros."""

    q: torch.Tensor  # int8 (bh, n_q padded, d)
    q_scale: torch.Tensor  # fp32 (bh, query blocks)
    k: torch.Tensor  # int8 (bh, n_k padded, d), smoothed
    k_scale: torch.Tensor  # fp32 (bh, key blocks)
    v: torch.Tensor  # fp8 e4m3 or fp16 (bh, d, n_k padded)
    v_scale: torch.Tensor  # fp32 (bh, d); ones for fp16
    n_q: int
    n_k: int


# --- quantisation -------------------------------------------------------------------------------


@triton.jit
def load_token_block(
    x_ptr,
    mean_ptr,
    block,
    bh,
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
    """Tokens [block * BLOCK, +BLOCK) of head ``bh`` of x (batch, tokens, heads, d) in fp32, the
    per-head ``mean`` subtracted if SUBTRACT_MEAN; rows past the last token are zeros."""
    batch, head = bh // n_heads, bh % n_heads
    rows = (block * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    inside = rows[:, None] < n_tokens
    src = x_ptr + batch.to(tl.int64) * stride_b + head * stride_h
    x = tl.load(src + rows[:, None] * stride_n + dims[None, :] * stride_d, mask=inside, other=0.0)
    x = x.to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(mean_ptr + bh * HEAD_DIM + dims)
        x = tl.where(inside, x - mean[None, :], 0.0)  # padding rows stay zero
    return x


# Token counts change with every video size: no recompiling for their divisibility by 16.
@triton.jit(do_not_specialize=["n_tokens"])
def _quantize_int8_kernel(
    x_ptr,
    mean_ptr,
    values_ptr,
    scales_ptr,
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
    rows = (block * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    scale = tl.maximum(tl.max(tl.abs(x)) / 127.0, _FP32_TINY)
    values = (tl.div_rn(x, scale) + _ROUND_TO_INTEGER) - _ROUND_TO_INTEGER
    dst = values_ptr + bh.to(tl.int64) * n_blocks * BLOCK * HEAD_DIM
    tl.store(dst + rows[:, None] * HEAD_DIM + dims[None, :], values.to(tl.int8))
    tl.store(scales_ptr + bh * n_blocks + block, scale)


def quantize_int8_per_block(
    x: torch.Tensor, block: int, mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (batch, tokens, heads, d) -> int8 (batch*heads, padded tokens, d), fp32 scales (batch*heads, blocks).

    ``mean`` (batch, heads, d) fp32, if given, is subtracted first (K smoothing). Rows past the last
    token are zeros.
    """
    b, n, h, d = x.shape
    n_blocks = triton.cdiv(n, block)
    values = torch.empty(b * h, n_blocks * block, d, dtype=torch.int8, device=x.device)
    scales = torch.empty(b * h, n_blocks, dtype=torch.float32, device=x.device)
    launch_per_token_block(_quantize_int8_kernel, x, block, mean, (values, scales), num_warps=4)
    return values, scales


def launch_per_token_block(
    kernel: triton.JITFunction,
    x: torch.Tensor,
    block: int,
    mean: torch.Tensor | None,
    tensors: tuple[torch.Tensor, ...],
    num_warps: int,
) -> None:
    """Run a kernel with ``load_token_block``'s arguments (x, mean, *tensors, n_tokens, n_heads,
    x's strides) on one program per block of ``block`` tokens and per batch and head."""
    b, n, h, d = x.shape
    kernel[(triton.cdiv(n, block), b * h)](
        x,
        mean if mean is not None else x,  # not read without SUBTRACT_MEAN
        *tensors,
        n,
        h,
        *x.stride(),
        HEAD_DIM=d,
        BLOCK=block,
        SUBTRACT_MEAN=mean is not None,
        num_warps=num_warps,
    )


@triton.jit
def fp8_operand_order(p):
    """The columns of p (rows, keys) reordered within each 16: position 4q + 2h + b takes key
    2q + 8h + b (q < 4, h < 2, b < 2).

    Why: Hopper's 8-bit product reads its register operand as 4 consecutive keys per thread, where
    the fp32 scores hold 2 (thread q of a row group has keys 2q, 2q+1, 2q+8, 2q+9 of each 16). In
    this order P's registers are the operand as they are; in key order Triton moves them between
    threads (16 shuffles, selects and byte permutes a thread per 128-key tile). V's fp8 keys are
    stored in the same order (``prepare_v``), so P.V sums the same products."""
    rows: tl.constexpr = p.shape[0]
    cols: tl.constexpr = p.shape[1]
    p = tl.reshape(p, (rows, cols // 16, 2, 4, 2))
    return tl.reshape(tl.permute(p, (0, 1, 3, 2, 4)), (rows, cols))


# Token counts change with every video size: no recompiling for their divisibility by 16.
@triton.jit(do_not_specialize=["n_tokens"])
def _quantize_v_fp8_kernel(
    x_ptr,
    mean_ptr,
    scale_ptr,
    out_ptr,
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
    """One block of V's tokens divided by the per-channel scale, to fp8 e4m3, stored transposed
    (batch*heads, d, padded tokens) with its keys in ``fp8_operand_order`` within each 16; the
    padding columns get zeros (rows past the last token)."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    n_padded = tl.num_programs(0) * BLOCK
    x = load_token_block(
        x_ptr, mean_ptr, block, bh, n_tokens, n_heads, stride_b, stride_n, stride_h, stride_d,
        HEAD_DIM, BLOCK, SUBTRACT_MEAN,
    )  # fmt: skip
    dims = tl.arange(0, HEAD_DIM)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr + bh * HEAD_DIM + dims)
    # Clamped: the division can round a channel's largest value just past the fp8 maximum.
    x = tl.minimum(tl.maximum(tl.div_rn(x, scale[None, :]), -_FP8_MAX), _FP8_MAX)
    dst = out_ptr + bh.to(tl.int64) * HEAD_DIM * n_padded
    v8 = tl.trans(x).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    tl.store(dst + dims[:, None] * n_padded + cols[None, :], fp8_operand_order(v8))


def prepare_v(v: torch.Tensor, block_n: int, pv_fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """v (batch, tokens, heads, d) -> transposed (batch*heads, d, padded tokens) and scales (batch*heads, d).

    fp8: V / scale_v with scale_v = max over tokens |V| / 448 per channel, the keys of each 16 in
    ``fp8_operand_order``; fp16: V itself in key order, scales 1. Padding columns are zeros: the
    kernel multiplies them by P~ = 0, and 0 * NaN would not be 0.
    """
    b, n, h, d = v.shape
    n_padded = triton.cdiv(n, block_n) * block_n
    if pv_fp8:
        low, high = torch.aminmax(v, dim=1)  # one pass, no |V| copy
        scale = (torch.maximum(high, -low).float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        out = torch.empty(b * h, d, n_padded, dtype=torch.float8_e4m3fn, device=v.device)
        launch_per_token_block(_quantize_v_fp8_kernel, v, block_n, None, (scale, out), num_warps=4)
    else:
        scale = torch.ones(b, h, d, dtype=torch.float32, device=v.device)
        out = torch.zeros(b, h, d, n_padded, dtype=torch.float16, device=v.device)
        out[..., :n].copy_(v.permute(0, 2, 3, 1))
    return out.view(b * h, d, n_padded), scale.view(b * h, d)


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """x (batch, tokens, heads, d) -> its mean over tokens, fp32 (batch, heads, d): K smoothing's mean."""
    return x.mean(dim=1, dtype=torch.float32).contiguous()


def quantize_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: KernelConfig,
    pv_fp8: bool,
    k_mean: torch.Tensor | None = None,
) -> QuantizedQKV:
    """Steps 1, 2 and the V half of step 5 of the module docstring (``k_mean``: ``token_mean(k)``,
    if the caller has it)."""
    k_mean = token_mean(k) if k_mean is None else k_mean
    q8, q_scale = quantize_int8_per_block(q, config.block_m)
    k8, k_scale = quantize_int8_per_block(k, config.block_n, mean=k_mean)
    v_t, v_scale = prepare_v(v, config.block_n, pv_fp8)
    return QuantizedQKV(q8, q_scale, k8, k_scale, v_t, v_scale, q.shape[1], k.shape[1])


# --- attention ----------------------------------------------------------------------------------


@triton.jit
def load_query_block(
    q,
    q_scale_ptr,
    bh,
    q_block,
    n_q,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TMA: tl.constexpr,
):
    """The int8 query tile of this program and its scale, softmax scale and log2(e) folded in.
    ``q``: the TMA descriptor of Q (batch*heads*padded queries, d) if TMA, else Q's pointer."""
    n_q_blocks = tl.cdiv(n_q, BLOCK_M)
    if TMA:
        tile = q.load([(bh * n_q_blocks + q_block) * BLOCK_M, 0])
    else:
        rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        q_head = q + bh.to(tl.int64) * n_q_blocks * BLOCK_M * HEAD_DIM
        tile = tl.load(q_head + rows[:, None] * HEAD_DIM + dims[None, :])
    q_scale = tl.load(q_scale_ptr + bh * n_q_blocks + q_block) * qk_scale
    return tile, q_scale


@triton.jit
def attend_key_block(
    acc,
    row_max,
    row_sum,
    q,
    q_scale,
    k_src,
    k_scale_head,
    v_src,
    bh,
    key_block,
    n_k,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PV_FP8: tl.constexpr,
    MASK_TAIL: tl.constexpr,
    TMA: tl.constexpr,
):
    """One key block of the online softmax; returns the updated (acc, row_max, row_sum).

    With TMA, k_src and v_src are the TMA descriptors of K (batch*heads*padded keys, d) and of
    transposed V (batch*heads*d, padded keys); else pointers at this batch and head's K and V.
    k_scale_head points at this batch and head's K scales. MASK_TAIL: the block is the partial last
    one, and its columns past n_k are padding.
    """
    n_k_padded = tl.cdiv(n_k, BLOCK_N) * BLOCK_N
    cols = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    if TMA:
        k = k_src.load([bh * n_k_padded + key_block * BLOCK_N, 0])
    else:
        k = tl.load(k_src + cols[:, None] * HEAD_DIM + dims[None, :])
    scores = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    scale = q_scale * tl.load(k_scale_head + key_block)  # one scale per tile: to log2 units
    # fp8: exp2(x + log2 448) = 448 exp2(x), so P~ comes out of the exp2 already scaled for fp8.
    p_offset = _LOG2_FP8_MAX if PV_FP8 else 0.0
    if MASK_TAIL:
        scores = tl.where(cols[None, :] < n_k, scores * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - (new_max - p_offset)[:, None])
    else:
        # scale > 0: the row max of the scaled scores is the scaled row max, and scaling, shifting
        # and the exp2 argument become one FMA per score.
        new_max = tl.maximum(row_max, tl.max(scores, 1) * scale)
        p = tl.exp2(scores * scale - (new_max - p_offset)[:, None])
    correction = tl.exp2(row_max - new_max)  # 0 on the first block (row_max = -inf)
    row_sum = rescaled_row_sums(row_sum, correction, p)
    if TMA:
        v = v_src.load([bh * HEAD_DIM, key_block * BLOCK_N])
    else:
        v = tl.load(v_src + dims[:, None] * n_k_padded + cols[None, :])  # (d, BLOCK_N), tokens contiguous
    if PV_FP8:
        p8 = p.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        pv = tl.dot(fp8_operand_order(p8), tl.trans(v), out_dtype=tl.float32)
    else:
        pv = tl.dot(p.to(tl.float16), tl.trans(v), out_dtype=tl.float32)
    # A fresh MMA accumulator per tile, summed here in fp32: the two-level accumulation.
    acc = acc * correction[:, None] + pv
    return acc, new_max, row_sum


@triton.jit
def rescaled_row_sums(row_sums, correction, p):
    """row_sums * correction + p's sums over keys, where row_sums (rows, 4) holds each row's sum in
    4 parts, added up once, by ``store_output``.

    Why: Hopper's products leave a row's scores spread over 4 threads (thread q holds keys 8j + 2q
    and 8j + 2q + 1). A whole row sum would add across them with 2 shuffles a row every tile; the
    parts need none. The correction takes the parts' register layout through the same reshape and
    reductions (a max of equal values, exact): broadcast directly, Triton would move it between
    threads."""
    rows: tl.constexpr = p.shape[0]
    cols: tl.constexpr = p.shape[1]
    p = tl.reshape(p, (rows, cols // 8, 4, 2))
    correction = tl.reshape(tl.broadcast_to(correction[:, None], (rows, cols)), (rows, cols // 8, 4, 2))
    return row_sums * tl.max(tl.max(correction, 3), 1) + tl.sum(tl.sum(p, 3), 1)


@triton.jit
def store_output(
    acc,
    row_sum,
    v_scale_ptr,
    out_ptr,
    bh,
    q_block,
    n_q,
    n_heads,
    stride_ob,
    stride_on,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PV_FP8: tl.constexpr,
):
    """Undo the V scaling, normalise by the row sum (the sum of row_sum's 4 parts), store the valid
    rows in out's dtype. (With fp8, acc and row_sum both carry P~'s factor 448: the ratio cancels it.)"""
    dims = tl.arange(0, HEAD_DIM)
    v_scale = tl.load(v_scale_ptr + bh * HEAD_DIM + dims)
    # A row that attended to no key block (an empty sparse list) has acc 0 and row_sum 0: write
    # zeros, as the reference does. Any other row has row_sum >= 1 (its max contributes exp2(0)).
    row_sum = tl.sum(row_sum, 1)
    row_sum = tl.where(row_sum > 0.0, row_sum, 1.0)
    out = acc * v_scale[None, :] / row_sum[:, None]
    batch, head = bh // n_heads, bh % n_heads
    rows = (q_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    dst = out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh
    dst = dst + rows[:, None] * stride_on + dims[None, :] * stride_od
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < n_q)


@triton.jit
def empty_softmax_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(acc, row_max, row_sum) before the first key tile; row_sum in 4 parts a row (``rescaled_row_sums``)."""
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    return acc, tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32), tl.zeros((BLOCK_M, 4), dtype=tl.float32)


@triton.jit(do_not_specialize=["n_q", "n_k"])
def _sage_attention_kernel(
    q,
    q_scale_ptr,
    k,
    k_scale_ptr,
    v,
    v_scale_ptr,
    out_ptr,
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
    PV_FP8: tl.constexpr,
    TMA: tl.constexpr,
):
    """q, k, v: the quantised operands' TMA descriptors if TMA, else their pointers."""
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    n_k_blocks = tl.cdiv(n_k, BLOCK_N)
    q, q_scale = load_query_block(q, q_scale_ptr, bh, q_block, n_q, qk_scale, HEAD_DIM, BLOCK_M, TMA)
    # Inline, here and in the sparse kernel: Triton cannot return a descriptor from a helper.
    if TMA:
        k_src, v_src = k, v
    else:
        k_src = k + bh.to(tl.int64) * n_k_blocks * BLOCK_N * HEAD_DIM
        v_src = v + bh.to(tl.int64) * HEAD_DIM * n_k_blocks * BLOCK_N
    k_scale_head = k_scale_ptr + bh * n_k_blocks

    acc, row_max, row_sum = empty_softmax_state(BLOCK_M, HEAD_DIM)
    n_full = n_k // BLOCK_N
    for key_block in range(0, n_full):
        acc, row_max, row_sum = attend_key_block(
            acc, row_max, row_sum, q, q_scale, k_src, k_scale_head, v_src, bh, key_block, n_k,
            HEAD_DIM, BLOCK_N, PV_FP8, False, TMA,
        )  # fmt: skip
    if n_full < n_k_blocks:  # a partial last block: the only one that needs the column mask
        acc, row_max, row_sum = attend_key_block(
            acc, row_max, row_sum, q, q_scale, k_src, k_scale_head, v_src, bh, n_full, n_k,
            HEAD_DIM, BLOCK_N, PV_FP8, True, TMA,
        )  # fmt: skip
    store_output(
        acc, row_sum, v_scale_ptr, out_ptr, bh, q_block, n_q, n_heads,
        stride_ob, stride_on, stride_oh, stride_od, HEAD_DIM, BLOCK_M, PV_FP8,
    )  # fmt: skip


# --- Python entry points ------------------------------------------------------------------------


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q, k, v fit the kernels (see the module docstring)."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError("q, k, v must be (batch, tokens, heads, head_dim)")
    if q.dtype not in INPUT_DTYPES or not (q.dtype == k.dtype == v.dtype):
        dtypes = f"{q.dtype}, {k.dtype}, {v.dtype}"
        raise ValueError(f"q, k, v must share one dtype of {INPUT_DTYPES}, got {dtypes}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    (b, n_q, h, d), (bk, n_k, hk, dk) = q.shape, k.shape
    if (bk, hk, dk) != (b, h, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be (batch, kv tokens, heads, head_dim) of q {tuple(q.shape)}")
    if d not in CONFIGS:
        raise ValueError(f"head dim {d} not supported (supported: {sorted(CONFIGS)})")
    if n_q == 0 or n_k == 0:
        raise ValueError("q and k need at least one token")


def sage_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pv_fp8: bool = True,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """8-bit attention (module docstring): fp8 P.V when ``pv_fp8``, else fp16. Same shape and dtype as q.

    ``config`` overrides the tile and launch choice of ``CONFIGS`` (for tuning); a ``tma`` config
    asked for on a GPU older than sm_90 is an error.
    """
    check_inputs(q, k, v)
    b, n_q, h, d = q.shape
    config = config or for_device(CONFIGS[d], q.device)
    qkv = quantize_qkv(q, k, v, config, pv_fp8)
    out = torch.empty(b, n_q, h, d, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(n_q, config.block_m), b * h)
    q_in, k_in, v_in = tma_descriptors(qkv, config) if config.tma else (qkv.q, qkv.k, qkv.v)
    _sage_attention_kernel[grid](
        q_in,
        qkv.q_scale,
        k_in,
        qkv.k_scale,
        v_in,
        qkv.v_scale,
        out,
        *out.stride(),
        n_q,
        qkv.n_k,
        h,
        d**-0.5 * LOG2_E,
        HEAD_DIM=d,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        PV_FP8=pv_fp8,
        TMA=config.tma,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        maxnreg=config.max_registers,
    )
    return out


def tma_descriptors(qkv: QuantizedQKV, config: KernelConfig) -> tuple:
    """Host-side TMA descriptors of the quantised operands, as 2-D tensors whose boxes are one tile:
    Q (bh * padded queries, d), K (bh * padded keys, d), transposed V (bh * d, padded keys)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    device = qkv.q.device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        raise ValueError("TMA loads need a GPU of sm_90 or newer")
    d = qkv.q.shape[-1]
    return (
        TensorDescriptor.from_tensor(qkv.q.view(-1, d), [config.block_m, d]),
        TensorDescriptor.from_tensor(qkv.k.view(-1, d), [config.block_n, d]),
        TensorDescriptor.from_tensor(qkv.v.view(-1, qkv.v.shape[-1]), [d, config.block_n]),
    )
