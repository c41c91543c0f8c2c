"""Text to video with a Wan model: text encode, denoise with classifier-free guidance, VAE decode."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from smartdiff.kernels import AttentionBackend, get_backend
from smartdiff.kernels.sparge import SparsityStats
from smartdiff.pipeline.checkpoint import CheckpointWeights, ModelWeights, open_checkpoint
from smartdiff.pipeline.config import LoraConfig, ModelConfig, ProfileConfig
from smartdiff.pipeline.dit import WanDiT
from smartdiff.pipeline.flexcache import COND, UNCOND, FlexCache
from smartdiff.pipeline.fp8 import gemm_of, require_fp8_gemm
from smartdiff.pipeline.memory import BlockStreamer, MemoryPlan, estimate_job_bytes
from smartdiff.pipeline.params import GenerationParams, parse_size, validate_params
from smartdiff.pipeline.schedulers import make_scheduler
from smartdiff.pipeline.video import to_uint8_frames

# progress(stage, step, total): stages "text_encode", "denoise", "vae_decode". A callback may raise
# to stop the job; the pipeline checks it between denoising steps.
ProgressFn = Callable[[str, int, int], None]
# denoise(latents, cond, uncond, params, progress, result) -> latents, as WanPipeline.denoise.
DenoiseFn = Callable[..., torch.Tensor]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def apply_guidance(
    cond_velocity: torch.Tensor, uncond_velocity: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Classifier-free guidance: the unconditional velocity moved ``guidance`` times towards the
    conditional one."""
    return uncond_velocity + guidance * (cond_velocity - uncond_velocity)


@dataclass(frozen=True)
class DenoiseStep:
    """One step of the denoising loop, as a velocity model sees it."""

    index: int
    expert: int
    t: torch.Tensor  # [1], on the device: what the DiT receives
    latents: torch.Tensor
    cond: torch.Tensor  # the prompt's text states
    uncond: torch.Tensor  # the negative prompt's


class VelocityModel(Protocol):
    """What the denoising loop asks for at every step: the DiT's velocity for the prompt and, where
    the step needs it, for the negative prompt (the loop applies the guidance). Chosen when the
    pipeline is built: ``Guidance`` (the branches one after the other), ``BatchedGuidance`` (both in
    one forward), ``parallel.ParallelGuidance`` (over a process group)."""

    def branches(
        self, dit: WanDiT, cache: FlexCache, step: DenoiseStep, with_uncond: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class Guidance:
    """The guidance branches in this process, one forward each; the unconditional one only where
    the step needs it (never at guidance 1, as CFG-distilled models run)."""

    def branches(
        self, dit: WanDiT, cache: FlexCache, step: DenoiseStep, with_uncond: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        velocity = cache.forward(dit, step.expert, COND, step.index, step.latents, step.t, step.cond)
        if not with_uncond:
            return velocity, None
        return velocity, cache.forward(
            dit, step.expert, UNCOND, step.index, step.latents, step.t, step.uncond
        )


class BatchedGuidance:
    """Both guidance branches in one batch-2 forward (a profile's ``cfg_batch``); the conditional
    one alone where the step needs no unconditional velocity."""

    def branches(
        self, dit: WanDiT, cache: FlexCache, step: DenoiseStep, with_uncond: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not with_uncond:
            return cache.forward(dit, step.expert, COND, step.index, step.latents, step.t, step.cond), None
        return cache.forward_both(dit, step.expert, step.index, step.latents, step.t, step.cond, step.uncond)


def dit_tokens(model: ModelConfig, frames: int, height: int, width: int) -> int:
    """Tokens the DiT sees for a video of ``frames`` x ``height`` x ``width``: VAE stride, then patches."""
    st, sh, sw = model.vae.stride
    pt, ph, pw = model.dit.patch_size
    return ((frames - 1) // st + 1) // pt * (height // sh // ph) * (width // sw // pw)


def self_attention_shape(model: ModelConfig) -> tuple[int, int, int, int]:
    """(batch, tokens, heads, head_dim) of the self-attention at the model's default video size: the
    shape ``auto`` times its candidates on."""
    width, height = parse_size(model.sampling.size)
    tokens = dit_tokens(model, model.sampling.frames, height, width)
    return (1, tokens, model.dit.num_heads, model.dit.head_dim)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class GenerationResult:
    frames: np.ndarray  # [F, H, W, 3] uint8
    params: GenerationParams
    fps: int
    seconds: dict[str, float] = field(default_factory=dict)
    # Which expert ran at each step, and the guidance it used (Wan2.2 switches mid-run).
    expert_per_step: list[int] = field(default_factory=list)
    guidance_per_step: list[float] = field(default_factory=list)
    attention: str = ""
    # FlexCache statistics: block-stack evaluations computed and reused, peak cache bytes.
    cache: dict = field(default_factory=dict)
    cache_log: list = field(default_factory=list)  # one StepRecord per DiT evaluation
    peak_memory: dict[str, int] = field(default_factory=dict)  # GPU bytes per stage (GPU only)
    # sparge (our kernel): attention calls and the fraction of key blocks computed.
    attention_sparsity: dict | None = None
    # The LoRAs merged into the DiT: file name, sha256 prefix, strength, expert.
    loras: list[dict] = field(default_factory=list)
    gemm: str = ""  # what the DiT blocks' linear layers ran in: "fp8" or the model dtype


class WanPipeline:
    """One loaded Wan model. ``generate`` turns validated parameters into frames."""

    def __init__(
        self,
        model: ModelConfig,
        experts: list[WanDiT],
        vae: torch.nn.Module,
        text_encoder,
        device: torch.device,
        attention: AttentionBackend,
        plan: MemoryPlan | None = None,
        sparsity: SparsityStats | None = None,
        loras: list[dict] | None = None,
        velocity_model: VelocityModel | None = None,
    ):
        if len(experts) != len(model.experts):
            raise ValueError(f"{model.name} needs {len(model.experts)} DiT(s), got {len(experts)}")
        self.model = model
        self.experts = experts
        self.vae = vae
        self.text_encoder = text_encoder
        self.device = device
        self.attention = attention
        self.plan = plan or MemoryPlan(0)
        for dit in experts:
            dit.set_attention(attention)
            dit.set_token_chunks(self.plan.token_chunks)
        # Level 3+: DiT blocks stay in (pinned) CPU memory and stream in; only the active expert's
        # embeddings and head are on the device.
        self.streamers = [BlockStreamer(d.blocks, device) for d in experts] if self.plan.stream_dit else []
        self.active_expert: int | None = None
        # Block-sparse attention's statistics (our sparge kernel only), reset for every job.
        self.sparsity = sparsity
        self.loras = loras or []  # described (LoraConfig.describe), for every job's result
        self.gemm = gemm_of(experts[0])  # "fp8" or the DiT's dtype: what its block linears run in
        self.velocity_model = velocity_model or Guidance()
        if self.plan.stream_dit:
            self.activate_expert(0)

    @classmethod
    def from_checkpoint(
        cls,
        root: Path | str,
        model_name: str | None = None,
        device: torch.device | str | None = None,
        loras: Sequence[LoraConfig] = (),
        dit_files: Sequence[Path | str] = (),
        **options: Any,
    ) -> WanPipeline:
        """Load a checkpoint folder, ``loras`` merged into its DiT, ``dit_files`` (one per expert) in
        place of its DiT weights; ``options`` are ``from_weights``'s (dtype, attention, ...)."""
        weights = CheckpointWeights(open_checkpoint(root, model_name), loras, [Path(f) for f in dit_files])
        return cls.from_weights(weights, device, **options)

    @classmethod
    def from_weights(
        cls,
        weights: ModelWeights,
        device: torch.device | str | None = None,
        dtype: str = "auto",
        attention: str = "sdpa",
        low_mem_level: int = 0,
        attention_options: dict | None = None,
        compile: bool = False,
        velocity_model: VelocityModel | None = None,
        gemm: str = "dtype",
        cuda_graphs: bool = False,
    ) -> WanPipeline:
        """Build the pipeline from ``weights`` (a checkpoint's, or random ones drawn in memory), each
        module where the memory level puts it. ``attention_options`` go to the backend; ``compile``
        fuses the DiT's token-wise work with torch.compile (``pipeline.fused``); ``velocity_model``
        evaluates each step (default ``Guidance``: both branches in this process); ``gemm`` "fp8" runs
        the DiT blocks' linear layers as e4m3 products (``pipeline.fp8``; sm_89+ or the CPU);
        ``cuda_graphs`` replays the DiT forward of each input shape from a CUDA graph
        (``pipeline.cuda_graphs``)."""
        device = torch.device(device) if device is not None else default_device()
        plan = MemoryPlan(low_mem_level)
        model = weights.model
        options = dict(attention_options or {})
        if attention == "auto" and "shape" not in options:  # time the candidates at this model's shape
            options["shape"] = self_attention_shape(model)
        sparsity = None
        if attention == "sparge" and options.get("implementation") == "triton":
            sparsity = options["stats"] = SparsityStats()  # our kernel reports the blocks it computed
        backend = get_backend(attention, device, **options)  # an unavailable backend fails before loading
        if gemm == "fp8":
            require_fp8_gemm(device)
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, this pipeline runs on {device}")
        if cuda_graphs and plan.stream_dit:
            raise ValueError(f"cuda_graphs needs the DiT resident; low_mem_level {plan.level} streams it")
        torch_dtype = resolve_dtype(dtype, device)
        cpu = torch.device("cpu")
        dit_device = cpu if plan.stream_dit else device
        experts = [weights.dit(index, torch_dtype, dit_device, gemm) for index in range(len(model.experts))]
        text_encoder = weights.text_encoder(torch_dtype, cpu if plan.stream_text_encoder else device)
        if plan.stream_text_encoder:
            text_encoder.stream_to(device)
        vae = weights.vae(torch_dtype, device)
        if compile:
            for dit in experts:
                dit.compile_token_ops()
        if cuda_graphs:
            pool = torch.cuda.graph_pool_handle()  # the experts never run at once: one pool
            for dit in experts:
                dit.use_cuda_graphs(pool)
        loras = [lora.describe() for lora in weights.loras]
        return cls(model, experts, vae, text_encoder, device, backend, plan, sparsity, loras, velocity_model)

    @classmethod
    def from_profile(
        cls,
        profile: ProfileConfig,
        device: torch.device | str | None = None,
        weights: ModelWeights | None = None,
        velocity_model: VelocityModel | None = None,
    ) -> WanPipeline:
        """Run as ``profile`` says, on its checkpoint unless ``weights`` are given (a benchmark's)."""
        if weights is None:
            checkpoint = open_checkpoint(profile.checkpoint_dir, profile.model)
            weights = CheckpointWeights(checkpoint, profile.loras, profile.dit_files)
        elif weights.model.name != profile.model:
            raise ValueError(
                f"profile {profile.name} runs {profile.model}, the weights are {weights.model.name}"
            )
        if velocity_model is None and profile.cfg_batch:
            velocity_model = BatchedGuidance()
        return cls.from_weights(
            weights,
            device,
            profile.dtype,
            profile.attention,
            profile.low_mem_level,
            profile.attention_options,
            profile.compile,
            velocity_model,
            profile.gemm,
            profile.cuda_graphs,
        )

    @torch.no_grad()
    def warm_up(self) -> float:
        """One DiT forward per expert at the model's default size and frame count, before any job, and
        on CUDA one VAE decode of that size: kernels that compile or tune themselves on first use (the
        fused token-wise work of ``compile``, Triton attention kernels, cuDNN's choice, its autotuner's
        timing of the VAE's convolutions; on an H100 the first 480p decode took 3.4 s, the next 0.9 s) do
        it here, not inside a job.
        Returns the seconds it took."""
        start = time.perf_counter()
        params = validate_params({"prompt": "warm-up", "seed": 0}, self.model)
        cond, _ = self.encode_text(params)
        latents = self.initial_noise(params)
        t = torch.tensor([999], device=self.device)  # the first step's timestep
        for index, dit in enumerate(self.experts):
            self.activate_expert(index)
            dit(latents, t, cond)
        if self.device.type == "cuda":
            self.decode(latents)
        if self.sparsity is not None:
            self.sparsity.reset()  # the warm-up's blocks are no job's
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def activate_expert(self, index: int) -> None:
        """Level 3+: give the device to one expert; the others hold no device memory at all."""
        if not self.plan.stream_dit or index == self.active_expert:
            return
        for i, dit in enumerate(self.experts):
            if i != index:
                self.streamers[i].release_all()
                for module in dit.non_block_modules():
                    module.to("cpu")
        for module in self.experts[index].non_block_modules():
            module.to(self.device)
        self.active_expert = index

    def latent_shape(self, params: GenerationParams) -> tuple[int, int, int, int]:
        st, sh, sw = self.model.vae.stride
        return (self.model.vae.z_dim, (params.frames - 1) // st + 1, params.height // sh, params.width // sw)

    def estimate_job_bytes(self, params: GenerationParams) -> int:
        """Device memory this job needs on top of what is resident (see pipeline.memory)."""
        tokens = dit_tokens(self.model, params.frames, params.height, params.width)
        return estimate_job_bytes(
            self.plan.level, tokens, self.model.dit.dim, params.height, params.width, params.frames
        )

    def expert_for(self, timestep: float) -> int:
        """Index of the expert for a timestep: Wan2.2 uses the high-noise one while t >= boundary."""
        boundary = self.model.sampling.boundary
        if not self.model.is_moe:
            return 0
        return 0 if timestep >= boundary * 1000 else 1

    def guidance_for(self, expert: int, params: GenerationParams) -> float:
        return params.guidance if expert == 0 else params.guidance_low_noise

    def initial_noise(self, params: GenerationParams) -> torch.Tensor:
        # Drawn on the CPU so a seed means the same noise on every machine.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        noise = torch.randn((1, *self.latent_shape(params)), generator=generator, dtype=torch.float32)
        return noise.to(self.device)

    @torch.no_grad()
    def encode_text(self, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor]:
        cond, uncond = self.text_encoder.encode([params.prompt, params.negative_prompt])
        pad = self.experts[0].pad_context
        return pad([cond]).to(self.device), pad([uncond]).to(self.device)

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        result: GenerationResult | None = None,
    ) -> torch.Tensor:
        """The solver loop; the pipeline's velocity model evaluates each step."""
        scheduler = make_scheduler(params.solver, params.steps, params.shift, params.seed, params.timesteps)
        timesteps = scheduler.timesteps.tolist()
        cache = FlexCache(params, self.model, timesteps)
        for i, t in enumerate(timesteps):
            expert = self.expert_for(t)
            guidance = self.guidance_for(expert, params)
            self.activate_expert(expert)
            t_batch = torch.tensor([t], device=self.device)
            step = DenoiseStep(i, expert, t_batch, latents, cond, uncond)
            needs_uncond = guidance != 1.0 and cache.computes_uncond(expert, i)
            velocity, velocity_uncond = self.velocity_model.branches(
                self.experts[expert], cache, step, needs_uncond
            )
            if guidance != 1.0:
                velocity_uncond = cache.uncond_velocity(expert, i, velocity, velocity_uncond)
                velocity = apply_guidance(velocity, velocity_uncond, guidance)
            latents = scheduler.step(velocity, latents)
            if result is not None:
                result.expert_per_step.append(expert)
                result.guidance_per_step.append(guidance)
            if progress is not None:
                progress("denoise", i + 1, len(timesteps))
        if result is not None:
            result.cache = cache.stats()
            result.cache_log = cache.log
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        video = self.vae.tiled_decode(latents) if self.plan.tiled_vae else self.vae.decode(latents)
        return to_uint8_frames(video[0])

    def generate(
        self, params: GenerationParams, progress: ProgressFn | None = None, denoise: DenoiseFn | None = None
    ) -> GenerationResult:
        """Run one validated request (see ``pipeline.params.validate_params``). ``denoise`` has
        ``self.denoise``'s signature (the default); a worker group passes one that runs on all ranks."""
        denoise = denoise or self.denoise
        result = GenerationResult(
            frames=np.empty(0),
            params=params,
            fps=self.model.sampling.fps,
            attention=self.attention.implementation,
            gemm=self.gemm,
            loras=self.loras,
        )
        if self.sparsity is not None:
            self.sparsity.reset()
        with _stage("text_encode", self.device, result):
            if progress:
                progress("text_encode", 0, 1)
            cond, uncond = self.encode_text(params)
        with _stage("denoise", self.device, result):
            latents = denoise(self.initial_noise(params), cond, uncond, params, progress, result)
        with _stage("vae_decode", self.device, result):
            if progress:
                progress("vae_decode", 0, 1)
            result.frames = self.decode(latents)
        if self.sparsity is not None:
            result.attention_sparsity = self.sparsity.summary()
        return result


@contextmanager
def _stage(stage: str, device: torch.device, result: GenerationResult):
    """Wall seconds of a stage and, on a GPU, its peak memory (synchronised, so queued kernels
    count in the stage that issued them)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
        result.peak_memory[stage] = torch.cuda.max_memory_allocated(device)
    result.seconds[stage] = time.perf_counter() - start
