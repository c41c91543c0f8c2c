"""Train the world model: a small Wan (our own VAE, UMT5 and DiT classes) on the procedural world.

    python -P -m smartdiff.world.train --out weights/wan-world

The whole recipe is ``Recipe``: data seed and size, then two stages.

1. VAE: reconstruction (L1 + MSE, and L1 of neighbouring pixels' differences) of rendered clips plus
   a small KL term on the *normalised* latents, so that what ``WanVAE.encode`` returns (the official
   per-channel statistics applied) is close to unit scale, as the diffusion model expects.
2. Text encoder and DiT together, on the VAE's posterior means of every clip: rectified-flow matching
   (x_t = (1 - s) x_0 + s e, target e - x_0, timestep 1000 s, s drawn uniformly and then shifted as
   the sampler shifts it). A caption is replaced by the default negative prompt with probability
   ``caption_dropout``, so classifier-free guidance has the unconditional branch it will be asked for.
   The weights kept are an exponential moving average.

It writes an official-layout checkpoint (``pipeline.checkpoint`` loads it like any other) and
``training.json`` with the recipe, the loss curves and the time each stage took.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from smartdiff.pipeline.checkpoint import T5_FILE, TOKENIZER_DIR, VAE_FILE
from smartdiff.pipeline.config import ModelConfig, load_model_config
from smartdiff.pipeline.dit import FP32_PARAMETERS, WanDiT
from smartdiff.pipeline.loading import assign_weights, read_weights
from smartdiff.pipeline.params import DEFAULT_NEGATIVE_PROMPT
from smartdiff.pipeline.text_encoder import (
    TextEncoder,
    build_text_encoder,
    hf_t5_key_to_official,
    load_official_t5_state,
    load_tokenizer,
    write_tiny_tokenizer,
)
from smartdiff.pipeline.tiny import dit_config_json, random_state
from smartdiff.pipeline.vae import WanVAE
from smartdiff.pipeline.video import to_uint8_frames
from smartdiff.world.evaluate import adherence_rates, psnr
from smartdiff.world.probe import adherence, probe
from smartdiff.world.scenes import Scene, clip, detail_prompt_set, prompt_set, render, vocabulary

MODEL = "wan-world"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    clips: int = 16000  # distinct training clips: item i is world clip (seed, i)
    detail_fraction: float = 0.0  # share of clips that are detail scenes (bars, small objects, pairs)
    frames: int = 17
    size: int = 64
    vae_steps: int = 4000
    vae_batch: int = 16
    # Whole clips: every causal chunk, each with the cache its predecessor leaves. Trained on 5 frames
    # (frame 0 and one chunk), a VAE decoded held-out frames 0-4 at ~25 dB and frames 10-16 at ~10 dB.
    vae_frames: int = 17
    object_weight: float = 10.0
    # Weight of the error in pixel differences (edges): a blurred outline costs the pixel error little
    # (a circle and a square of the same size differ in a few percent of their pixels), so without it
    # the VAE settles for rounded blobs (held-out shape 50% without it, 55% at 10, after the same
    # 1,000 steps; docs/PERFORMANCE.md). Reports written before it existed trained without it.
    edge_weight: float = 10.0
    decoder_steps: int = 3000  # the "decoder" stage: refinement on frozen latents
    vae_lr: float = 2e-4  # 1e-3 can collapse to a constant output; see PERFORMANCE.md
    kl_weight: float = 1e-6
    dit_steps: int = 2500
    dit_batch: int = 1024
    dit_lr: float = 4e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    shift: float = 3.0  # the model config's sampling shift: train where the sampler will look
    ema: float = 0.999
    check_clips: int = 96  # held-out clips the VAE's reconstructions are probed on

    def __post_init__(self) -> None:
        if not 1 <= self.vae_frames <= self.frames:
            raise ValueError(f"vae_frames must be 1 to frames ({self.frames}), got {self.vae_frames}")


def render_clips(recipe: Recipe, workers: int) -> tuple[np.ndarray, list[str]]:
    """Every training clip, uint8 [N, F, H, W, 3], and its caption (rendered in ``workers`` processes)."""
    jobs = [(recipe.seed, i, recipe.frames, recipe.size, recipe.detail_fraction) for i in range(recipe.clips)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            items = pool.starmap(clip, jobs, chunksize=64)
    else:
        items = [clip(*job) for job in jobs]
    return np.stack([video for _, video, _ in items]), [text for text, _, _ in items]


def to_video(clips: torch.Tensor) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1]."""
    return clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def lr_at(step: int, progress: float, recipe: Recipe, peak: float) -> float:
    """Linear warm-up over ``recipe.warmup`` steps, then cosine decay to a tenth of the peak as the
    stage's ``progress`` (0 to 1) runs out."""
    if step < recipe.warmup:
        return peak * (step + 1) / recipe.warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


class EMA:
    """Exponential moving average of a set of modules' parameters."""

    def __init__(self, modules: list[nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def run_steps(
    name: str,
    steps: int,
    loss_fn: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    peak_lr: float,
    recipe: Recipe,
    params: list[nn.Parameter],
    ema: EMA | None = None,
    time_limit: float | None = None,
) -> dict:
    """The optimisation loop shared by both stages; returns the loss curve (mean per 100 steps).

    With ``time_limit`` (seconds) it stops early once that is spent; the log says how many steps ran.
    The learning rate decays with the progress through the steps or through the time, whichever is
    further along: a stage cut short by its time limit still ends at the low rate.
    """
    curve, window, start = [], [], time.perf_counter()
    for step in range(steps):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            print(f"{name}: time limit reached after {step} of {steps} steps")
            steps = step
            break
        progress = step / steps
        if time_limit is not None:
            progress = max(progress, (time.perf_counter() - start) / time_limit)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, recipe, peak_lr)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            ema.update(step)
        window.append(loss.detach())
        if len(window) == 100:
            curve.append(torch.stack(window).mean().item())
            window = []
            elapsed = time.perf_counter() - start
            print(f"{name} step {step + 1}/{steps} loss {curve[-1]:.5f} ({elapsed:.0f} s)")
    if window:
        curve.append(torch.stack(window).mean().item())
    return {"steps": steps, "seconds": time.perf_counter() - start, "loss_per_100_steps": curve}


def train_vae(
    vae: WanVAE,
    clips: torch.Tensor,
    recipe: Recipe,
    generator: torch.Generator,
    time_limit: float | None,
    decoder_only: bool = False,
) -> dict:
    """The VAE stage. ``decoder_only`` refines the decoder on the frozen encoder's latents: the
    latents a DiT was trained on stay valid, only how they are drawn improves."""
    device = vae.device
    steps = recipe.decoder_steps if decoder_only else recipe.vae_steps
    trained = [vae.conv2, vae.decoder] if decoder_only else [vae]
    params = [p for m in trained for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.vae_lr, weight_decay=0.0)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(len(clips), (recipe.vae_batch,), generator=generator, device=device).cpu()
        starts = recipe.frames - recipe.vae_frames + 1
        start = int(torch.randint(starts, (1,), generator=generator, device=device))
        video = to_video(clips[index, start : start + recipe.vae_frames].to(device))
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            with torch.set_grad_enabled(not decoder_only):
                mean, log_var = vae.posterior(video)
            noise = torch.randn(mean.shape, generator=generator, device=device)
            z = mean + torch.exp(0.5 * log_var) * noise
            recon = vae.reconstruct(z).float()
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).mean()
        # The shape covers a few percent of the frame: weight its pixels up, or the VAE settles for
        # reproducing the background alone. The background is the clip's corner colour.
        background = video[:, :, :1, :1, :1]
        weight = 1 + recipe.object_weight * (video - background).abs().amax(1, keepdim=True).gt(0.1)
        error = (recon - video).abs()
        pixels = ((error + error.square()) * weight).mean()
        return pixels + recipe.edge_weight * edge_error(recon, video) + recipe.kl_weight * kl

    log = run_steps(
        "decoder" if decoder_only else "vae",
        steps,
        loss_fn,
        optimizer,
        recipe.vae_lr,
        recipe,
        params,
        time_limit=time_limit,
    )
    vae.eval()
    log.update(reconstruction_check(vae, recipe))
    return log


def edge_error(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the horizontal and vertical neighbour differences of [B, C, F, H, W]."""
    return sum((recon.diff(dim=d) - video.diff(dim=d)).abs().mean() for d in (-1, -2))


@torch.no_grad()
def _reconstruct(vae: WanVAE, clips: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The VAE's round trip of uint8 clips [N, F, H, W, 3], and the latents between."""
    latents = vae.encode(to_video(torch.from_numpy(clips).to(vae.device)))
    return np.stack([to_uint8_frames(v) for v in vae.decode(latents)]), latents


def _agreement(frames: np.ndarray, scenes: list[Scene]) -> dict[str, float]:
    return adherence_rates([adherence(probe(f), scene) for f, scene in zip(frames, scenes)])


def reconstruction_check(vae: WanVAE, recipe: Recipe) -> dict:
    """PSNR, latent scale and probe agreement of the VAE's reconstructions of clips it never saw, and
    the probe's agreement on its reconstructions of the yardstick's two prompt sets (drawn exactly):
    what the DiT can reach at best there."""
    items = [
        clip(recipe.seed + 1, i, recipe.frames, recipe.size, recipe.detail_fraction)
        for i in range(recipe.check_clips)
    ]
    clips = np.stack([v for _, v, _ in items])
    frames, latents = _reconstruct(vae, clips)
    report = {
        "held_out_psnr_db": psnr(frames, clips),
        # Per frame: a VAE that only ever saw the first chunks decodes the later ones badly.
        "held_out_psnr_db_per_frame": [psnr(frames[:, f], clips[:, f]) for f in range(recipe.frames)],
        "latent_std": latents.std().item(),
        "held_out_probe_agreement": _agreement(frames, [scene for _, _, scene in items]),
    }
    for name, scenes in (("prompt_set", prompt_set()), ("detail_prompt_set", detail_prompt_set())):
        truth = np.stack([render(scene, recipe.frames, recipe.size) for scene in scenes])
        report[f"{name}_probe_agreement"] = _agreement(_reconstruct(vae, truth)[0], scenes)
    return report


@torch.no_grad()
def encode_all(vae: WanVAE, clips: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat(
        [vae.encode(to_video(clips[i : i + batch].to(vae.device))) for i in range(0, len(clips), batch)]
    )


def text_context(text_encoder: TextEncoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the pipeline feeds the DiT (states trimmed to each prompt's tokens, zero padded to
    text_len), as one batched, differentiable op instead of a trim and a pad per prompt."""
    hidden = text_encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def train_dit(
    dit: WanDiT,
    text_encoder: TextEncoder,
    latents: torch.Tensor,
    captions: list[str],
    recipe: Recipe,
    generator: torch.Generator,
    time_limit: float | None,
) -> dict:
    device = latents.device
    modules = [dit, text_encoder.model]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.dit_lr, weight_decay=0.01)
    ema = EMA(modules, recipe.ema)

    # Row -1 is the default negative prompt: a dropped caption is replaced by it.
    ids, mask = (t.to(device) for t in text_encoder.tokenize(captions + [DEFAULT_NEGATIVE_PROMPT]))
    batch = recipe.dit_batch

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(len(latents), (batch,), generator=generator, device=device)
        drop = torch.rand(batch, generator=generator, device=device) < recipe.caption_dropout
        text_index = torch.where(drop, len(captions), index)
        x0 = latents[index]
        u = torch.rand(batch, generator=generator, device=device)
        sigma = recipe.shift * u / (1 + (recipe.shift - 1) * u)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            context = text_context(text_encoder, ids[text_index], mask[text_index])
            prediction = dit(xt, sigma * 1000, context)
        return F.mse_loss(prediction.float(), noise - x0)

    log = run_steps(
        "dit",
        recipe.dit_steps,
        loss_fn,
        optimizer,
        recipe.dit_lr,
        recipe,
        params,
        ema,
        time_limit,
    )
    ema.copy_to_model()
    return log


def compact(
    state: dict[str, torch.Tensor], keep_fp32: re.Pattern[str] | None = None
) -> dict[str, torch.Tensor]:
    """bf16 copies for the shipped files, but for names matching ``keep_fp32``."""
    return {
        k: v.detach()
        .cpu()
        .contiguous()
        .to(torch.float32 if keep_fp32 and keep_fp32.search(k) else torch.bfloat16)
        for k, v in state.items()
    }


def save_dit_and_text_encoder(root: Path, model: ModelConfig, dit: WanDiT, text_encoder: TextEncoder) -> None:
    """Official layout. The DiT's modulation path stays fp32, as the loader keeps it."""
    save_file(compact(dit.state_dict(), FP32_PARAMETERS), root / "diffusion_pytorch_model.safetensors")
    (root / "config.json").write_text(json.dumps(dit_config_json(model), indent=2) + "\n")
    t5_state = compact(text_encoder.model.state_dict())
    torch.save({hf_t5_key_to_official(k): v for k, v in t5_state.items()}, root / T5_FILE)


def new_text_encoder(model: ModelConfig, tokenizer_dir: Path, seed: int, device: torch.device) -> TextEncoder:
    """A randomly initialised, trainable UMT5 with the world's word-level tokenizer (written to disk)."""
    write_tiny_tokenizer(tokenizer_dir, vocabulary())
    t5 = build_text_encoder(model.t5)  # on the meta device
    assign_weights(
        t5, random_state(t5, seed, torch.device("cpu"), torch.float32), "init", torch.float32, device
    )
    return TextEncoder(t5.requires_grad_(True), load_tokenizer(tokenizer_dir), model.dit.text_len)


def train(
    recipe: Recipe,
    out: Path,
    device: torch.device,
    workers: int,
    time_limit: float | None = None,
    stages: tuple[str, ...] = ("vae", "dit"),
    init: Path | None = None,
) -> dict:
    """Run ``stages`` and write what they produce to ``out``.

    ``time_limit`` (seconds) caps each stage's optimisation loop. ``init`` is a checkpoint to start
    from (e.g. the shipped weights) instead of random weights. A VAE that no stage trains is read from
    ``init``, else from ``out`` (an earlier "vae" run there: stages may run on different machines).
    """
    torch.manual_seed(recipe.seed)
    generator = torch.Generator(device).manual_seed(recipe.seed)  # all draws on the device: no copies
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest 3D convolutions
    model = load_model_config(MODEL)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "recipe": asdict(recipe),
        "model": MODEL,
        "stages": list(stages),
        "torch": torch.__version__,
    }
    report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    start = time.perf_counter()
    video, captions = render_clips(recipe, workers)
    clips = torch.from_numpy(video)
    report["render_seconds"] = time.perf_counter() - start

    report["init"] = str(init) if init else None
    vae = WanVAE(model.vae).to(device)
    if device.type == "cuda":
        vae.to_channels_last()
    report["vae_parameters"] = sum(p.numel() for p in vae.parameters())
    if init is not None or "vae" not in stages:
        vae.load_state_dict(read_weights((init or out) / VAE_FILE))
    if "vae" in stages:
        report["vae"] = train_vae(vae.train(), clips, recipe, generator, time_limit)
        torch.save(compact(vae.state_dict()), out / VAE_FILE)
    else:
        report["vae"] = reconstruction_check(vae.eval(), recipe)
    if "decoder" in stages:
        report["decoder"] = train_vae(vae.train(), clips, recipe, generator, time_limit, decoder_only=True)
        torch.save(compact(vae.state_dict()), out / VAE_FILE)
    if "dit" in stages:
        start = time.perf_counter()
        latents = encode_all(vae.eval(), clips)
        report["encode_seconds"] = time.perf_counter() - start
        del clips
        text_encoder = new_text_encoder(model, out / TOKENIZER_DIR, recipe.seed, device)
        dit = WanDiT(model.dit).to(device)
        if init is not None:
            dit.load_state_dict(read_weights(init / "diffusion_pytorch_model.safetensors"))
            text_encoder.model.load_state_dict(load_official_t5_state(init / T5_FILE))
        report["dit_parameters"] = sum(p.numel() for p in dit.parameters())
        report["t5_parameters"] = sum(p.numel() for p in text_encoder.model.parameters())
        report["dit"] = train_dit(dit.train(), text_encoder, latents, captions, recipe, generator, time_limit)
        save_dit_and_text_encoder(out, model, dit.eval(), text_encoder)
    (out / f"training-{'-'.join(stages)}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=min(16, multiprocessing.cpu_count()))
    parser.add_argument("--init", type=Path, help="start from this checkpoint (e.g. weights/wan-world)")
    parser.add_argument("--time-limit", type=float, help="seconds per stage; stops a stage early")
    parser.add_argument(
        "--stages",
        default="vae,dit",
        help="comma-separated, in order: vae, decoder (refine on frozen latents), dit; "
        "without vae the VAE is read from --out",
    )
    for field_name, default in asdict(Recipe()).items():
        parser.add_argument(f"--{field_name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    recipe = Recipe(**{name: getattr(args, name) for name in asdict(Recipe())})
    stages = tuple(args.stages.split(","))
    report = train(
        recipe, args.out, torch.device(args.device), args.workers, args.time_limit, stages, args.init
    )
    print(json.dumps({k: v for k, v in report.items() if k not in ("vae", "dit")}, indent=2))


if __name__ == "__main__":
    main()
