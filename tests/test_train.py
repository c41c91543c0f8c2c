"""The world model's training recipe, at a toy size on the CPU: it runs, writes a checkpoint the normal
loader reads, and a warm start begins exactly where the checkpoint left off."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from pipeline.checkpoint import load_dit, open_checkpoint
from world.train import Recipe, lr_at, train

TOY = Recipe(clips=16, frames=5, size=32, vae_steps=3, vae_batch=2, decoder_steps=2, dit_steps=3, dit_batch=4)


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    recipe = Recipe(warmup=10)
    assert lr_at(0, recipe, 100, 1.0) == 0.1
    assert lr_at(9, recipe, 100, 1.0) == 1.0
    assert lr_at(10, recipe, 100, 1.0) == 1.0
    assert math.isclose(lr_at(100, recipe, 100, 1.0), 0.1)


def test_recipe_writes_a_loadable_checkpoint_and_warm_starts_from_it(tmp_path) -> None:
    first = tmp_path / "first"
    report = train(TOY, first, torch.device("cpu"), workers=1, stages=("vae", "decoder", "dit"))
    for stage in ("vae", "decoder", "dit"):
        assert all(math.isfinite(x) for x in report[stage]["loss_per_100_steps"])
    assert report["vae"]["steps"] == 3 and report["dit"]["steps"] == 3
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
