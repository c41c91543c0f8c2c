"""Few-step CFG-free sampling: distill profiles, their validation, one DiT forward per step (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from smartdiff.pipeline.config import load_model_config, load_profile
from smartdiff.pipeline.params import ParamError, validate_params
from smartdiff.pipeline.tiny import write_tiny_checkpoint
from smartdiff.pipeline.wan import WanPipeline

TINY = load_model_config("tiny")
DISTILL4 = (
    "name: tiny-distill4\nmodel: tiny\ncheckpoint: tiny\ncfg: false\n"
    "sampling: {solver: distill, steps: 4, shift: 5.0, timesteps: [1000, 750, 500, 250]}\n"
)


@pytest.fixture
def distill4(config_dir):
    (config_dir / "profiles" / "tiny-distill4.yaml").write_text(DISTILL4)
    return load_profile("tiny-distill4")


def test_a_distill_profile_sets_the_defaults(distill4):
    params = validate_params({"prompt": "a red ball", "seed": 1}, TINY, distill4)
    assert (params.solver, params.steps, params.timesteps) == ("distill", 4, (1000, 750, 500, 250))
    assert (params.guidance, params.shift, params.negative_prompt) == (1.0, 5.0, "")
    # Another step count: evenly spaced; an explicit list sets the step count.
    assert validate_params({"prompt": "x", "steps": 8}, TINY, distill4).timesteps == (
        1000, 875, 750, 625, 500, 375, 250, 125,
    )  # fmt: skip
    listed = validate_params({"prompt": "x", "timesteps": [999, 400]}, TINY, distill4)
    assert (listed.steps, listed.timesteps) == (2, (999, 400))
    # What a worker receives validates again to itself.
    assert validate_params(params.to_dict(), TINY, distill4) == params
    # The model's own defaults are untouched without the profile.
    plain = validate_params({"prompt": "x"}, TINY)
    assert (plain.solver, plain.timesteps, plain.guidance) == ("unipc", None, TINY.sampling.guidance)


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        ({"guidance": 5.0}, "guidance", "runs a CFG-distilled model without classifier-free guidance"),
        ({"negative_prompt": "blurry"}, "negative_prompt", "a negative prompt would have no effect"),
        ({"steps": 3, "timesteps": [1000, 500]}, "steps", "is 3, but timesteps lists 2"),
        ({"solver": "unipc", "timesteps": [1000, 500]}, "timesteps", "only applies with solver distill"),
        ({"timesteps": [500, 700]}, "timesteps", "must decrease strictly within 1..1000"),
    ],
)
def test_what_a_distill_profile_cannot_honour_is_refused(distill4, request_, field, message):
    with pytest.raises(ParamError, match=message) as info:
        validate_params({"prompt": "x", **request_}, TINY, distill4)
    assert info.value.field == field


def test_guidance_one_is_allowed_on_a_cfg_free_profile(distill4):
    assert validate_params({"prompt": "x", "guidance": 1}, TINY, distill4).guidance == 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "cfg: false\nsampling: {guidance: 5.0}\n",
            "cfg: false runs without guidance, but sampling.guidance is 5.0",
        ),
        ("cfg: false\nparallel: {cfg: 2}\n", "parallel.cfg 2 splits the guidance branches"),
        (
            "sampling: {solver: distill, steps: 4, timesteps: [1000, 500]}\n",
            "lists 2 timesteps, sampling.steps is 4",
        ),
        ("sampling: {steps: 4, timesteps: [1000, 1000, 500, 250]}\n", "must decrease strictly"),
        ("sampling: {stepz: 4}\n", "sampling.stepz: unknown setting"),
    ],
)
def test_a_bad_sampling_section_fails_the_profile_load(config_dir, extra, message):
    (config_dir / "profiles" / "bad.yaml").write_text(f"name: bad\nmodel: tiny\ncheckpoint: tiny\n{extra}")
    with pytest.raises(ValueError, match=message):
        load_profile("bad")


def count_stack_evaluations(pipe: WanPipeline) -> list[int]:
    """A counter of the DiT's block-stack evaluations (calls of its first block), all experts."""
    calls = [0]
    for dit in pipe.experts:
        dit.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_guidance_one_runs_one_forward_per_step(tiny_checkpoint, distill4):
    pipe = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    calls = count_stack_evaluations(pipe)
    pipe.generate(validate_params({"prompt": "x", "seed": 1, "steps": 4, "guidance": 5.0}, TINY))
    assert calls[0] == 8  # two branches per step
    calls[0] = 0
    pipe.generate(validate_params({"prompt": "x", "seed": 1, "steps": 4, "guidance": 1.0}, TINY))
    assert calls[0] == 4
    calls[0] = 0
    result = pipe.generate(validate_params({"prompt": "x", "seed": 1}, TINY, distill4))
    assert calls[0] == 4 and result.cache["computed"] == 4 and result.guidance_per_step == [1.0] * 4


def test_distill_videos_follow_the_seed(tiny_checkpoint, distill4):
    pipe = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    first = pipe.generate(validate_params({"prompt": "a red ball", "seed": 3}, TINY, distill4)).frames
    again = pipe.generate(validate_params({"prompt": "a red ball", "seed": 3}, TINY, distill4)).frames
    other = pipe.generate(validate_params({"prompt": "a red ball", "seed": 4}, TINY, distill4)).frames
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    ode = validate_params({"prompt": "a red ball", "seed": 3, "solver": "distill-ode"}, TINY, distill4)
    assert not np.array_equal(pipe.generate(ode).frames, first)  # fresh noise vs the predicted one


def test_wan22_distill_switches_experts_by_the_listed_timesteps(tmp_path):
    # Shift 5 puts 1000, 750, 500, 250 at 1000, 937.5, 833.3, 625: two steps per expert at boundary 875,
    # as LightX2V's Wan2.2 4-step configs have it (boundary_step_index 2).
    moe = load_model_config("tiny-moe")
    pipe = WanPipeline.from_checkpoint(
        write_tiny_checkpoint(tmp_path / "moe", model_name="tiny-moe"), device="cpu"
    )
    request = {"prompt": "x", "seed": 0, "solver": "distill-ode", "steps": 4, "shift": 5.0}
    request |= {"guidance": 1.0, "guidance_low_noise": 1.0}
    result = pipe.generate(validate_params(request, moe))
    assert result.expert_per_step == [0, 0, 1, 1]
