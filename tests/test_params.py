"""The one validation function: defaults, and each bad case rejected with its message."""

import subprocess
import sys

import pytest

from smartdiff.pipeline.config import load_model_config
from smartdiff.pipeline.params import DEFAULT_NEGATIVE_PROMPT, MAX_PROMPT_CHARS, ParamError, validate_params

WAN13 = load_model_config("wan2.1-t2v-1.3b")
WAN14 = load_model_config("wan2.1-t2v-14b")
A14B = load_model_config("wan2.2-t2v-a14b")


def test_defaults_are_the_official_ones():
    p = validate_params({"prompt": "a cat", "seed": 7}, WAN13)
    assert (p.width, p.height, p.frames, p.steps, p.guidance, p.shift, p.solver) == (
        832,
        480,
        81,
        50,
        5.0,
        5.0,
        "unipc",
    )
    assert p.negative_prompt == DEFAULT_NEGATIVE_PROMPT and p.seed == 7
    a = validate_params({"prompt": "a cat"}, A14B)
    assert (a.steps, a.shift, a.guidance, a.guidance_low_noise, a.size) == (40, 12.0, 4.0, 3.0, "1280x720")


def test_random_seed_is_chosen_and_recorded():
    seeds = {validate_params({"prompt": "x"}, WAN13).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)


def test_width_height_and_size_are_equivalent():
    a = validate_params({"prompt": "x", "size": "480x832", "seed": 1}, WAN13)
    b = validate_params({"prompt": "x", "width": 480, "height": 832, "seed": 1}, WAN13)
    assert a == b


@pytest.mark.parametrize(
    ("model", "raw", "field", "text"),
    [
        (WAN13, {}, "prompt", "is required"),
        (WAN13, {"prompt": "   "}, "prompt", "must not be empty"),
        (WAN13, {"prompt": 5}, "prompt", "must be a string"),
        (WAN13, {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt", "the limit is"),
        (WAN13, {"prompt": "x", "negative_prompt": "y" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt", "limit"),
        (WAN13, {"prompt": "a\x00b"}, "prompt", "NUL"),
        (WAN13, {"prompt": "x", "size": "1280x720"}, "size", "not supported by Wan2.1-T2V-1.3B"),
        (WAN14, {"prompt": "x", "size": "1000x1000"}, "size", "not supported"),
        (WAN13, {"prompt": "x", "size": "big"}, "size", "must look like"),
        (WAN13, {"prompt": "x", "size": 832}, "size", "must be a string"),
        (WAN13, {"prompt": "x", "size": "832x480", "width": 832}, "size", "either size or width"),
        (WAN13, {"prompt": "x", "frames": 80}, "frames", "4n+1"),
        (WAN13, {"prompt": "x", "frames": 0}, "frames", "4n+1"),
        (WAN13, {"prompt": "x", "frames": 401}, "frames", "between"),
        (WAN13, {"prompt": "x", "frames": 8.5}, "frames", "integer"),
        (WAN13, {"prompt": "x", "steps": 0}, "steps", "between"),
        (WAN13, {"prompt": "x", "steps": 1000}, "steps", "between"),
        (WAN13, {"prompt": "x", "steps": "50"}, "steps", "must be a number"),
        (WAN13, {"prompt": "x", "steps": True}, "steps", "must be a number"),
        (WAN13, {"prompt": "x", "guidance": -1}, "guidance", "between"),
        (WAN13, {"prompt": "x", "guidance": float("nan")}, "guidance", "finite"),
        (WAN13, {"prompt": "x", "shift": 0}, "shift", "greater than 0"),
        (WAN13, {"prompt": "x", "shift": 100}, "shift", "at most"),
        (WAN13, {"prompt": "x", "seed": -1}, "seed", "between"),
        (WAN13, {"prompt": "x", "seed": 2**64}, "seed", "between"),
        (
            WAN13,
            {"prompt": "x", "solver": "ddim"},
            "solver",
            "unknown solver 'ddim' (known: unipc, dpm++, euler, distill, distill-ode)",
        ),
        (WAN13, {"prompt": "x", "guidance_low_noise": 3.0}, "guidance_low_noise", "two-expert"),
        (A14B, {"prompt": "x", "guidance_low_noise": 99}, "guidance_low_noise", "between"),
        (WAN13, {"prompt": "x", "colour": "red"}, "colour", "unknown parameter"),
    ],
)
def test_each_bad_case_is_rejected_with_its_message(model, raw, field, text):
    with pytest.raises(ParamError) as info:
        validate_params(raw, model)
    assert info.value.field == field
    assert text in str(info.value)


def test_not_a_dict():
    with pytest.raises(ParamError, match="JSON object"):
        validate_params(["prompt"], WAN13)


def test_validation_imports_no_torch():
    code = (
        "import sys; import smartdiff.pipeline.params, smartdiff.pipeline.config; "
        "from smartdiff.pipeline.params import validate_params; "
        "from smartdiff.pipeline.config import load_model_config; "
        "validate_params({'prompt': 'x'}, load_model_config('tiny')); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_every_request_field_is_a_command_line_option_that_reaches_the_request():
    """The options come from the one request schema: each one set on the command line arrives."""
    import argparse

    from smartdiff.pipeline.params import REQUEST_FIELDS, add_request_arguments, request_from_args

    parser = argparse.ArgumentParser()
    add_request_arguments(parser)
    args = parser.parse_args(
        [
            "--prompt",
            "a cat",
            "--flexcache",
            "pab",
            "--pab-self-interval",
            "3",
            "--guidance",
            "4.5",
            "--seed",
            "9",
        ]
    )
    request = request_from_args(args)
    assert request == {
        "prompt": "a cat",
        "flexcache": "pab",
        "pab_self_interval": 3,
        "guidance": 4.5,
        "seed": 9,
    }
    params = validate_params(request, WAN13)
    assert (params.flexcache, params.pab_self_interval, params.guidance) == ("pab", 3, 4.5)
    options = {action.dest for action in parser._actions} - {"help"}
    assert options == set(REQUEST_FIELDS)


def test_a_request_object_and_its_json_form_validate_alike():
    from smartdiff.pipeline.params import GenerationRequest

    raw = {"prompt": "a cat", "size": "480x832", "frames": 17, "seed": 3, "solver": "euler"}
    assert validate_params(GenerationRequest(**raw), WAN13) == validate_params(raw, WAN13)


@pytest.mark.parametrize(
    "extra", [{}, {"flexcache": "pab"}, {"flexcache": "teacache", "teacache_threshold": 0.1}]
)
@pytest.mark.parametrize("model", [WAN13, A14B])
def test_validated_parameters_validate_again_to_themselves(model, extra):
    """What a worker receives is what the producer validated, every field present, null included."""
    params = validate_params({"prompt": "a cat", "seed": 5, **extra}, model)
    assert validate_params(params.to_dict(), model) == params
