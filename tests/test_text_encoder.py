"""The UMT5 text encoder: official/Diffusers names, loading, tokenizer and encoding (CPU, small)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import read_reference
from safetensors.torch import save_file

from smartdiff.pipeline.config import T5Config, load_model_config
from smartdiff.pipeline.loading import CheckpointError, assign_weights
from smartdiff.pipeline.text_encoder import (
    TINY_VOCABULARY,
    TextEncoder,
    build_text_encoder,
    clean_prompt,
    hf_t5_key_to_official,
    load_diffusers_t5_state,
    load_official_t5_state,
    load_tokenizer,
    official_t5_key_to_hf,
    write_tiny_tokenizer,
)

TINY = load_model_config("tiny")
TINY_T5: T5Config = TINY.t5
TEXT_LEN = TINY.dit.text_len


def random_official_state(config: T5Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official Wan names, scaled so every tensor visibly matters."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {hf_t5_key_to_official(k): v.shape for k, v in build_text_encoder(config).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = 1 + 0.2 * torch.randn(shape, generator=gen)
        elif key.endswith("pos_embedding.embedding.weight"):
            state[key] = torch.randn(shape, generator=gen)
        elif key == "token_embedding.weight":
            state[key] = torch.randn(shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
    return state


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {official_t5_key_to_hf(k): v for k, v in state.items()}


def loaded_model(state_hf: dict[str, torch.Tensor], config: T5Config = TINY_T5, dtype=torch.float32):
    return assign_weights(build_text_encoder(config), state_hf, "test", dtype, "cpu")


def load_pth(path: Path) -> torch.nn.Module:
    return assign_weights(
        build_text_encoder(TINY_T5), load_official_t5_state(path), path, torch.float32, "cpu"
    )


def sample_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of TEXT_LEN ids, the second padded after 23 tokens (distances up to 63)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_T5.vocab_size, (2, TEXT_LEN), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 23:], mask[1, 23:] = 0, 0
    return ids, mask


def run(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


# --- an independent transcription of Wan's official T5 encoder (wan/modules/t5.py) -------------


def official_bucket(rel_pos: torch.Tensor, num_buckets: int, max_dist: int) -> torch.Tensor:
    num_buckets //= 2  # bidirectional
    buckets = (rel_pos > 0).long() * num_buckets
    rel_pos = rel_pos.abs()
    max_exact = num_buckets // 2
    large = (
        max_exact
        + (
            torch.log(rel_pos.float() / max_exact)
            / math.log(max_dist / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


def official_rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + 1e-6))


def official_forward(state: dict[str, torch.Tensor], c: T5Config, ids: torch.Tensor, mask: torch.Tensor):
    b, s = ids.shape
    n, d = c.num_heads, c.d_kv
    x = F.embedding(ids, state["token_embedding.weight"])
    rel = torch.arange(s)[None, :] - torch.arange(s)[:, None]
    buckets = official_bucket(rel, c.relative_attention_num_buckets, c.relative_attention_max_distance)
    for i in range(c.num_layers):
        w = {k[len(f"blocks.{i}.") :]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        bias = F.embedding(buckets, w["pos_embedding.embedding.weight"]).permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask.view(b, 1, 1, s) == 0, torch.finfo(x.dtype).min)
        h = official_rms(x, w["norm1.weight"])
        q, k, v = (F.linear(h, w[f"attn.{p}.weight"]).view(b, s, n, d) for p in "qkv")
        attn = (torch.einsum("binc,bjnc->bnij", q, k) + bias).softmax(dim=-1)  # no 1/sqrt(d)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, s, n * d), w["attn.o.weight"])
        h = official_rms(x, w["norm2.weight"])
        gate = F.gelu(F.linear(h, w["ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, w["ffn.fc1.weight"]) * gate, w["ffn.fc2.weight"])
    return official_rms(x, state["norm.weight"])


# --- names -------------------------------------------------------------------------------------


def test_full_size_names_and_shapes_match_the_official_checkpoint():
    expected = {name: list(shape) for name, shape in read_reference("t5-umt5-xxl-enc").items()}
    assert len(expected) == 242

    model = build_text_encoder(T5Config())
    assert all(p.is_meta for p in model.parameters())
    ours = {hf_t5_key_to_official(k): list(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    assert all(official_t5_key_to_hf(hf_t5_key_to_official(k)) == k for k in model.state_dict())


def test_state_dict_lists_the_tied_embedding_once():
    model = build_text_encoder(TINY_T5)
    keys = list(model.state_dict())
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    assert model.shared.weight is model.encoder.embed_tokens.weight


def test_unknown_official_key_is_rejected():
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
        official_t5_key_to_hf("blocks.0.attn.qkv.weight")


# --- official checkpoint -----------------------------------------------------------------------


def test_hf_umt5_matches_a_transcription_of_the_official_encoder():
    official = random_official_state(TINY_T5)
    ids, mask = sample_batch()
    ours = run(loaded_model(to_hf(official)), ids, mask)
    ref = official_forward(official, TINY_T5, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_official_pth_round_trip(tmp_path):
    original = loaded_model(to_hf(random_official_state(TINY_T5)))
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({hf_t5_key_to_official(k): v.clone() for k, v in original.state_dict().items()}, path)

    model = load_pth(path)
    ids, mask = sample_batch()
    assert torch.equal(run(model, ids, mask), run(original, ids, mask))


def test_tied_embedding_is_materialised_once(tmp_path):
    path = tmp_path / "t5.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in random_official_state(TINY_T5).items()}, path)
    # The bf16 -> fp32 cast makes a new tensor: both names must still share that one tensor.
    model = load_pth(path)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert model.shared.weight.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in model.state_dict().values())


def test_unexpected_official_key_names_file_and_key(tmp_path):
    state = random_official_state(TINY_T5)
    state["blocks.0.attn.extra.weight"] = torch.zeros(2)
    path = tmp_path / "t5.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_official_t5_state(path)
    assert str(path) in str(err.value) and "blocks.0.attn.extra.weight" in str(err.value)


def test_extra_layer_is_an_unexpected_key(tmp_path):
    state = random_official_state(TINY_T5)
    state["blocks.7.norm1.weight"] = torch.ones(TINY_T5.d_model)
    path = tmp_path / "t5.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*encoder\.block\.7\.layer\.0\.layer_norm"):
        load_pth(path)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    state = random_official_state(TINY_T5)
    state["blocks.1.ffn.fc1.weight"] = torch.zeros(48, TINY_T5.d_model)
    path = tmp_path / "t5.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_pth(path)
    message = str(err.value)
    assert str(path) in message
    assert "encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in message
    assert "[48, 32]" in message and "[64, 32]" in message


# --- Diffusers text_encoder/ -------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_diffusers_folder_round_trip(tmp_path, shard_size):
    original = loaded_model(to_hf(random_official_state(TINY_T5)))
    folder = tmp_path / "text_encoder"
    # What transformers itself writes: config.json + model.safetensors (or shards + index).
    original.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    assert (folder / "model.safetensors.index.json").is_file() == (shard_size is not None)

    model = assign_weights(
        build_text_encoder(TINY_T5), load_diffusers_t5_state(folder), folder, torch.float32, "cpu"
    )
    ids, mask = sample_batch()
    assert torch.equal(run(model, ids, mask), run(original, ids, mask))


def test_diffusers_embedding_under_either_name(tmp_path):
    state = {k: v.clone() for k, v in to_hf(random_official_state(TINY_T5)).items()}
    folder = tmp_path / "text_encoder"
    build_text_encoder(TINY_T5).config.save_pretrained(folder)
    for names in (["encoder.embed_tokens.weight"], ["shared.weight", "encoder.embed_tokens.weight"]):
        embedding = state["shared.weight"]
        save_file(
            {
                **{k: v for k, v in state.items() if k != "shared.weight"},
                **{n: embedding.clone() for n in names},
            },
            folder / "model.safetensors",
        )
        loaded = load_diffusers_t5_state(folder)
        assert set(loaded) == set(state)
        assert torch.equal(loaded["shared.weight"], embedding)


def test_diffusers_folder_without_weights(tmp_path):
    build_text_encoder(TINY_T5).config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_diffusers_t5_state(tmp_path)


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder, TINY_VOCABULARY)
    return folder


def test_tiny_vocabulary_fits_the_tiny_model():
    assert len(set(TINY_VOCABULARY)) == len(TINY_VOCABULARY) >= 200
    assert len(TINY_VOCABULARY) + 3 <= TINY_T5.vocab_size
    assert {"a", "the", "on", "moving", "left", "red", "ball", "cat"} <= set(TINY_VOCABULARY)


def test_tiny_tokenizer(tiny_tokenizer_dir):
    assert {p.name for p in tiny_tokenizer_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) <= TINY_T5.vocab_size

    batch = tok(["A red Ball, moving left."], padding="max_length", max_length=TEXT_LEN, truncation=True)
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    n = sum(mask)
    assert n == 8  # a red ball , moving left . </s>
    assert all(i > 2 for i in ids[: n - 1]) and ids[n - 1] == 1
    assert ids[n:] == [0] * (TEXT_LEN - n) and len(ids) == TEXT_LEN
    assert tok("a zyzzyva")["input_ids"] == [tok.convert_tokens_to_ids("a"), 2, 1]


def test_load_tokenizer_refuses_missing_folders_and_hub_ids(tmp_path, monkeypatch):
    missing = tmp_path / "google" / "umt5-xxl"
    with pytest.raises(CheckpointError, match=str(missing)):
        load_tokenizer(missing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="hub is not supported"):
        load_tokenizer("google/umt5-xxl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path / "empty")


# --- TextEncoder -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return loaded_model(to_hf(random_official_state(TINY_T5)))


def test_clean_prompt():
    assert clean_prompt("  a  red\n\tball &amp;amp; a cat  ") == "a red ball & a cat"


def test_encode_lengths_and_independence_of_padding_and_batch(tiny_model, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    encoder = TextEncoder(tiny_model, tok, TEXT_LEN)
    assert encoder.device == torch.device("cpu")

    long = "a much longer prompt : the small cat runs to the left on the green grass at sunset"
    short, with_long = encoder.encode(["a red ball", long])
    assert short.shape == (4, TINY_T5.d_model) and short.dtype == torch.float32
    assert with_long.shape[0] == len(tok(long)["input_ids"]) == 19

    alone = encoder.encode(["a red ball"])[0]
    other_len = TextEncoder(tiny_model, tok, 16).encode(["  a red\n ball "])[0]
    torch.testing.assert_close(short, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other_len, alone, rtol=1e-5, atol=1e-6)

    # Prompts are cleaned the Wan way before tokenising (html entities, whitespace).
    messy, clean = encoder.encode(["a cat &amp;amp;  a\n dog", "a cat & a dog"])
    assert torch.equal(messy, clean) and messy.shape[0] == 6

    truncated = TextEncoder(tiny_model, tok, 8).encode([long])[0]
    assert truncated.shape[0] == 8


def test_encode_returns_the_model_dtype(tiny_tokenizer_dir):
    model = loaded_model(to_hf(random_official_state(TINY_T5)), dtype=torch.bfloat16)
    out = TextEncoder(model, load_tokenizer(tiny_tokenizer_dir), TEXT_LEN).encode(["a blue cube"])
    assert out[0].dtype == torch.bfloat16 and out[0].shape == (4, TINY_T5.d_model)
