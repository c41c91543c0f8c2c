"""Static model descriptions: architecture and sampling defaults, one YAML file per model.

Torch-free: the producer reads these to validate requests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass


def package_dir(package: str) -> Path:
    """The folder of an installed package of ours. Wheels install as plain files, so it is a path."""
    folder = resources.files(package)
    if not isinstance(folder, Path):
        raise RuntimeError(f"{package} is not installed as plain files ({folder}); install the wheel")
    return folder


# Deployments may point at their own models and profiles; the default is the installed package data.
CONFIG_DIR = Path(os.environ.get("SMARTDIFF_CONFIG_DIR") or package_dir("smartdiff.configs"))


def shipped_weights_dir() -> Path:
    """The folder of the checkpoints the project ships (package data); SMARTDIFF_WEIGHTS_DIR overrides."""
    return Path(os.environ.get("SMARTDIFF_WEIGHTS_DIR") or package_dir("smartdiff.weights"))


# Every value must have its field's type (YAML lists become tuples first), and an unknown key is an
# error naming it: a typo or an ambiguous YAML value fails the load, not the first forward.
CHECKED = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True, config=CHECKED)
class DiTConfig:
    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True  # RMSNorm on q and k over the full width
    cross_attn_norm: bool = True  # affine LayerNorm before the cross-attention

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True, config=CHECKED)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    stride: tuple[int, int, int] = (4, 8, 8)


@dataclass(frozen=True, config=CHECKED)
class T5Config:
    vocab_size: int = 256384
    d_model: int = 4096
    d_ff: int = 10240
    d_kv: int = 64
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128


@dataclass(frozen=True, config=CHECKED)
class SamplingConfig:
    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    solver: str = "unipc"
    frames: int = 81
    fps: int = 16
    size: str = "832x480"
    sizes: tuple[str, ...] = ("832x480", "480x832")
    max_frames: int = 121
    max_steps: int = 100
    # Wan2.2 mixture of experts: the high-noise expert runs for timesteps >= boundary * 1000.
    boundary: float | None = None
    guidance_low_noise: float | None = None
    # The distill solvers' training timesteps (pipeline/schedulers.py), e.g. [1000, 750, 500, 250];
    # unset: evenly spaced over ``steps``.
    timesteps: tuple[int, ...] | None = None


@dataclass(frozen=True, config=CHECKED)
class TeaCacheConfig:
    """TeaCache for one model: the published polynomial that rescales the relative L1 change of
    the timestep-modulated input into an estimate of the output change, and its operating point."""

    coefficients: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0, 0.0)  # highest power first (numpy.poly1d)
    # "time_embedding" (the official default, e) or "time_projection" (its "ret_steps" variant, e0).
    modulated_input: str = "time_embedding"
    threshold: float = 0.08
    first_steps: int = 1  # always computed at the start
    last_steps: int = 1  # always computed at the end
    source: str = ""  # where the coefficients come from


@dataclass(frozen=True, config=CHECKED)
class ModelConfig:
    """One Wan text-to-video model: what it is and how it samples by default."""

    name: str
    display_name: str
    dit: DiTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    t5: T5Config = field(default_factory=T5Config)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # The fitted TeaCache polynomial; None for a model without one (TeaCache is then refused).
    teacache: TeaCacheConfig | None = None
    # Names of the DiT experts, in the order of use; one entry means a single DiT.
    experts: tuple[str, ...] = ("dit",)

    @property
    def is_moe(self) -> bool:
        return len(self.experts) > 1


def _build(cls: type, raw: dict[str, Any] | None, section: str) -> Any:
    """``cls`` from the YAML mapping ``section``: lists become the tuples the fields declare, then every
    value must have its field's type; a wrong one is a ValueError naming ``section.field``."""
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{section}: expected a mapping, got {raw!r}")
    try:
        return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in (raw or {}).items()})
    except ValidationError as e:
        raise ValueError("; ".join(_describe(error, section) for error in e.errors())) from None


def _describe(error: Any, section: str) -> str:
    where = ".".join([section, *map(str, error["loc"])])
    if error["type"] == "value_error":  # our own checks: the message says what and what was given
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "unexpected_keyword_argument":
        return f"{where}: unknown setting"
    if error["type"] == "missing_argument":
        return f"{where}: missing"
    described = f"{where}: {error['msg'].lower()}, got {error['input']!r}"
    if error["type"] == "float_type" and isinstance(error["input"], str):
        described += (
            " (YAML reads a number with an exponent and no dot, such as 1e-06, as text: write 1.0e-06)"
        )
    return described


_MODEL_PARTS = {
    "dit": DiTConfig,
    "vae": VAEConfig,
    "t5": T5Config,
    "sampling": SamplingConfig,
    "teacache": TeaCacheConfig,
}


def parse_model_config(raw: dict[str, Any]) -> ModelConfig:
    raw = {"display_name": raw.get("name"), **raw}
    for key, cls in _MODEL_PARTS.items():
        if key in raw or key == "dit":
            raw[key] = _build(cls, raw.get(key), key)
    return _build(ModelConfig, raw, "model")


def _read_config(path: Path, parse: Callable[[dict[str, Any]], Any]) -> Any:
    """Parse one YAML file; a wrong key, type or value is an error that names the file and the field."""
    with open(path) as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, found {type(raw).__name__}")
    try:
        return parse(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


@cache
def load_model_config(name: str) -> ModelConfig:
    """The model config named ``name`` (file ``configs/models/<name>.yaml``)."""
    path = CONFIG_DIR / "models" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_model_names()) or "none"
        raise ValueError(f"unknown model {name!r} (known: {known})")
    config = _read_config(path, parse_model_config)
    if config.name != name:
        raise ValueError(f"{path}: name {config.name!r} does not match the file name")
    return config


def list_model_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


@dataclass(frozen=True, config=CHECKED)
class ParallelConfig:
    """How one job is spread over ``cfg * ulysses * ring`` processes (pipeline/parallel.py).

    ``cfg`` 2 runs the conditional and unconditional branches on different ranks; ``ulysses`` splits
    the attention heads (so it must divide them); ``ring`` passes key/value blocks around a ring.
    """

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        for name in ("cfg", "ulysses", "ring"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.cfg not in (1, 2):
            raise ValueError(f"parallel.cfg must be 1 or 2 (one process per guidance branch), got {self.cfg}")

    @property
    def sequence(self) -> int:
        """Processes that share one branch's tokens (the sequence-parallel degree)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring

    def validate(self, model: ModelConfig, world_size: int | None = None) -> None:
        """Raise ValueError unless ``ulysses`` divides the model's heads and, when given, the world
        size is ``cfg * ulysses * ring``."""
        heads = model.dit.num_heads
        if heads % self.ulysses:
            allowed = [str(d) for d in range(1, heads + 1) if heads % d == 0]
            listed = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            raise ValueError(
                f"parallel.ulysses {self.ulysses} does not divide the heads: "
                f"the {model.name} model's {heads} heads allow ulysses {listed}"
            )
        if world_size is not None and world_size != self.world_size:
            raise ValueError(
                f"parallel cfg {self.cfg} x ulysses {self.ulysses} x ring {self.ring} needs "
                f"{self.world_size} processes, the process group has {world_size}"
            )


def model_path(text: str) -> Path:
    """A checkpoint or LoRA path as profiles write it: absolute, ``{weights}/...`` (what the project
    ships), or relative to $SMARTDIFF_CHECKPOINT_ROOT (default ./checkpoints)."""
    path = Path(os.path.expandvars(text.replace("{weights}", str(shipped_weights_dir())))).expanduser()
    if path.is_absolute():
        return path
    return Path(os.environ.get("SMARTDIFF_CHECKPOINT_ROOT", "checkpoints")) / path


LORA_EXPERTS = ("both", "high", "low")


@dataclass(frozen=True, config=CHECKED)
class LoraConfig:
    """A LoRA merged into the DiT at load (pipeline/lora.py): its file, strength and, for Wan2.2,
    the expert it is for (high: the high-noise one, low, or both)."""

    path: str
    strength: float = 1.0
    expert: Literal["both", "high", "low"] = "both"

    @property
    def file(self) -> Path:
        return model_path(self.path)

    def applies_to(self, expert_index: int, experts: int) -> bool:
        if experts == 1 or self.expert == "both":
            return True
        return (self.expert == "high") == (expert_index == 0)

    def describe(self) -> dict[str, Any]:
        """What a job's result says of it: the file's name, the start of its sha256, how it applies."""
        digest = hashlib.sha256(self.file.read_bytes()).hexdigest()
        return {
            "file": self.file.name,
            "sha256": digest[:16],
            "strength": self.strength,
            "expert": self.expert,
        }

    @classmethod
    def parse(cls, text: str) -> LoraConfig:
        """``PATH[:STRENGTH[:EXPERT]]``, as ``smartdiff generate --lora`` takes it."""
        path, _, rest = text.partition(":")
        strength, _, expert = rest.partition(":")
        where = str(Path(path).expanduser().resolve())  # on a command line: from the working folder
        try:
            return cls(path=where, strength=float(strength) if strength else 1.0, expert=expert or "both")
        except (ValueError, ValidationError) as error:
            raise ValueError(f"--lora {text!r}: PATH[:STRENGTH[:high|low|both]] ({error})") from None


@dataclass(frozen=True, config=CHECKED)
class ProfileConfig:
    """What a worker pins: one model, its weights and how to run it (``configs/profiles/<name>.yaml``)."""

    name: str
    model: str
    # Folder of the checkpoint; relative paths are under $SMARTDIFF_CHECKPOINT_ROOT (default ./checkpoints),
    # "{weights}/..." is a checkpoint this project ships (``shipped_weights_dir``).
    checkpoint: str
    attention: str = "sdpa"
    # Options of the attention backend (kernels/<backend>.py), e.g. {implementation: triton, topk: 0.5}.
    attention_options: dict[str, Any] = field(default_factory=dict)
    # Run the DiT's token-wise work through torch.compile (pipeline/fused.py): fused kernels on CUDA.
    compile: bool = False
    # "auto": bf16 on GPU, fp32 on CPU.
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Feature caching a request may ask for on this worker: the strategies "teacache" and "pab", and
    # "cfg_cache" (the unconditional branch reused, with either or neither; pipeline/flexcache.py).
    flexcache: tuple[str, ...] = ()
    # 0 all on the GPU, 1 tiled VAE, 2 + streamed T5, 3 + streamed DiT, 4 + chunked FFN
    # (pipeline/memory.py).
    low_mem_level: int = 0
    # Processes one job runs on: ``parallel: {cfg: 1, ulysses: 1, ring: 1}`` (the default, one GPU).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # LoRAs merged into the DiT at load: ``loras: [{path: ..., strength: 1.0, expert: both}]``.
    loras: tuple[LoraConfig, ...] = ()
    # Sampling defaults over the model's (``configs/models``): any of its ``sampling`` settings, e.g.
    # ``{solver: distill, steps: 4, shift: 5.0, timesteps: [1000, 750, 500, 250]}``.
    sampling: dict[str, Any] = field(default_factory=dict)
    # false: a CFG-distilled model, run without classifier-free guidance (one DiT forward per step);
    # requests may not set guidance or a negative prompt.
    cfg: bool = True
    # Run the two guidance branches as one batch-2 DiT forward: one pass over the weights and half the
    # kernel launches per step. Not with a feature cache (its decisions are per branch) or parallel.
    cfg_batch: bool = False
    # The DiT blocks' linear layers: "dtype" (the model's, bf16 on GPU) or "fp8" (e4m3 products with
    # per-channel weight and per-token activation scales, pipeline/fp8.py; sm_89+).
    gemm: str = "dtype"
    # Replay each video size's DiT forward from a CUDA graph (pipeline/cuda_graphs.py): no per-kernel
    # launch cost. Not with a feature cache, a streamed DiT (levels 3-4) or parallel.
    cuda_graphs: bool = False
    # Single-file DiT weights in place of the checkpoint folder's, one per expert, paths as for
    # ``checkpoint``: official or ComfyUI names, bf16 or fp8 (LightX2V's and ComfyUI's scaled fp8).
    dit_weights: tuple[str, ...] = ()

    @property
    def checkpoint_dir(self) -> Path:
        return model_path(self.checkpoint)

    @property
    def model_config(self) -> ModelConfig:
        return load_model_config(self.model)

    @property
    def dit_files(self) -> tuple[Path, ...]:
        return tuple(model_path(path) for path in self.dit_weights)

    def sampling_for(self, model: ModelConfig) -> SamplingConfig:
        """``model``'s sampling defaults with this profile's overrides; guidance 1 without CFG."""
        merged = {**asdict(model.sampling), **self.sampling}
        if not self.cfg:
            merged.update(guidance=1.0, guidance_low_noise=1.0 if model.is_moe else None)
        return _build(SamplingConfig, merged, "sampling")


PROFILE_CACHES = ("teacache", "pab", "cfg_cache")
DTYPES = ("auto", "bf16", "fp16", "fp32")
GEMMS = ("dtype", "fp8")


def parse_profile(raw: dict[str, Any]) -> ProfileConfig:
    parallel = _build(ParallelConfig, raw.get("parallel"), "parallel")
    loras = tuple(_build(LoraConfig, lora, f"loras[{i}]") for i, lora in enumerate(raw.get("loras") or ()))
    return _build(ProfileConfig, {**raw, "parallel": parallel, "loras": loras}, "profile")


@cache
def load_profile(name: str) -> ProfileConfig:
    path = CONFIG_DIR / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_profile_names()) or "none"
        raise ValueError(f"unknown profile {name!r} (known: {known})")
    profile = _read_config(path, parse_profile)
    if profile.name != name:
        raise ValueError(f"{path}: name {profile.name!r} does not match the file name")
    unknown = set(profile.flexcache) - set(PROFILE_CACHES)
    if unknown:
        known = ", ".join(PROFILE_CACHES)
        raise ValueError(f"{path}: unknown flexcache strategies {sorted(unknown)} (known: {known})")
    if profile.low_mem_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"{path}: low_mem_level must be 0 to 4, got {profile.low_mem_level}")
    if profile.dtype not in DTYPES:
        raise ValueError(f"{path}: dtype {profile.dtype!r} is not one of {', '.join(DTYPES)}")
    if profile.gemm not in GEMMS:
        raise ValueError(f"{path}: gemm {profile.gemm!r} is not one of {', '.join(GEMMS)}")
    model = load_model_config(profile.model)  # an unknown model is an error here, not at the first job
    try:
        # The world size is checked when the process group is built (pipeline/parallel.py).
        profile.parallel.validate(model)
        check_profile_sampling(profile, model)
        if "cfg_cache" in profile.flexcache:
            check_cfg_cache(profile)
        if profile.cfg_batch:
            check_cfg_batch(profile)
        if profile.cuda_graphs:
            check_cuda_graphs(profile)
        if profile.dit_weights and len(profile.dit_weights) != len(model.experts):
            raise ValueError(f"dit_weights: {len(profile.dit_weights)} files for {len(model.experts)} DiT(s)")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return profile


def step_caches(profile: ProfileConfig) -> list[str]:
    """The profile's caches that decide per step and branch what a forward computes (TeaCache, PAB);
    the CFG cache decides only whether the unconditional forward runs at all."""
    return [name for name in profile.flexcache if name != "cfg_cache"]


def check_cfg_cache(profile: ProfileConfig) -> None:
    """ValueError where the CFG cache would have nothing to save."""
    if not profile.cfg:
        raise ValueError("the CFG cache reuses the unconditional branch; this profile has cfg: false")
    if profile.parallel.cfg > 1:
        raise ValueError(
            "the CFG cache skips unconditional forwards, which CFG parallel runs on their own GPUs beside "
            "the conditional ones: it would save nothing"
        )


def check_cfg_batch(profile: ProfileConfig) -> None:
    """ValueError where something splits the guidance branches that ``cfg_batch`` runs as one batch."""
    if not profile.cfg:
        raise ValueError("cfg_batch batches the guidance branches; this profile has cfg: false")
    if step_caches(profile):
        raise ValueError("cfg_batch runs both branches in one forward; a feature cache decides per branch")
    if profile.parallel != ParallelConfig():
        raise ValueError("cfg_batch runs both branches in one forward on one GPU; this profile is parallel")


def check_cuda_graphs(profile: ProfileConfig) -> None:
    """ValueError where something changes the DiT forward from call to call, which a CUDA graph
    replays as it was captured."""
    if step_caches(profile):
        raise ValueError("cuda_graphs replay whole forwards; a feature cache decides per step what to run")
    if profile.low_mem_level >= 3:
        raise ValueError("cuda_graphs needs the DiT resident; low_mem_level 3 and 4 stream its blocks")
    if profile.parallel != ParallelConfig():
        raise ValueError("cuda_graphs runs the DiT forward on one GPU; this profile is parallel")


def check_profile_sampling(profile: ProfileConfig, model: ModelConfig) -> None:
    """ValueError unless the profile's sampling overrides make a valid schedule for ``model``."""
    sampling = profile.sampling_for(model)  # an unknown setting or a wrong type is an error here
    if not profile.cfg:
        for name in ("guidance", "guidance_low_noise"):
            if profile.sampling.get(name, 1.0) != 1.0:
                value = profile.sampling[name]
                raise ValueError(f"cfg: false runs without guidance, but sampling.{name} is {value}")
        if profile.parallel.cfg != 1:
            raise ValueError("parallel.cfg 2 splits the guidance branches; this profile has cfg: false")
    if sampling.timesteps is not None:
        check_timesteps(sampling.timesteps, "sampling.timesteps")
        if len(sampling.timesteps) != sampling.steps:
            count, steps = len(sampling.timesteps), sampling.steps
            raise ValueError(f"sampling.timesteps lists {count} timesteps, sampling.steps is {steps}")


def check_timesteps(timesteps: Sequence[int], name: str = "timesteps") -> None:
    """ValueError unless ``timesteps`` (a distill solver's list) are integers in 1..1000, strictly
    decreasing."""
    listed = list(timesteps)
    if not listed or not all(isinstance(t, int) and not isinstance(t, bool) for t in listed):
        raise ValueError(f"{name} must be a non-empty list of integers, got {listed!r}")
    if not all(1 <= t <= 1000 for t in listed) or any(
        a <= b for a, b in zip(listed, listed[1:], strict=False)
    ):
        raise ValueError(f"{name} must decrease strictly within 1..1000, got {listed}")


def list_profile_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "profiles").glob("*.yaml"))
