"""Static model descriptions: architecture and sampling defaults, one YAML file per model.

Torch-free: the producer reads these to validate requests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(os.environ.get("SMARTDIFF_CONFIG_DIR", REPO_ROOT / "configs"))


@dataclass(frozen=True)
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    stride: tuple[int, int, int] = (4, 8, 8)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 256384
    d_model: int = 4096
    d_ff: int = 10240
    d_kv: int = 64
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ModelConfig:
    """One Wan text-to-video model: what it is and how it samples by default."""

    name: str
    display_name: str
    dit: DiTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    t5: T5Config = field(default_factory=T5Config)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    teacache: TeaCacheConfig = field(default_factory=TeaCacheConfig)
    # Names of the DiT experts, in the order of use; one entry means a single DiT.
    experts: tuple[str, ...] = ("dit",)

    @property
    def is_moe(self) -> bool:
        return len(self.experts) > 1


def _build(cls: type, raw: dict[str, Any] | None) -> Any:
    raw = dict(raw or {})
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    for key, value in raw.items():
        if isinstance(value, list):
            raw[key] = tuple(value)
    return cls(**raw)


def parse_model_config(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        name=raw["name"],
        display_name=raw.get("display_name", raw["name"]),
        dit=_build(DiTConfig, raw["dit"]),
        vae=_build(VAEConfig, raw.get("vae")),
        t5=_build(T5Config, raw.get("t5")),
        sampling=_build(SamplingConfig, raw.get("sampling")),
        teacache=_build(TeaCacheConfig, raw.get("teacache")),
        experts=tuple(raw.get("experts", ["dit"])),
    )


@cache
def load_model_config(name: str) -> ModelConfig:
    """The model config named ``name`` (file ``configs/models/<name>.yaml``)."""
    path = CONFIG_DIR / "models" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_model_names()) or "none"
        raise ValueError(f"unknown model {name!r} (known: {known})")
    with open(path) as f:
        config = parse_model_config(yaml.safe_load(f))
    if config.name != name:
        raise ValueError(f"{path}: name {config.name!r} does not match the file name")
    return config


def list_model_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


@dataclass(frozen=True)
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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
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


@dataclass(frozen=True)
class ProfileConfig:
    """What a worker pins: one model, its weights and how to run it (``configs/profiles/<name>.yaml``)."""

    name: str
    model: str
    # Folder of the checkpoint; relative paths are under $SMARTDIFF_CHECKPOINT_ROOT (default ./checkpoints),
    # "{project}/..." is inside this project (the weights it ships).
    checkpoint: str
    attention: str = "sdpa"
    # Options of the attention backend (kernels/<backend>.py), e.g. {implementation: triton, topk: 0.5}.
    attention_options: dict[str, Any] = field(default_factory=dict)
    # Run the DiT's token-wise work through torch.compile (pipeline/fused.py): fused kernels on CUDA.
    compile: bool = False
    # "auto": bf16 on GPU, fp32 on CPU.
    dtype: str = "auto"
    # Feature-caching strategies a request may ask for on this worker ("teacache", "pab").
    flexcache: tuple[str, ...] = ()
    # 0 all on the GPU, 1 tiled VAE, 2 + streamed T5, 3 + streamed DiT, 4 + chunked FFN
    # (pipeline/memory.py).
    low_mem_level: int = 0
    # Processes one job runs on: ``parallel: {cfg: 1, ulysses: 1, ring: 1}`` (the default, one GPU).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def checkpoint_dir(self) -> Path:
        # "{project}" is this project's folder: the weights it ships (weights/).
        path = Path(os.path.expandvars(self.checkpoint.replace("{project}", str(REPO_ROOT)))).expanduser()
        if path.is_absolute():
            return path
        return Path(os.environ.get("SMARTDIFF_CHECKPOINT_ROOT", "checkpoints")) / path

    @property
    def model_config(self) -> ModelConfig:
        return load_model_config(self.model)


DTYPES = ("auto", "bf16", "fp16", "fp32")


@cache
def load_profile(name: str) -> ProfileConfig:
    path = CONFIG_DIR / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_profile_names()) or "none"
        raise ValueError(f"unknown profile {name!r} (known: {known})")
    with open(path) as f:
        raw = yaml.safe_load(f)
    try:
        raw["parallel"] = _build(ParallelConfig, raw.get("parallel"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    profile = _build(ProfileConfig, raw)
    if profile.name != name:
        raise ValueError(f"{path}: name {profile.name!r} does not match the file name")
    unknown = set(profile.flexcache) - {"teacache", "pab"}
    if unknown:
        raise ValueError(f"{path}: unknown flexcache strategies {sorted(unknown)} (known: teacache, pab)")
    if profile.low_mem_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"{path}: low_mem_level must be 0 to 4, got {profile.low_mem_level}")
    if profile.dtype not in DTYPES:
        raise ValueError(f"{path}: dtype {profile.dtype!r} is not one of {', '.join(DTYPES)}")
    model = load_model_config(profile.model)  # an unknown model is an error here, not at the first job
    try:
        # The world size is checked when the process group is built (pipeline/parallel.py).
        profile.parallel.validate(model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return profile


def list_profile_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "profiles").glob("*.yaml"))
