"""CPU checks of the attention registry and of the reference numerics for the sage/sparge kernels.

Measured with these seeds and shapes (1 x 1024 tokens x 2 heads x 64, torch 2.13 CPU), relative
error against float64 attention: sage reference (int8 Q.K, fp8 P.V) 3.8e-2 on Gaussian inputs
(fp16 P.V: 1.2e-2; fp16 SDPA: 4.6e-4), 5.1e-3 on clustered inputs (16 clusters); with a K mean
offset of 20 sigma, int8 Q.K with fp16 P.V is 1.3e-2 smoothed against 0.13 unsmoothed; sparse
attention keeping 50% of key blocks 0.99 on Gaussian inputs against 0.019 on clustered ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smartdiff.kernels import available_backends, get_backend
from smartdiff.kernels.reference import (
    attention_reference,
    block_mask,
    clustered_qkv,
    dequantize_int8_per_block,
    quantize_int8_per_block,
    relative_error,
    sage_reference,
    sparge_reference,
    sparse_reference,
)
from smartdiff.kernels.registry import AttentionBackend, BackendUnavailable

B, L, H, D = 1, 1024, 2, 64


def _gaussian(seed: int = 0, tokens: int = L) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, tokens, H, D, generator=g) for _ in range(3))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def gaussian():
    q, k, v = _gaussian()
    return q, k, v, attention_reference(q, k, v)


@pytest.fixture(scope="module")
def clustered():
    q, k, v = clustered_qkv(B, H, L, D, clusters=16, seed=1)
    return q, k, v, attention_reference(q, k, v)


# --- sage numerics -------------------------------------------------------------------------------


def test_sage_reference_on_gaussian_is_8bit_accurate_and_really_quantises(gaussian):
    q, k, v, ref = gaussian
    err = relative_error(sage_reference(q, k, v), ref)
    sdpa16 = F.scaled_dot_product_attention(*(t.half().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    err16 = relative_error(sdpa16, ref)
    # Upstream SageAttention2 measured 3.9e-2 on the same kind of input (PERFORMANCE.md).
    assert 0.01 < err < 0.1
    assert err > 10 * err16


def test_sage_reference_on_clustered_inputs(clustered):
    q, k, v, ref = clustered
    err = relative_error(sage_reference(q, k, v), ref)
    assert err < 0.02
    assert err > 1e-4  # still quantised


def test_fp8_pv_is_less_accurate_than_fp16_pv(gaussian):
    q, k, v, ref = gaussian
    err8 = relative_error(sage_reference(q, k, v, pv_dtype=torch.float8_e4m3fn), ref)
    err16 = relative_error(sage_reference(q, k, v, pv_dtype=None), ref)
    assert err16 < 0.5 * err8
    assert 1e-3 < err16 < 0.03  # int8 Q.K alone still costs something


def test_k_smoothing_is_softmax_invariant_in_float(gaussian):
    q, k, v, ref = gaussian
    k = k.double()  # in float64, so the only change left is the one smoothing could make
    smoothed = attention_reference(q, k - k.mean(dim=1, keepdim=True), v)
    assert relative_error(smoothed, ref) < 1e-12


def test_k_smoothing_lowers_int8_error_with_a_large_k_offset():
    q, k, v = _gaussian(seed=2)
    k = k + 20.0 * torch.randn(1, 1, H, D, generator=torch.Generator().manual_seed(3))  # shared offset
    ref = attention_reference(q, k, v)
    on = relative_error(sage_reference(q, k, v, pv_dtype=None, smooth_k=True), ref)
    off = relative_error(sage_reference(q, k, v, pv_dtype=None, smooth_k=False), ref)
    assert on < 0.03
    assert off > 3 * on


def test_int8_round_trip_within_half_a_step():
    x = torch.randn(2, 3, 200, 16) * torch.linspace(0.1, 10, 200)[:, None]  # per-block ranges differ
    block = 64
    values, scale = quantize_int8_per_block(x, block)
    assert values.dtype == torch.int8 and scale.shape == (2, 3, 4)
    assert values.abs().max() <= 127 and values.abs().max() == 127
    err = (dequantize_int8_per_block(values, scale, block) - x).abs()
    step = scale.repeat_interleave(block, dim=-1)[..., :200, None]
    assert (err <= step / 2 + 1e-6).all()


def test_fp8_e4m3_round_trips_on_cpu():
    x = torch.tensor([0.0, 1.0, -448.0, 448.0, 0.3])
    y = x.to(torch.float8_e4m3fn).float()
    assert torch.equal(y[:4], x[:4])
    assert abs(y[4] - 0.3) <= 0.3 * 2**-3  # 3 mantissa bits


# --- block selection -----------------------------------------------------------------------------


def _pooled_scores(q: torch.Tensor, k: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    pq = qh.unflatten(2, (-1, bq)).mean(dim=3)
    pk = kh.unflatten(2, (-1, bk)).mean(dim=3)
    return torch.softmax(pq @ pk.transpose(-1, -2) * D**-0.5, dim=-1)


def test_block_mask_keeps_exactly_the_topk_fraction(gaussian):
    q, k, _, _ = gaussian
    mask = block_mask(q, k, 128, 64, topk=0.25, sim_threshold=None)
    assert mask.shape == (B, H, 8, 16)
    assert (mask.sum(dim=-1) == 4).all()
    scores = _pooled_scores(q, k, 128, 64)
    kept_min = scores.masked_fill(~mask, float("inf")).amin(dim=-1)
    dropped_max = scores.masked_fill(mask, float("-inf")).amax(dim=-1)
    assert (kept_min > dropped_max).all()


def test_block_mask_respects_cdf_mass(clustered):
    q, k, _, _ = clustered
    for cdf in (0.5, 0.9):
        mask = block_mask(q, k, 128, 64, cdf=cdf, sim_threshold=None)
        scores = _pooled_scores(q, k, 128, 64)
        kept = (scores * mask).sum(dim=-1)
        assert (kept >= cdf - 1e-5).all()
        # Smallest such set: removing the weakest kept block falls below the mass.
        weakest = scores.masked_fill(~mask, float("inf")).amin(dim=-1)
        assert (kept - weakest < cdf).all()
        assert mask.float().mean() < 1.0  # clustered inputs are sparse at these masses


def test_block_mask_never_drops_blocks_whose_tokens_are_unlike():
    q, k, _ = clustered_qkv(B, H, L, D, clusters=8, seed=4, noise=0.1)
    g = torch.Generator().manual_seed(5)
    q[:, 256:384] = torch.randn(B, 128, H, D, generator=g)  # query block 2: unrelated random tokens
    k[:, 640:704] = torch.randn(B, 64, H, D, generator=g)  # key block 10: likewise
    guarded = block_mask(q, k, 128, 64, topk=0.25, sim_threshold=0.6)
    assert guarded[:, :, 2].all()  # an unlike query block keeps every key block
    assert guarded[:, :, :, 10].all()  # an unlike key block is kept for every query block
    # The same selection without the guard does drop blocks there: the guard is what keeps them.
    plain = block_mask(q, k, 128, 64, topk=0.25, sim_threshold=None)
    assert not plain[:, :, 2].all() and not plain[:, :, :, 10].all()
    # Blocks within one cluster are still pruned (those straddling a cluster boundary are unlike too).
    assert guarded.float().mean() < 0.9


def test_sparse_attention_at_half_the_blocks_random_vs_clustered(gaussian, clustered):
    errors = {}
    for name, (q, k, v, ref) in (("random", gaussian), ("clustered", clustered)):
        mask = block_mask(q, k, 128, 64, topk=0.5, sim_threshold=None)
        assert mask.float().mean() == 0.5
        errors[name] = relative_error(sparse_reference(q, k, v, mask, 128, 64), ref)
    # Measured: random about 1.0 (a flat softmax has nothing to drop), clustered about 0.02.
    assert errors["random"] > 0.5
    assert errors["clustered"] < 0.05
    assert errors["clustered"] < 0.1 * errors["random"]


def test_sparse_reference_with_all_blocks_is_full_attention(gaussian):
    q, k, v, ref = gaussian
    full = torch.ones(B, H, 8, 16, dtype=torch.bool)
    assert relative_error(sparse_reference(q, k, v, full, 128, 64), ref) < 1e-6


def test_sparge_reference_combines_selection_and_8bit(clustered):
    q, k, v, ref = clustered
    err = relative_error(sparge_reference(q, k, v, topk=0.5, sim_threshold=None), ref)
    mask = block_mask(q, k, topk=0.5, sim_threshold=None)
    sparse_only = relative_error(sparse_reference(q, k, v, mask), ref)
    assert sparse_only < err < sparse_only + 0.02


def test_block_mask_needs_exactly_one_rule(gaussian):
    q, k, _, _ = gaussian
    with pytest.raises(ValueError):
        block_mask(q, k)
    with pytest.raises(ValueError):
        block_mask(q, k, topk=0.5, cdf=0.9)


def test_clustered_inputs_are_runs_of_alike_tokens():
    q, k, v = clustered_qkv(1, 1, 256, 32, clusters=4, seed=0, noise=0.1)
    cos = F.cosine_similarity(q[0, 1:, 0], q[0, :-1, 0], dim=-1)
    # Neighbours are alike except at the three cluster boundaries.
    assert (cos > 0.9).sum() == 255 - 3


# --- registry ------------------------------------------------------------------------------------


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(BackendUnavailable) as e:
        get_backend("flash-attention-9")
    for name in ("sdpa", "flash_attn", "sage", "sparge", "auto"):
        assert name in str(e.value)
    assert set(available_backends()) >= {"sdpa", "flash_attn", "sage", "sparge", "auto"}


@pytest.mark.parametrize(
    ("name", "install"),
    [
        ("flash_attn", "pip install flash-attn"),
        ("sage", "pip install sageattention"),
        ("sparge", "SpargeAttn"),
    ],
)
def test_gpu_backends_are_unavailable_on_cpu_with_actionable_messages(name, install):
    with pytest.raises(BackendUnavailable) as e:
        get_backend(name, "cpu")
    message = str(e.value)
    assert name in message
    assert "CUDA" in message
    assert install in message


def test_backend_options_are_checked():
    with pytest.raises(ValueError, match="does not take options"):
        get_backend("sdpa", "cpu", topk=0.5)
    with pytest.raises(ValueError, match="not both"):
        get_backend("sparge", "cpu", topk=0.5, cdf=0.9)
    with pytest.raises(ValueError):
        get_backend("auto", "cpu", allow="lossy")


@pytest.mark.parametrize("allow", ["exact", "8bit", "sparse"])
def test_auto_on_cpu_picks_sdpa_and_says_so(allow):
    backend = get_backend("auto", "cpu", allow=allow)
    assert backend.name == "auto"
    assert backend.implementation == "auto -> torch-sdpa-cpu"
    assert backend.error_class == "exact"
    q, k, v = _gaussian(seed=6, tokens=64)
    assert torch.equal(backend(q, k, v), get_backend("sdpa")(q, k, v))


def test_auto_lists_why_each_backend_failed(monkeypatch):
    from smartdiff.kernels import registry

    monkeypatch.setattr(
        registry, "_BACKEND_MODULES", {k: v for k, v in registry._BACKEND_MODULES.items() if k != "sdpa"}
    )
    with pytest.raises(BackendUnavailable) as e:
        get_backend("auto", "cpu")
    for name in ("flash_attn", "sage", "sparge"):
        assert f"{name}: " in str(e.value)


def test_auto_keeps_the_cross_attention_its_choice_names(monkeypatch):
    from smartdiff.kernels import registry

    exact = get_backend("sdpa", "cpu")
    sparse = AttentionBackend("sparge", "sparse-self", "sparse", exact.fn, cross=exact)

    def only_sparse(name, device, **options):
        if name != "sparge":
            raise BackendUnavailable(f"{name}: not here")
        return sparse

    monkeypatch.setattr(registry, "get_backend", only_sparse)
    backend = get_backend("auto", "cpu", allow="sparse")
    assert backend.implementation == "auto -> sparse-self" and backend.error_class == "sparse"
    assert backend.for_cross_attention() is exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdpa_matches_torch(dtype):
    q, k, v = (t.to(dtype) for t in _gaussian(seed=7, tokens=96))
    out = get_backend("sdpa", "cpu")(q, k, v)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(out, expected.transpose(1, 2))
