"""Plain-PyTorch reference numerics for the 8-bit (``sage``) and block-sparse (``sparge``) backends.

These are oracles, not kernels: clear, slow, and meant to be the thing a future Triton kernel is
checked against. All public functions take the registry's layout, q, k, v shaped
(batch, tokens, heads, head_dim), and work internally in (batch, heads, tokens, head_dim).

SageAttention numerics (``sage_reference``):
  1. K smoothing: subtract the mean of K over tokens (per batch and head). Every score of one query
     row shifts by the same q . mean(K), so the softmax is unchanged in exact arithmetic, but the
     int8 range is no longer spent on a shared offset.
  2. Symmetric per-block int8: Q per block of ``block_q`` tokens, K per block of ``block_k`` tokens,
     scale = max|x| / 127 over the block, values round(x / scale) in [-127, 127].
  3. S = (Q_int8 . K_int8^T) * scale_q * scale_k, integer dot products held exactly, then the
     1/sqrt(d) softmax scale; softmax statistics in fp32.
  4. P.V: P~ = exp(S - rowmax) lies in [0, 1]; for fp8 it is stored as fp8(P~ * 448) and V as
     fp8(V / scale_v) with a per-channel scale_v = max_tokens|V| / 448 (SageAttention2); the product
     accumulates in fp32 and is divided by the fp32 row sum of the unquantised P~. With
     ``pv_dtype=None`` P~ and V are fp16 instead (SageAttention1).
  Simplification: the kernels use an online softmax, so a tile's P~ is taken against the running
  row max and rescaled later; here every tile uses the final row max. Both quantise values in
  [0, 1] with the same step, so the error is of the same size, not bit-identical.

SpargeAttn selection (``block_mask``), following upstream ``get_block_map_meansim``:
  1. Mean-pool Q per query block and K per key block.
  2. Self-similarity of a block: the mean cosine similarity over all token pairs of the block
     (self-pairs included), i.e. ||mean of the unit-normalised tokens||^2, in [0, 1]. A block is
     "alike" when this exceeds ``sim_threshold``; its mean is then a fair summary of its tokens.
  3. Pooled scores pq . pk^T / sqrt(d), with key blocks that are not alike excluded (-inf), and a
     softmax over key blocks per query block.
  4. Per query block keep the top ``int(topk * n_key_blocks)`` key blocks (at least one), or the
     smallest set, in descending score order, whose probability mass reaches ``cdf``.
  5. Never drop what the mean cannot judge: a query block that is not alike keeps all its key
     blocks, and a key block that is not alike is kept for every query block.
  ``sim_threshold=None`` turns step 5 off (upstream's top-k API does the same with -0.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Integer Q.K dot products (|q|,|k| <= 127) are exact in fp32 while d * 127^2 < 2^24.
_FP32_EXACT_DIM = (1 << 24) // (127 * 127)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _expand_blocks(per_block: torch.Tensor, block: int, length: int) -> torch.Tensor:
    """[..., n_blocks] -> [..., length]: each block's value repeated over its tokens."""
    return per_block.repeat_interleave(block, dim=-1)[..., :length]


def quantize_int8_per_block(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of ``block`` tokens; x is (batch, heads, tokens, dim).

    Returns (int8 values of x's shape, fp32 scales (batch, heads, n_blocks)), with
    x ~= values * scale and |x - values * scale| <= scale / 2.
    """
    b, h, n, d = x.shape
    nb = math.ceil(n / block)
    # Zero padding of the last block cannot raise its max |x|.
    xb = F.pad(x.float(), (0, 0, 0, nb * block - n)).view(b, h, nb, block, d)
    scale = (xb.abs().amax(dim=(-1, -2)) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(xb / scale[..., None, None]).clamp(-127, 127).to(torch.int8)
    return q.view(b, h, nb * block, d)[:, :, :n], scale


def dequantize_int8_per_block(values: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of ``quantize_int8_per_block`` (up to the rounding), in fp32."""
    return values.float() * _expand_blocks(scale, block, values.shape[-2])[..., None]


def _token_mask(mask: torch.Tensor, block_q: int, block_k: int, lq: int, lk: int) -> torch.Tensor:
    """Block mask (B, H, nq, nk) -> token mask (B, H, lq, lk)."""
    rows = mask.repeat_interleave(block_q, dim=-2)[..., :lq, :]
    return rows.repeat_interleave(block_k, dim=-1)[..., :lk]


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Float64 softmax attention, the oracle; ``token_mask`` (B, H, Lq, Lk) True = attend.

    Returns float64 (batch, tokens, heads, head_dim).
    """
    qh, kh, vh = (_heads_first(t).double() for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
    if token_mask is not None:
        s = s.masked_fill(~token_mask, float("-inf"))
    # A row with nothing kept would be NaN; a kept-nothing row contributes zeros instead.
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return _heads_first(p @ vh)


def _sage_core(
    qh: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    block_q: int,
    block_k: int,
    pv_dtype: torch.dtype | None,
    smooth_k: bool,
    token_mask: torch.Tensor | None,
) -> torch.Tensor:
    """SageAttention numerics on fp32 (B, H, L, D) tensors; returns fp32 (B, H, Lq, D)."""
    d = qh.shape[-1]
    if smooth_k:
        kh = kh - kh.mean(dim=-2, keepdim=True)
    qi, qs = quantize_int8_per_block(qh, block_q)
    ki, ks = quantize_int8_per_block(kh, block_k)
    acc = torch.float32 if d <= _FP32_EXACT_DIM else torch.float64
    s = (qi.to(acc) @ ki.to(acc).transpose(-1, -2)).float()  # the int32 result of the int8 MMA
    s = s * _expand_blocks(qs, block_q, qh.shape[-2])[..., :, None]
    s = s * _expand_blocks(ks, block_k, kh.shape[-2])[..., None, :] * d**-0.5
    if token_mask is not None:
        s = s.masked_fill(~token_mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # in [0, 1]
    row_sum = p.sum(dim=-1, keepdim=True)  # fp32, from the unquantised P~
    if pv_dtype is None:
        # SageAttention1: fp16 operands, fp32 accumulation.
        o = p.half().float() @ vh.half().float()
    else:
        fmax = torch.finfo(pv_dtype).max
        v_scale = (vh.abs().amax(dim=-2, keepdim=True) / fmax).clamp_min(torch.finfo(torch.float32).tiny)
        v8 = (vh / v_scale).clamp(-fmax, fmax).to(pv_dtype)
        p8 = (p * fmax).clamp(max=fmax).to(pv_dtype)
        o = (p8.float() @ v8.float()) * (v_scale / fmax)
    return o / row_sum.clamp_min(torch.finfo(torch.float32).tiny)


def sage_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_q: int = 128,
    block_k: int = 64,
    pv_dtype: torch.dtype | None = torch.float8_e4m3fn,
    smooth_k: bool = True,
) -> torch.Tensor:
    """SageAttention numerics (see the module docstring); output in q's dtype and layout."""
    qh, kh, vh = (_heads_first(t).float() for t in (q, k, v))
    out = _sage_core(qh, kh, vh, block_q, block_k, pv_dtype, smooth_k, None)
    return _heads_first(out).to(q.dtype)


def _pool_and_similarity(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) -> block means (B, H, nb, D) and self-similarity (B, H, nb) in [0, 1]."""
    b, h, n, d = x.shape
    nb = math.ceil(n / block)
    pad = nb * block - n
    xb = F.pad(x, (0, 0, 0, pad)).view(b, h, nb, block, d)
    count = torch.full((nb,), float(block), dtype=x.dtype, device=x.device)
    count[-1] = block - pad  # the last block may be short; padding rows are zero and add nothing
    pooled = xb.sum(dim=-2) / count[:, None]
    unit = xb / xb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # Mean over all token pairs of cos(x_i, x_j) = ||sum of unit vectors||^2 / count^2.
    sim = unit.sum(dim=-2).pow(2).sum(dim=-1) / count**2
    return pooled, sim


def block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int = 128,
    block_k: int = 64,
    topk: float | None = None,
    cdf: float | None = None,
    sim_threshold: float | None = 0.6,
    smooth_k: bool = True,
) -> torch.Tensor:
    """SpargeAttn block selection (rule in the module docstring); bool (B, H, n_q_blocks, n_k_blocks).

    Exactly one of ``topk`` (fraction of key blocks kept per query block) and ``cdf`` (probability
    mass of the pooled block attention to reach) must be given. ``sim_threshold`` is upstream's
    ``simthreshd1`` (0.6 is its default for the cdf API). ``smooth_k`` subtracts K's mean first, as
    the fused upstream path does: the pooled scores do not change, but a shared offset would
    otherwise make every key block look alike.
    """
    qh, kh = _heads_first(q).float(), _heads_first(k).float()
    if smooth_k:
        kh = kh - kh.mean(dim=-2, keepdim=True)
    pq, sim_q = _pool_and_similarity(qh, block_q)
    pk, sim_k = _pool_and_similarity(kh, block_k)
    return select_blocks(pq, sim_q, pk, sim_k, topk, cdf, sim_threshold)


def check_selection(topk: float | None, cdf: float | None) -> None:
    """Raise ValueError unless exactly one of topk and cdf is given, in (0, 1]."""
    if (topk is None) == (cdf is None):
        raise ValueError("block_mask needs exactly one of topk and cdf")
    frac = topk if topk is not None else cdf
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"topk/cdf must be in (0, 1], got {frac}")


def topk_count(topk: float, n_key_blocks: int) -> int:
    """Key blocks kept per query block by top-k selection (at least one)."""
    return max(1, int(topk * n_key_blocks))


def select_blocks(
    pq: torch.Tensor,
    sim_q: torch.Tensor,
    pk: torch.Tensor,
    sim_k: torch.Tensor,
    topk: float | None,
    cdf: float | None,
    sim_threshold: float | None,
) -> torch.Tensor:
    """``block_mask``'s selection from the block means (B, H, nb, D) and self-similarities (B, H, nb)."""
    check_selection(topk, cdf)
    if sim_threshold is None:
        q_alike = torch.ones_like(sim_q, dtype=torch.bool)
        k_alike = torch.ones_like(sim_k, dtype=torch.bool)
    else:
        q_alike, k_alike = sim_q > sim_threshold, sim_k > sim_threshold
    nk = pk.shape[-2]
    score = pq @ pk.transpose(-1, -2) * pq.shape[-1] ** -0.5
    score = score.masked_fill(~k_alike[..., None, :], float("-inf"))
    probs = torch.softmax(score, dim=-1).nan_to_num(0.0)  # all keys unlike: all kept below anyway
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if topk is not None:
        n_keep = torch.full(sorted_p.shape[:-1], topk_count(topk, nk), device=pq.device)
    else:
        # Smallest prefix whose mass reaches cdf: blocks before the crossing, plus the crossing one.
        n_keep = ((sorted_p.cumsum(dim=-1) < cdf).sum(dim=-1) + 1).clamp(max=nk)
    keep_sorted = torch.arange(nk, device=pq.device) < n_keep[..., None]
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return mask | ~k_alike[..., None, :] | ~q_alike[..., :, None]


def sparse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_q: int = 128,
    block_k: int = 64,
) -> torch.Tensor:
    """Float attention over the kept blocks only (computed in float64); output in q's dtype."""
    tm = _token_mask(mask, block_q, block_k, q.shape[1], k.shape[1])
    return attention_reference(q, k, v, tm).to(q.dtype)


def sparge_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: float | None = None,
    cdf: float | None = None,
    block_q: int = 128,
    block_k: int = 64,
    sim_threshold: float | None = 0.6,
    pv_dtype: torch.dtype | None = torch.float8_e4m3fn,
) -> torch.Tensor:
    """``block_mask`` selection plus sage numerics on the kept blocks; output in q's dtype.

    The quantisation blocks are the selection blocks, as upstream. Upstream's P.V skip
    (``pvthreshd``) is not modelled: every kept block contributes.
    """
    mask = block_mask(q, k, block_q, block_k, topk=topk, cdf=cdf, sim_threshold=sim_threshold)
    qh, kh, vh = (_heads_first(t).float() for t in (q, k, v))
    tm = _token_mask(mask, block_q, block_k, q.shape[1], k.shape[1])
    out = _sage_core(qh, kh, vh, block_q, block_k, pv_dtype, True, tm)
    return _heads_first(out).to(q.dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, in float64)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def clustered_qkv(
    batch: int,
    heads: int,
    tokens: int,
    dim: int,
    clusters: int,
    seed: int = 0,
    noise: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Video-like q, k, v (batch, tokens, heads, dim): contiguous runs of tokens share a centre.

    The sequence is cut at ``clusters - 1`` random positions (so runs do not line up with blocks).
    Within a run q and k are one shared centre plus independent noise of std ``noise`` (tokens
    attend mostly to their own region, as neighbouring video patches do) and v is its own centre
    plus noise. Centres are standard normal.
    """
    if not 1 <= clusters <= tokens:
        raise ValueError(f"need 1 <= clusters <= tokens, got {clusters} clusters for {tokens} tokens")
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(tokens - 1, generator=g)[: clusters - 1] + 1
    starts = torch.zeros(tokens, dtype=torch.long)
    starts[cuts] = 1
    label = starts.cumsum(0)  # cluster id of each token
    shape = (batch, clusters, heads, dim)
    centre_qk = torch.randn(shape, generator=g)[:, label]
    centre_v = torch.randn(shape, generator=g)[:, label]
    out = []
    for centre in (centre_qk, centre_qk, centre_v):
        out.append((centre + noise * torch.randn(centre.shape, generator=g)).to(dtype))
    return out[0], out[1], out[2]
