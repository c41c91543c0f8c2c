"""The generation request: one schema, and the one function that validates it against a model.

``GenerationRequest`` is what a caller writes (the prompt and optional parameters). It is the single
declaration of the request: the Python client, the worker (never trusting the queue), the HTTP
gateway's body and its OpenAPI description, and the command line's options all come from it.
``validate_params`` checks a request against a model's rules (sizes, frame and step limits, which
caches it has) and returns ``GenerationParams``, every default filled in. Every rejection names the
field and says what is allowed. Torch-free: producers import it.
"""

from __future__ import annotations

import argparse
import math
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from smartdiff.pipeline.config import ModelConfig, ProfileConfig, SamplingConfig, check_timesteps

SOLVERS = ("unipc", "dpm++", "euler", "distill", "distill-ode")
DISTILL_SOLVERS = ("distill", "distill-ode")  # few-step samplers of step-distilled models
FLEXCACHE = ("none", "teacache", "pab")
# PAB's published schedule for full 3D attention: broadcast while 100 < t < 850; self-attention
# recomputed every 2nd step, cross-attention every 6th.
PAB_DEFAULTS = {
    "pab_self_start": 100,
    "pab_self_end": 850,
    "pab_self_interval": 2,
    "pab_cross_start": 100,
    "pab_cross_end": 850,
    "pab_cross_interval": 6,
}
MAX_PAB_INTERVAL = 20
# The CFG cache's window when a request gives only its interval: FasterCache's for the
# unconditional branch, below t = 641 (its default in diffusers).
CFG_CACHE_DEFAULTS = {"cfg_cache_start": 0, "cfg_cache_end": 641}
MAX_CFG_CACHE_INTERVAL = 10
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 30.0
MAX_SHIFT = 30.0

# The official Wan negative prompt: the models were trained with it as the unconditional text.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ParamError(ValueError):
    """A request parameter that cannot be honoured; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --- the fields' own rules, with the messages a person can act on ------------------------------


def _number(name: str, kind: type) -> BeforeValidator:
    def check(value: Any) -> Any:
        if value is None:
            return None
        # bool is an int in Python; a JSON true is never a valid number here.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(name, f"must be a number, got {type(value).__name__}")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ParamError(name, f"must be an integer, got {value}")
            return int(value)
        if not math.isfinite(value):
            raise ParamError(name, "must be a finite number")
        return float(value)

    return BeforeValidator(check)


def _in_range(name: str, low: float, high: float) -> BeforeValidator:
    def check(value: Any) -> Any:
        if value is not None and not low <= value <= high:
            raise ParamError(name, f"must be between {low} and {high}, got {value}")
        return value

    return BeforeValidator(check)


def _text(name: str, required: bool) -> BeforeValidator:
    def check(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ParamError(name, f"must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise ParamError(name, "must not be empty")
        if len(value) > MAX_PROMPT_CHARS:
            raise ParamError(name, f"is {len(value)} characters long, the limit is {MAX_PROMPT_CHARS}")
        if "\x00" in value:
            raise ParamError(name, "must not contain NUL characters")
        return value

    return BeforeValidator(check)


def _choice(name: str, what: str, known: tuple[str, ...]) -> BeforeValidator:
    def check(value: Any) -> Any:
        if value is not None and value not in known:
            raise ParamError(name, f"unknown {what} {value!r} (known: {', '.join(known)})")
        return value

    return BeforeValidator(check)


def parse_size(value: Any) -> tuple[int, int]:
    """``"832x480"`` -> (832, 480): width first, as users write it."""
    if not isinstance(value, str):
        raise ParamError("size", f"must be a string like '832x480', got {type(value).__name__}")
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ParamError("size", f"must look like '832x480' (width x height), got {value!r}")
    return int(parts[0]), int(parts[1])


def _timesteps(value: Any) -> Any:
    if value is not None:
        if not isinstance(value, (list, tuple)):
            raise ParamError("timesteps", f"must be a list of integers, got {type(value).__name__}")
        try:
            check_timesteps(value)
        except ValueError as error:
            raise ParamError("timesteps", str(error).removeprefix("timesteps ")) from None
    return value


def _size(value: Any) -> Any:
    if value is not None:
        parse_size(value)
    return value


# Before-validators run last to first: the type's check, then the range's.
def _int(name: str, low: int | None = None, high: int | None = None, **field: Any) -> Any:
    checks = [_in_range(name, low, high)] if low is not None else []
    bounded = Annotated[int, Field(ge=low, le=high)]  # on the number: null stays allowed
    return Annotated[bounded | None, *checks, _number(name, int), Field(None, **field)]


def _float(name: str, low: float | None = None, high: float | None = None, **field: Any) -> Any:
    checks = [_in_range(name, low, high)] if low is not None else []
    bounded = Annotated[float, Field(ge=low, le=high)]
    return Annotated[bounded | None, *checks, _number(name, float), Field(None, **field)]


class GenerationRequest(BaseModel):
    """One text-to-video request: the prompt and optional parameters (absent or null: the model's
    default). The rules that depend on the model (sizes, frame and step limits, caches) are checked
    by ``validate_params``."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[
        str,
        _text("prompt", required=True),
        Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what the video shows"),
    ]
    negative_prompt: Annotated[
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None,  # on the text: null stays allowed
        _text("negative_prompt", required=False),
        Field(None, description="default: the official Wan negative prompt"),
    ]
    size: Annotated[
        Annotated[str, Field(pattern=r"^\d+[xX]\d+$")] | None,
        BeforeValidator(_size),
        Field(None, description="WIDTHxHEIGHT, one the model supports (e.g. 832x480)"),
    ]
    width: _int("width", description="instead of size, with height")
    height: _int("height", description="instead of size, with width")
    frames: _int("frames", description="4n+1 (default: the model's, 81 for Wan)")
    steps: _int("steps", description="denoising steps (default: the model's)")
    guidance: _float("guidance", 0.0, MAX_GUIDANCE, description="classifier-free guidance scale")
    guidance_low_noise: _float(
        "guidance_low_noise", 0.0, MAX_GUIDANCE, description="Wan2.2 only: the low-noise expert's guidance"
    )
    shift: _float("shift", description=f"the sigma schedule's shift, above 0 and at most {MAX_SHIFT}")
    seed: _int("seed", 0, MAX_SEED, description="default: random (recorded, so the video can be made again)")
    solver: Annotated[
        Literal[SOLVERS] | None, _choice("solver", "solver", SOLVERS), Field(None, description="the sampler")
    ]
    timesteps: Annotated[
        list[Annotated[int, Field(ge=1, le=1000)]] | None,
        BeforeValidator(_timesteps),
        Field(
            None,
            description="distill solvers only: the training timesteps to run, strictly decreasing within "
            "1..1000 (default: the profile's list, else evenly spaced over steps)",
        ),
    ]
    flexcache: Annotated[
        Literal[FLEXCACHE] | None,
        _choice("flexcache", "strategy", FLEXCACHE),
        Field(None, description="feature caching across steps, if the profile allows it (default none)"),
    ]
    teacache_threshold: _float("teacache_threshold", 0.0, 1.0, description="default: the model's")
    pab_self_start: _int("pab_self_start", 0, 1000, description="PAB: broadcast self-attention above")
    pab_self_end: _int("pab_self_end", 0, 1000, description="PAB: ... and below this timestep")
    pab_self_interval: _int("pab_self_interval", 1, MAX_PAB_INTERVAL, description="PAB: recompute every")
    pab_cross_start: _int("pab_cross_start", 0, 1000, description="PAB: broadcast cross-attention above")
    pab_cross_end: _int("pab_cross_end", 0, 1000, description="PAB: ... and below this timestep")
    pab_cross_interval: _int("pab_cross_interval", 1, MAX_PAB_INTERVAL, description="PAB: recompute every")
    cfg_cache_interval: _int(
        "cfg_cache_interval",
        1,
        MAX_CFG_CACHE_INTERVAL,
        description="CFG cache, if the profile allows it: compute the unconditional branch every n-th step "
        "inside the window, reuse the guidance term in between (default: off)",
    )
    cfg_cache_start: _int("cfg_cache_start", 0, 1000, description="CFG cache: reuse above this timestep")
    cfg_cache_end: _int("cfg_cache_end", 0, 1000, description="CFG cache: ... and below this timestep")


REQUEST_FIELDS = tuple(GenerationRequest.model_fields)


def parse_request(raw: Any) -> GenerationRequest:
    """A request from its JSON-like form; ``ParamError`` naming the first bad field."""
    if not isinstance(raw, dict):
        raise ParamError("params", f"must be a JSON object, got {type(raw).__name__}")
    try:
        return GenerationRequest.model_validate(raw)
    except ValidationError as error:
        raise param_error(error) from None


def param_error(error: ValidationError) -> ParamError:
    """The first problem of a ValidationError of ``GenerationRequest``, as a ``ParamError``."""
    first = error.errors()[0]
    field = ".".join(map(str, first["loc"])) or "params"
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ParamError):
        return cause
    if first["type"] == "missing":
        return ParamError(field, "is required")
    if first["type"] == "extra_forbidden":
        return ParamError(field, f"unknown parameter (known: {', '.join(sorted(REQUEST_FIELDS))})")
    return ParamError(field, first["msg"])


@dataclass(frozen=True)
class GenerationParams:
    """One request, complete: every default filled in from the model's config."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    steps: int
    guidance: float
    shift: float
    seed: int
    solver: str
    # The distill solvers' training timesteps (None for the others).
    timesteps: tuple[int, ...] | None = None
    # Wan2.2 only: guidance of the low-noise expert (the high-noise one uses ``guidance``).
    guidance_low_noise: float | None = None
    # Feature caching across steps: "none", "teacache" or "pab", with that strategy's knobs.
    flexcache: str = "none"
    teacache_threshold: float | None = None
    pab_self_start: int | None = None
    pab_self_end: int | None = None
    pab_self_interval: int | None = None
    pab_cross_start: int | None = None
    pab_cross_end: int | None = None
    pab_cross_interval: int | None = None
    # The CFG cache (None: off), with any strategy above.
    cfg_cache_interval: int | None = None
    cfg_cache_start: int | None = None
    cfg_cache_end: int | None = None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _within(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ParamError(name, f"must be between {low} and {high}, got {value}")


def _flexcache(request: GenerationRequest, model: ModelConfig, allowed: tuple[str, ...] | None) -> dict:
    strategy = request.flexcache or "none"
    if strategy != "none" and allowed is not None and strategy not in allowed:
        offered = ", ".join(allowed) or "none"
        raise ParamError("flexcache", f"{strategy!r} is not allowed on this profile (allowed: {offered})")
    out: dict[str, Any] = {"flexcache": strategy}
    for name in ("teacache_threshold", *PAB_DEFAULTS):
        if getattr(request, name) is not None and not name.startswith(strategy):
            raise ParamError(name, f"only applies with flexcache={name.split('_')[0]}")
    if strategy == "teacache":
        if model.teacache is None:
            fit = f"{model.display_name} has no fitted TeaCache polynomial: use pab or none"
            raise ParamError("flexcache", fit)
        threshold = request.teacache_threshold
        out["teacache_threshold"] = model.teacache.threshold if threshold is None else threshold
    if strategy == "pab":
        for name, default in PAB_DEFAULTS.items():
            value = getattr(request, name)
            out[name] = default if value is None else value
        for kind in ("self", "cross"):
            if out[f"pab_{kind}_start"] >= out[f"pab_{kind}_end"]:
                raise ParamError(f"pab_{kind}_start", f"must be below pab_{kind}_end")
    return out


def _cfg_cache(request: GenerationRequest, profile: ProfileConfig | None, guided: bool) -> dict:
    names = ("cfg_cache_interval", *CFG_CACHE_DEFAULTS)
    given = [name for name in names if getattr(request, name) is not None]
    if not given:
        return {}
    if profile is not None and "cfg_cache" not in profile.flexcache:
        offered = ", ".join(profile.flexcache) or "none"
        raise ParamError(
            given[0], f"the CFG cache is not allowed on profile {profile.name} (allowed: {offered})"
        )
    if request.cfg_cache_interval is None:
        raise ParamError(given[0], "only applies with cfg_cache_interval")
    if not guided:
        raise ParamError(
            given[0], "the CFG cache reuses the unconditional branch, which guidance 1 never computes"
        )
    out = {name: getattr(request, name) for name in names}
    for name, default in CFG_CACHE_DEFAULTS.items():
        out[name] = default if out[name] is None else out[name]
    if out["cfg_cache_start"] >= out["cfg_cache_end"]:
        raise ParamError("cfg_cache_start", "must be below cfg_cache_end")
    return out


def validate_params(
    raw: dict[str, Any] | GenerationRequest, model: ModelConfig, profile: ProfileConfig | None = None
) -> GenerationParams:
    """Check a request against ``model`` and fill in its defaults; raise ``ParamError`` if it is bad.

    ``raw`` may hold ``size`` ("WxH") or ``width`` and ``height``; ``seed`` may be omitted or
    None for a random one (the chosen seed is part of the returned parameters, so the video can be
    reproduced). A worker's ``profile`` adds its rules: the caching strategies it allows, its sampling
    defaults, and, with ``cfg: false``, no guidance and no negative prompt. Without one (a checkpoint
    folder on this machine) every strategy is allowed and the model's defaults apply.
    """
    request = raw if isinstance(raw, GenerationRequest) else parse_request(raw)
    sampling = model.sampling if profile is None else profile.sampling_for(model)
    if profile is not None and not profile.cfg:
        _refuse_guidance(request, profile)

    if request.size is not None and (request.width is not None or request.height is not None):
        raise ParamError("size", "give either size or width and height, not both")
    if request.width is not None or request.height is not None:
        if request.width is None or request.height is None:
            raise ParamError("width" if request.width is None else "height", "is required with the other")
        width, height = request.width, request.height
    else:
        width, height = parse_size(request.size or sampling.size)
    size = f"{width}x{height}"
    if size not in sampling.sizes:
        raise ParamError(
            "size",
            f"{size} is not supported by {model.display_name} (supported: {', '.join(sampling.sizes)})",
        )

    frames = sampling.frames if request.frames is None else request.frames
    if frames < 1 or (frames - 1) % 4:
        raise ParamError("frames", f"must be 4n+1 (1, 5, 9, ..., 81), got {frames}")
    _within("frames", frames, 1, sampling.max_frames)
    solver = request.solver or sampling.solver
    steps, timesteps = _schedule(request, sampling, solver)
    _within("steps", steps, 1, sampling.max_steps)
    guidance = sampling.guidance if request.guidance is None else request.guidance
    guidance_low = None
    if model.is_moe:
        low = request.guidance_low_noise
        guidance_low = sampling.guidance_low_noise if low is None else low
    elif request.guidance_low_noise is not None:
        raise ParamError(
            "guidance_low_noise", f"only applies to a two-expert model, not {model.display_name}"
        )
    shift = sampling.shift if request.shift is None else request.shift
    if not 0.0 < shift <= MAX_SHIFT:
        raise ParamError("shift", f"must be greater than 0 and at most {MAX_SHIFT}, got {shift}")
    seed = secrets.randbelow(2**31) if request.seed is None else request.seed
    cfg = profile is None or profile.cfg

    return GenerationParams(
        prompt=request.prompt,
        # Without CFG nothing reads a negative prompt: none is recorded.
        negative_prompt=(request.negative_prompt or DEFAULT_NEGATIVE_PROMPT) if cfg else "",
        width=width,
        height=height,
        frames=frames,
        steps=steps,
        guidance=guidance,
        shift=shift,
        seed=seed,
        solver=solver,
        timesteps=timesteps,
        guidance_low_noise=guidance_low,
        **_flexcache(request, model, None if profile is None else profile.flexcache),
        **_cfg_cache(request, profile, guided=guidance != 1.0 or guidance_low not in (None, 1.0)),
    )


def _refuse_guidance(request: GenerationRequest, profile: ProfileConfig) -> None:
    """A CFG-distilled profile computes no unconditional branch: guidance and a negative prompt would
    be silently ignored, so asking for them is an error (guidance 1, the profile's own, is allowed)."""
    why = f"profile {profile.name} runs a CFG-distilled model without classifier-free guidance (cfg: false)"
    for name in ("guidance", "guidance_low_noise"):
        value = getattr(request, name)
        if value is not None and value != 1.0:
            raise ParamError(name, f"{why}; it cannot be set (got {value})")
    if request.negative_prompt:
        raise ParamError("negative_prompt", f"{why}; a negative prompt would have no effect")


def _schedule(
    request: GenerationRequest, sampling: SamplingConfig, solver: str
) -> tuple[int, tuple[int, ...] | None]:
    """(steps, distill timesteps or None). A distill solver runs the request's list, else the
    profile's or model's list when the step count is its length, else evenly spaced timesteps."""
    if solver not in DISTILL_SOLVERS:
        if request.timesteps is not None:
            raise ParamError("timesteps", f"only applies with solver {' or '.join(DISTILL_SOLVERS)}")
        return (sampling.steps if request.steps is None else request.steps), None
    listed = request.timesteps
    if listed is not None:
        if request.steps is not None and request.steps != len(listed):
            raise ParamError("steps", f"is {request.steps}, but timesteps lists {len(listed)}")
        return len(listed), tuple(listed)
    default = sampling.timesteps
    if default is not None and request.steps in (None, len(default)):
        return len(default), tuple(default)
    steps = sampling.steps if request.steps is None else request.steps
    return steps, distill_timesteps(steps)


def distill_timesteps(steps: int) -> tuple[int, ...]:
    """The evenly spaced training timesteps a distill solver runs by default: 1000 down in ``steps``
    equal strides (4 steps: LightX2V's ``[1000, 750, 500, 250]``)."""
    return tuple(round(1000 * (steps - i) / steps) for i in range(steps))


# --- the command line ------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    """``1000,750,500,250`` -> [1000, 750, 500, 250]: a list field on the command line."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _option_type(annotation: Any) -> Callable[[str], Any]:
    """int, float, a comma-separated int list or str: what a request field's option parses to."""
    members = get_args(annotation) or (annotation,)  # int | None -> int, None
    if any(get_origin(m) is list for m in members):
        return _int_list
    kinds = {get_args(m)[0] if get_origin(m) is Annotated else m for m in members}
    return next((kind for kind in (int, float) if kind in kinds), str)


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Every request field as a command-line option (``--negative-prompt``, ``--pab-self-start``...),
    from ``GenerationRequest``; unset ones take the model's defaults."""
    for name, field in GenerationRequest.model_fields.items():
        option = "--" + name.replace("_", "-")
        kind = _option_type(field.annotation)
        choices = {"solver": SOLVERS, "flexcache": FLEXCACHE}.get(name)
        parser.add_argument(
            option, type=kind, choices=choices, required=name == "prompt", help=field.description
        )


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request the options given on the command line make (unset options left out)."""
    return {name: getattr(args, name) for name in REQUEST_FIELDS if getattr(args, name, None) is not None}
