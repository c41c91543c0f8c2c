"""The world model's 4-step CFG-free student (world/distill.py): the teacher's trajectories, the LoRA
file it exports, and the shipped student served by its profile through the normal loader (CPU)."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from safetensors.torch import save_file

from smartdiff.pipeline.config import LoraConfig, load_model_config, load_profile
from smartdiff.pipeline.dit import WanDiT
from smartdiff.pipeline.params import DEFAULT_NEGATIVE_PROMPT, validate_params
from smartdiff.pipeline.wan import WanPipeline, apply_guidance
from smartdiff.world.distill import (
    DistillRecipe,
    add_lora,
    lora_state,
    student_schedule,
    teacher_states,
    train_student,
)
from smartdiff.world.evaluate import Variant, run_variant
from smartdiff.world.scenes import MOTIONS, prompt_set

TINY = load_model_config("tiny")
RECIPE = DistillRecipe(prompts=3, substeps=1, rank=4, steps=3, batch=2)
CAPTIONS = ["a red circle moving left", "a blue square growing", "a green triangle still"]


@pytest.fixture
def teacher(tiny_checkpoint) -> WanPipeline:
    return WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def test_teacher_states_are_the_guided_euler_steps_from_seeded_noise(teacher):
    states, conds = teacher_states(teacher, CAPTIONS, RECIPE)
    shape = teacher.latent_shape(validate_params({"prompt": "x"}, TINY))
    assert states.shape == (3, len(RECIPE.timesteps) + 1, *shape) and conds.shape[0] == 3
    noise = torch.randn((3, *shape), generator=torch.Generator().manual_seed(RECIPE.seed))
    torch.testing.assert_close(states[:, 0], noise, rtol=0, atol=0)
    # One substep: the first jump is one Euler step on the guided velocity at sigma 1.
    sigmas, _ = student_schedule(RECIPE)
    dit = teacher.experts[0]
    negative = dit.pad_context(teacher.text_encoder.encode([DEFAULT_NEGATIVE_PROMPT])).expand(3, -1, -1)
    t = torch.full((3,), sigmas[0] * 1000.0)
    with torch.no_grad():
        velocity = apply_guidance(dit(noise, t, conds), dit(noise, t, negative), RECIPE.guidance)
    torch.testing.assert_close(states[:, 1], noise + (sigmas[1] - sigmas[0]) * velocity)


def test_the_exported_lora_is_the_trained_student(teacher, tiny_checkpoint, tmp_path):
    states, conds = teacher_states(teacher, CAPTIONS, RECIPE)
    _, timesteps = student_schedule(RECIPE)
    x, t = states[:, 2], torch.full((3,), float(timesteps[2]))
    dit = teacher.experts[0].requires_grad_(False)
    with torch.no_grad():
        before = dit(x, t, conds)
    result = train_student(dit, states, conds, RECIPE, torch.device("cpu"))
    path = tmp_path / "lora.safetensors"
    save_file(lora_state(result["deltas"]), str(path))
    merged = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu", loras=[LoraConfig(str(path))])
    with torch.no_grad():
        student, served = dit(x, t, conds), merged.experts[0](x, t, conds)
    assert (student - before).abs().max() > 1e-4  # training moved it
    torch.testing.assert_close(served, student, rtol=1e-4, atol=1e-5)


def test_the_shipped_student_is_served_by_its_profile():
    profile = load_profile("wan-world-distill4")
    pipeline = WanPipeline.from_profile(profile, "cpu")
    [lora] = pipeline.loras
    assert (lora["file"], lora["strength"]) == ("lora.safetensors", 1.0)
    params = validate_params(
        {"prompt": "a red circle moving right on a white background"}, profile.model_config, profile
    )
    assert (params.solver, params.steps, params.guidance) == ("distill-ode", 4, 1.0)
    teacher = load_profile("wan-world")
    assert teacher.checkpoint_dir == profile.checkpoint_dir  # a LoRA on the shipped weights, nothing else


def test_the_shipped_student_follows_its_prompts():
    """One prompt per motion (seed = prompt index), 4 steps without guidance: the probe reads the
    prompt's colour, shape, background and motion as it does for the 50-step teacher."""
    scenes = prompt_set()[:8]
    assert sorted(scene.motion for scene in scenes) == sorted(MOTIONS)
    student = Variant(load_profile("wan-world-distill4"), "none")
    run = run_variant(student, {"prompts": scenes}, device="cpu")["sets"]["prompts"]
    assert run["adherence"]["colour"] == run["adherence"]["shape"] == run["adherence"]["background"] == 1.0
    assert {motion: rates["motion"] for motion, rates in run["by_kind"].items()} == dict.fromkeys(
        MOTIONS, 1.0
    )


def test_the_profile_serves_the_schedule_the_student_was_trained_on():
    record = json.loads(
        (resources.files("smartdiff.weights") / "wan-world-distill4" / "training.json").read_text()
    )
    profile = load_profile("wan-world-distill4")
    sampling = profile.sampling_for(profile.model_config)
    assert (sampling.solver, sampling.shift, list(sampling.timesteps)) == (
        "distill-ode", record["recipe"]["shift"], record["recipe"]["timesteps"],
    )  # fmt: skip
    assert record["teacher"] == "wan-world" and record["recipe"]["rank"] == 16


def test_the_lora_lives_on_the_dit_s_device():
    """The LoRA factors are drawn from one CPU stream (the same student on every device), then moved
    beside the weights they change: here the meta device stands in for CUDA."""
    on_cpu = add_lora(WanDiT(TINY.dit), rank=4, seed=0)
    on_meta = add_lora(WanDiT(TINY.dit).to("meta"), rank=4, seed=0)
    assert on_cpu.keys() == on_meta.keys() and on_cpu
    for name, delta in on_meta.items():
        assert delta.down.device.type == delta.up.device.type == "meta"
        assert delta.down.shape == on_cpu[name].down.shape
