"""User parameters of one generation and the one function that validates them.

Torch-free: the producer calls ``validate_params`` before enqueueing, the worker again before
running (a queue is never trusted). Every rejection names the field and says what is allowed.
"""

from __future__ import annotations

import argparse
import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any

from smartdiff.pipeline.config import ModelConfig

SOLVERS = ("unipc", "dpm++", "euler")
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

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name for f in fields(GenerationParams)} | {"size"}


def _number(raw: dict[str, Any], name: str, default: Any, kind: type) -> Any:
    value = raw.get(name, default)
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"must be a number, got {type(value).__name__}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ParamError(name, f"must be an integer, got {value}")
        return int(value)
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ParamError(name, "must be a finite number")
    return value


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ParamError(name, f"must be between {low} and {high}, got {value}")


def _text(raw: dict[str, Any], name: str, default: str | None, required: bool) -> str:
    value = raw.get(name, default)
    if value is None:
        if required:
            raise ParamError(name, "is required")
        return ""
    if not isinstance(value, str):
        raise ParamError(name, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ParamError(name, "must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ParamError(name, f"is {len(value)} characters long, the limit is {MAX_PROMPT_CHARS}")
    if "\x00" in value:
        raise ParamError(name, "must not contain NUL characters")
    return value


def parse_size(value: Any) -> tuple[int, int]:
    """``"832x480"`` -> (832, 480): width first, as users write it."""
    if not isinstance(value, str):
        raise ParamError("size", f"must be a string like '832x480', got {type(value).__name__}")
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ParamError("size", f"must look like '832x480' (width x height), got {value!r}")
    return int(parts[0]), int(parts[1])


def _flexcache(raw: dict[str, Any], model: ModelConfig, allowed: tuple[str, ...] | None) -> dict[str, Any]:
    strategy = raw.get("flexcache", "none")
    if strategy not in FLEXCACHE:
        raise ParamError("flexcache", f"unknown strategy {strategy!r} (known: {', '.join(FLEXCACHE)})")
    if strategy != "none" and allowed is not None and strategy not in allowed:
        offered = ", ".join(allowed) or "none"
        raise ParamError("flexcache", f"{strategy!r} is not allowed on this profile (allowed: {offered})")
    out: dict[str, Any] = {"flexcache": strategy}
    for name in ("teacache_threshold", *PAB_DEFAULTS):
        if raw.get(name) is not None and not name.startswith(strategy):
            raise ParamError(name, f"only applies with flexcache={name.split('_')[0]}")
    if strategy == "teacache":
        if model.teacache is None:
            fit = f"{model.display_name} has no fitted TeaCache polynomial: use pab or none"
            raise ParamError("flexcache", fit)
        threshold = _number(raw, "teacache_threshold", model.teacache.threshold, float)
        _in_range("teacache_threshold", threshold, 0.0, 1.0)
        out["teacache_threshold"] = threshold
    if strategy == "pab":
        for name, default in PAB_DEFAULTS.items():
            out[name] = _number(raw, name, default, int)
            if name.endswith("interval"):
                _in_range(name, out[name], 1, MAX_PAB_INTERVAL)
            else:
                _in_range(name, out[name], 0, 1000)
        for kind in ("self", "cross"):
            if out[f"pab_{kind}_start"] >= out[f"pab_{kind}_end"]:
                raise ParamError(f"pab_{kind}_start", f"must be below pab_{kind}_end")
    return out


def validate_params(
    raw: dict[str, Any], model: ModelConfig, allowed_flexcache: tuple[str, ...] | None = None
) -> GenerationParams:
    """Check a request against ``model`` and fill in its defaults; raise ``ParamError`` if it is bad.

    ``raw`` may hold ``size`` ("WxH") or ``width`` and ``height``; ``seed`` may be omitted or
    None for a random one (the chosen seed is part of the returned parameters, so the video can be
    reproduced). ``allowed_flexcache`` is the profile's list of caching strategies (None: any).
    """
    if not isinstance(raw, dict):
        raise ParamError("params", f"must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ParamError(unknown[0], f"unknown parameter (known: {', '.join(sorted(_FIELDS))})")
    sampling = model.sampling

    prompt = _text(raw, "prompt", None, required=True)
    negative = _text(raw, "negative_prompt", None, required=False) or DEFAULT_NEGATIVE_PROMPT

    if "size" in raw and ("width" in raw or "height" in raw):
        raise ParamError("size", "give either size or width and height, not both")
    if "width" in raw or "height" in raw:
        width = _number(raw, "width", None, int)
        height = _number(raw, "height", None, int)
    else:
        width, height = parse_size(raw.get("size", sampling.size))
    size = f"{width}x{height}"
    if size not in sampling.sizes:
        raise ParamError(
            "size",
            f"{size} is not supported by {model.display_name} (supported: {', '.join(sampling.sizes)})",
        )

    frames = _number(raw, "frames", sampling.frames, int)
    if frames < 1 or (frames - 1) % 4:
        raise ParamError("frames", f"must be 4n+1 (1, 5, 9, ..., 81), got {frames}")
    _in_range("frames", frames, 1, sampling.max_frames)

    steps = _number(raw, "steps", sampling.steps, int)
    _in_range("steps", steps, 1, sampling.max_steps)
    guidance = _number(raw, "guidance", sampling.guidance, float)
    _in_range("guidance", guidance, 0.0, MAX_GUIDANCE)
    guidance_low = None
    if model.is_moe:
        guidance_low = _number(raw, "guidance_low_noise", sampling.guidance_low_noise, float)
        _in_range("guidance_low_noise", guidance_low, 0.0, MAX_GUIDANCE)
    elif raw.get("guidance_low_noise") is not None:
        raise ParamError(
            "guidance_low_noise", f"only applies to a two-expert model, not {model.display_name}"
        )
    shift = _number(raw, "shift", sampling.shift, float)
    if not 0.0 < shift <= MAX_SHIFT:
        raise ParamError("shift", f"must be greater than 0 and at most {MAX_SHIFT}, got {shift}")

    seed = raw.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else _number(raw, "seed", None, int)
    _in_range("seed", seed, 0, MAX_SEED)

    solver = raw.get("solver", sampling.solver)
    if solver not in SOLVERS:
        raise ParamError("solver", f"unknown solver {solver!r} (known: {', '.join(SOLVERS)})")

    return GenerationParams(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        frames=frames,
        steps=steps,
        guidance=guidance,
        shift=shift,
        seed=seed,
        solver=solver,
        guidance_low_noise=guidance_low,
        **_flexcache(raw, model, allowed_flexcache),
    )


# The request fields a command line sets, besides the prompt (``smartdiff generate`` and ``submit``).
OPTIONAL_FIELDS = (
    "negative_prompt",
    "size",
    "frames",
    "steps",
    "guidance",
    "guidance_low_noise",
    "shift",
    "seed",
    "solver",
)


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation parameters as command-line options; unset ones take the model's defaults."""
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", help="default: the official Wan negative prompt")
    parser.add_argument("--size", help="WIDTHxHEIGHT, e.g. 832x480 (default: the model's)")
    parser.add_argument("--frames", type=int, help="4n+1 (default: the model's, 81 for Wan)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--guidance-low-noise", type=float, help="Wan2.2 low-noise expert's guidance")
    parser.add_argument("--shift", type=float)
    parser.add_argument("--seed", type=int, help="default: random (recorded, so it can be reused)")
    parser.add_argument("--solver", choices=SOLVERS)
    parser.add_argument("--flexcache", choices=FLEXCACHE, help="feature caching across steps (default none)")
    parser.add_argument("--teacache-threshold", type=float, help="default: the model's (0.08 for 1.3B)")
    for name, default in PAB_DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"PAB schedule (default {default})")


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    names = ("prompt", *OPTIONAL_FIELDS)
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
