"""The world model's training recipe, at a toy size on the CPU: it runs, writes a checkpoint the normal
loader reads, and a warm start begins exactly where the checkpoint left off."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from smartdiff.pipeline.checkpoint import load_dit, open_checkpoint
from smartdiff.pipeline.config import load_model_config
from smartdiff.pipeline.dit import WanDiT
from smartdiff.world.train import MODEL, Recipe, edge_error, lr_at, new_text_encoder, text_context, train

TOY = Recipe(
    clips=16,
    frames=5,
    size=32,
    vae_steps=3,
    vae_batch=2,
    vae_frames=5,
    decoder_steps=2,
    dit_steps=3,
    dit_batch=4,
    check_clips=4,
)


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    recipe = Recipe(warmup=10)
    assert lr_at(0, 0.0, recipe, 1.0) == 0.1
    assert lr_at(9, 0.5, recipe, 1.0) == 1.0  # warm-up goes by steps
    assert lr_at(10, 0.0, recipe, 1.0) == 1.0
    assert math.isclose(lr_at(50, 0.5, recipe, 1.0), 0.55)
    assert math.isclose(lr_at(100, 1.0, recipe, 1.0), 0.1)
    assert lr_at(100, 1.7, recipe, 1.0) == lr_at(100, 1.0, recipe, 1.0)  # past the end: stays low


def test_recipe_writes_a_loadable_checkpoint_and_warm_starts_from_it(tmp_path) -> None:
    first = tmp_path / "first"
    report = train(TOY, first, torch.device("cpu"), workers=1, stages=("vae", "decoder", "dit"))
    for stage in ("vae", "decoder", "dit"):
        assert all(math.isfinite(x) for x in report[stage]["loss_per_100_steps"])
    assert report["vae"]["steps"] == 3 and report["dit"]["steps"] == 3
    assert len(report["vae"]["held_out_psnr_db_per_frame"]) == TOY.frames
    for name in ("held_out", "prompt_set", "detail_prompt_set"):
        assert set(report["vae"][f"{name}_probe_agreement"]) == {"colour", "shape", "motion", "background"}
    assert (first / "training-vae-decoder-dit.json").is_file()

    checkpoint = open_checkpoint(first, "wan-world")
    cpu = torch.device("cpu")
    dit = load_dit(checkpoint.root, checkpoint.layout, checkpoint.model.dit, torch.float32, cpu)
    assert sum(p.numel() for p in dit.parameters()) == report["dit_parameters"]

    # No optimisation steps from an init: the written DiT and text encoder are the init's, bit for bit.
    second = tmp_path / "second"
    zero = Recipe(**{**TOY.__dict__, "dit_steps": 0})
    train(zero, second, torch.device("cpu"), workers=1, stages=("dit",), init=first)
    a = load_file(first / "diffusion_pytorch_model.safetensors")
    b = load_file(second / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_edge_error_sees_a_rounded_corner_and_ignores_a_flat_offset() -> None:
    square = torch.zeros(1, 3, 1, 16, 16)
    square[..., 4:12, 4:12] = 1.0
    rounded = square.clone()
    for y, x in ((4, 4), (4, 11), (11, 4), (11, 11)):
        rounded[..., y, x] = 0.0
    assert edge_error(square + 0.3, square) < 1e-6  # a colour shift moves no edge
    # Four corner pixels: the edge error sees each of them twice along each axis.
    assert edge_error(rounded, square) > 1.9 * (rounded - square).abs().mean()


def test_recipe_rejects_more_vae_frames_than_a_clip_has() -> None:
    with pytest.raises(ValueError, match="vae_frames"):
        Recipe(frames=9, vae_frames=17)


def test_training_context_is_what_the_pipeline_feeds_the_dit(tmp_path) -> None:
    model = load_model_config(MODEL)
    encoder = new_text_encoder(model, tmp_path / "tokenizer", seed=3, device=torch.device("cpu"))
    dit = WanDiT(model.dit)
    texts = ["a red circle moving left on a white background", "a blue square", ""]
    with torch.no_grad():
        batched = text_context(encoder, *encoder.tokenize(texts))
        per_prompt = dit.pad_context(encoder.hidden_states(texts))
    lengths = encoder.tokenize(texts)[1].sum(1)
    assert lengths.unique().numel() == 3  # prompts of different lengths: the zero padding is exercised
    torch.testing.assert_close(batched, per_prompt, rtol=0, atol=0)
