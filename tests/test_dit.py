"""The DiT: exact official tensor names and shapes, and the same numbers as diffusers' Wan DiT."""

import pytest
import torch
from conftest import read_reference
from diffusers import WanTransformer3DModel

from smartdiff.kernels import get_backend
from smartdiff.pipeline import fused
from smartdiff.pipeline.config import DiTConfig, load_model_config
from smartdiff.pipeline.dit import (
    Attention,
    WanDiT,
    diffusers_dit_key_to_official,
    rope_split,
    rope_tables,
    timestep_embedding,
)
from smartdiff.pipeline.loading import CheckpointError, assign_weights


@pytest.mark.parametrize(
    ("model", "reference"),
    [
        ("wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b-dit"),
        ("wan2.1-t2v-14b", "wan2.1-t2v-14b-dit"),
        ("wan2.2-t2v-a14b", "wan2.1-t2v-14b-dit"),
    ],
)
def test_meta_dit_matches_the_official_tensors(model, reference):
    with torch.device("meta"):
        dit = WanDiT(load_model_config(model).dit)
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    assert ours == read_reference(reference)


def test_rope_split_and_timestep_sinusoid():
    assert rope_split(128) == (44, 42, 42)
    t = torch.tensor([0.0, 999.0])
    emb = timestep_embedding(256, t)
    # Cosine half first: at t = 0 the first half is 1, the second 0.
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert torch.allclose(
        emb[1, 1], torch.cos(torch.tensor(999.0 * 10000 ** (-1 / 128), dtype=torch.float64)).float()
    )


def tiny_pair(seed=0, layers=2, cross_attn_norm=True):
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=128,
        num_layers=layers,
        cross_attn_norm=cross_attn_norm,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():  # diffusers zero-inits some tensors; make every weight matter
            p.copy_(torch.randn_like(p) * 0.1)
    config = DiTConfig(
        dim=64,
        ffn_dim=128,
        num_layers=layers,
        num_heads=2,
        text_dim=32,
        text_len=16,
        cross_attn_norm=cross_attn_norm,
    )
    with torch.device("meta"):
        ours = WanDiT(config)
    state = {diffusers_dit_key_to_official(k): v.clone() for k, v in ref.state_dict().items()}
    assign_weights(ours, state, "diffusers-state", torch.float32, "cpu")
    return ref, ours


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_forward_matches_diffusers(cross_attn_norm):
    """Every released Wan has the cross-attention's norm; a variant may drop it (config.json says so)."""
    ref, ours = tiny_pair(cross_attn_norm=cross_attn_norm)
    assert (ours.blocks[0].norm3 is None) is not cross_attn_norm
    x = torch.randn(2, 16, 3, 8, 12)
    t = torch.tensor([999, 417])
    context = torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = ref(x, t, context, return_dict=False)[0]
        got = ours(x, t, context)
    assert got.shape == x.shape
    # The official sinusoid is float64, diffusers' float32: differences of a few 1e-5 at t ~ 1000.
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_the_blocks_get_contiguous_tokens():
    """The patch embedding's tokens enter the blocks contiguous: its transposed view would carry
    its layout through every residual sum, and each fp8 input norm would copy it first."""
    _, ours = tiny_pair()
    inputs = ours.prepare(torch.randn(2, 16, 3, 8, 12), torch.tensor([999, 417]), torch.randn(2, 16, 32))
    assert inputs.x.shape == (2, 3 * 4 * 6, 64) and inputs.x.is_contiguous()
    with torch.no_grad():
        assert ours.run_blocks(inputs).is_contiguous()


def test_without_qk_norm_q_and_k_are_only_projected_and_rotated():
    """The official model's ``qk_norm=False`` (diffusers always normalises, so it is no reference here)."""
    torch.manual_seed(0)
    attention = Attention(64, 2, 1e-6, qk_norm=False)
    assert set(attention.state_dict()) == {f"{n}.{p}" for n in "qkvo" for p in ("weight", "bias")}
    x = torch.randn(1, 2 * 3 * 4, 64)
    cos, sin = rope_tables(32, (2, 3, 4), torch.device("cpu"))
    backend = get_backend("sdpa")
    with torch.no_grad():
        q = fused.rope(attention.q(x).unflatten(2, (2, -1)), cos, sin)
        k = fused.rope(attention.k(x).unflatten(2, (2, -1)), cos, sin)
        expected = attention.o(backend(q, k, attention.v(x).unflatten(2, (2, -1))).flatten(2))
        assert torch.allclose(attention(x, x, backend, rope=(cos, sin)), expected, atol=1e-6)
        assert torch.allclose(attention(x, x, backend, rope=(cos, sin), chunks=3), expected, atol=1e-6)


def test_padded_context_matches_official_padding():
    _, ours = tiny_pair()
    a, b = torch.randn(5, 32), torch.randn(9, 32)
    padded = ours.pad_context([a, b])
    assert padded.shape == (2, 16, 32)
    assert torch.equal(padded[0, :5], a) and torch.equal(padded[0, 5:], torch.zeros(11, 32))


def test_modulation_parameters_stay_fp32_in_bf16():
    from smartdiff.pipeline.dit import FP32_PARAMETERS

    ref, _ = tiny_pair()
    config = DiTConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16)
    with torch.device("meta"):
        dit = WanDiT(config)
    state = {diffusers_dit_key_to_official(k): v for k, v in ref.state_dict().items()}
    assign_weights(dit, state, "x", torch.bfloat16, "cpu", keep_fp32=FP32_PARAMETERS)
    dtypes = {k: v.dtype for k, v in dit.state_dict().items()}
    assert dtypes["blocks.0.modulation"] == dtypes["head.modulation"] == torch.float32
    assert dtypes["time_embedding.0.weight"] == dtypes["time_projection.1.weight"] == torch.float32
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    out = dit(torch.randn(1, 16, 1, 4, 4), torch.tensor([500]), torch.randn(1, 16, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_wrong_shape_and_unknown_key_are_named():
    ref, _ = tiny_pair()
    config = DiTConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16)
    state = {diffusers_dit_key_to_official(k): v for k, v in ref.state_dict().items()}
    state["blocks.1.ffn.0.weight"] = torch.zeros(96, 64)
    with torch.device("meta"):
        dit = WanDiT(config)
    with pytest.raises(
        CheckpointError,
        match=r"f\.safetensors: key 'blocks.1.ffn.0.weight' has shape \[96, 64\] "
        r"in the file, the model expects \[128, 64\]",
    ):
        assign_weights(dit, dict(state), "f.safetensors", torch.float32, "cpu")
    state["blocks.1.ffn.0.weight"] = torch.zeros(128, 64)
    state["blocks.9.extra"] = torch.zeros(1)
    del state["head.modulation"]
    with pytest.raises(
        CheckpointError, match=r"missing keys \['head.modulation'\].*unexpected keys \['blocks.9.extra'\]"
    ):
        assign_weights(dit, state, "f.safetensors", torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="unknown key 'blocks.0.attn9.x'"):
        diffusers_dit_key_to_official("blocks.0.attn9.x")


def test_cross_attention_runs_on_the_backend_the_self_attention_backend_names():
    from smartdiff.kernels import get_backend
    from smartdiff.kernels.registry import AttentionBackend

    exact = get_backend("sdpa", "cpu")
    key_tokens = {"self": [], "cross": []}

    def recording(kind):
        def attend(q, k, v):
            key_tokens[kind].append(k.shape[1])
            return exact(q, k, v)

        return attend

    cross = AttentionBackend("cross", "recording", "exact", recording("cross"))
    _, dit = tiny_pair()
    dit.set_attention(AttentionBackend("main", "recording", "sparse", recording("self"), cross=cross))
    with torch.no_grad():
        dit(torch.randn(1, 16, 3, 8, 12), torch.tensor([999]), torch.randn(1, 16, 32))
    assert key_tokens == {"self": [3 * 4 * 6] * 2, "cross": [16] * 2}  # 2 blocks: video, then text tokens
    assert dit.cross_attention is cross
