"""Distil the world model into a 4-step CFG-free student, delivered as a LoRA on its own weights.

    python -P -m smartdiff.world.distill --out weights/wan-world-distill4

Method: trajectory distillation onto the teacher's guided ODE, for the deterministic few-step sampler
the student is served with (``distill-ode``: x_{i+1} = x_i + (s_{i+1} - s_i) v at the listed sigmas
s_0 > s_1 > ... > s_4 = 0, pipeline/schedulers.py).

1. Teacher trajectories. For each training caption (the world's training distribution, item i of
   dataset seed ``seed``: never the evaluation prompt set) and its own Gaussian noise x_0, the
   teacher (the shipped wan-world, classifier-free guidance ``guidance`` against the default
   negative prompt, as its profile samples) integrates its velocity field with ``substeps`` Euler
   steps between each pair of listed sigmas. The states X_i it passes at the listed sigmas are kept.
2. Student. The teacher plus a rank-``rank`` LoRA on every linear layer of its blocks (q, k, v, o of
   both attentions and both feed-forward layers; alpha = rank), trained CFG-free on the prompt alone
   to take each of the four jumps in one step: its velocity at (X_i, t_i) regresses onto
   (X_{i+1} - X_i) / (s_{i+1} - s_i), mean squared error, Adam, cosine learning rate, on random
   (trajectory, step) pairs. The teacher's weights stay frozen.
3. Output: ``lora.safetensors`` in the official LoRA key format (``diffusion_model.<module>.lora_down
   .weight`` / ``lora_up.weight`` / ``alpha``), which a profile merges at load (pipeline/lora.py), and
   ``training.json`` with the recipe, the loss curve and the time taken. The profile
   ``wan-world-distill4`` serves it; ``python -P -m smartdiff.world.evaluate`` scores it against the
   teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from smartdiff.pipeline.config import load_profile
from smartdiff.pipeline.dit import WanDiT
from smartdiff.pipeline.params import DEFAULT_NEGATIVE_PROMPT, validate_params
from smartdiff.pipeline.schedulers import make_scheduler
from smartdiff.pipeline.wan import WanPipeline, apply_guidance
from smartdiff.world.scenes import caption, sample_scene

LORA_FILE = "lora.safetensors"


@dataclass(frozen=True)
class DistillRecipe:
    seed: int = 1  # training captions: item i of the world dataset of this seed
    prompts: int = 512
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 3.0  # the teacher's own sampling shift
    guidance: float = 5.0  # the teacher's
    substeps: int = 8  # teacher Euler steps per student step
    rank: int = 16
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3


def student_schedule(recipe: DistillRecipe) -> tuple[list[float], list[float]]:
    """(sigmas, DiT timesteps) of the student's sampler, exactly as serving computes them."""
    scheduler = make_scheduler("distill-ode", len(recipe.timesteps), recipe.shift, timesteps=recipe.timesteps)
    return scheduler.sigmas.tolist(), scheduler.timesteps.tolist()


@torch.no_grad()
def teacher_states(
    pipeline: WanPipeline, captions: list[str], recipe: DistillRecipe, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [N, steps + 1, C, F, H, W] at the listed sigmas, prompt states [N, text_len, dim])."""
    dit, device = pipeline.experts[0], pipeline.device
    sigmas, _ = student_schedule(recipe)
    shape = pipeline.latent_shape(validate_params({"prompt": captions[0], "seed": 0}, pipeline.model))
    generator = torch.Generator("cpu").manual_seed(recipe.seed)
    negative = dit.pad_context(pipeline.text_encoder.encode([DEFAULT_NEGATIVE_PROMPT]))
    all_states, all_conds = [], []
    for start in range(0, len(captions), batch):
        cond = dit.pad_context(pipeline.text_encoder.encode(captions[start : start + batch]))
        n = len(cond)
        x = torch.randn((n, *shape), generator=generator).to(device)
        states = [x]
        context = torch.cat([cond, negative.expand(n, -1, -1)])
        for high, low in zip(sigmas, sigmas[1:], strict=False):
            grid = torch.linspace(high, low, recipe.substeps + 1).tolist()
            for s, s_next in zip(grid, grid[1:], strict=False):
                t = torch.full((2 * n,), s * 1000.0, device=device)
                velocity = dit(torch.cat([x, x]), t, context).float()
                x = x + (s_next - s) * apply_guidance(velocity[:n], velocity[n:], recipe.guidance)
            states.append(x)
        all_states.append(torch.stack(states, dim=1).cpu())
        all_conds.append(cond.cpu())
    return torch.cat(all_states), torch.cat(all_conds)


class LowRankDelta(nn.Module):
    """A parametrization W -> W + (alpha / rank) B @ A with A [rank, in] small random, B [out, rank]
    zero: the student starts as the teacher."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).to(weight.dtype)  # alpha = rank: scale 1


def add_lora(dit: WanDiT, rank: int, seed: int) -> dict[str, LowRankDelta]:
    """A trainable LowRankDelta on every linear layer of the DiT's blocks, by module name."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in dit.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            delta = LowRankDelta(module.out_features, module.in_features, rank, generator)
            delta.to(module.weight.device)  # drawn on the CPU (the same factors on every device)
            parametrize.register_parametrization(module, "weight", delta)
            deltas[name] = delta
    return deltas


def train_student(
    dit: WanDiT, states: torch.Tensor, conds: torch.Tensor, recipe: DistillRecipe, device: torch.device
) -> dict:
    """Fit the LoRA; returns the loss curve (mean per 100 steps) and the seconds it took."""
    sigmas, timesteps = student_schedule(recipe)
    deltas = add_lora(dit, recipe.rank, recipe.seed)
    params = [p for delta in deltas.values() for p in delta.parameters()]
    optimizer = torch.optim.Adam(params, lr=recipe.lr)
    generator = torch.Generator("cpu").manual_seed(recipe.seed + 1)
    steps = len(timesteps)
    gaps = torch.tensor([sigmas[i + 1] - sigmas[i] for i in range(steps)])
    curve, window, start = [], [], time.perf_counter()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:  # cosine decay to zero
            group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        sample = torch.randint(len(states), (recipe.batch,), generator=generator)
        which = torch.randint(steps, (recipe.batch,), generator=generator)
        x = states[sample, which].to(device)
        target = (states[sample, which + 1].to(device) - x) / gaps[which].to(device).view(-1, 1, 1, 1, 1)
        t = torch.tensor(timesteps, device=device)[which.to(device)]
        loss = F.mse_loss(dit(x, t, conds[sample].to(device)).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if len(window) == 100:
            curve.append(round(sum(window) / len(window), 5))
            window = []
            print(f"step {step + 1}/{recipe.steps}: loss {curve[-1]}", file=sys.stderr, flush=True)
    return {"loss_per_100_steps": curve, "seconds": round(time.perf_counter() - start, 1), "deltas": deltas}


def lora_state(deltas: dict[str, LowRankDelta]) -> dict[str, torch.Tensor]:
    """The LoRA in the official key format (ComfyUI's and LightX2V's), alpha = rank."""
    out = {}
    for name, delta in deltas.items():
        key = f"diffusion_model.{name}"
        out[f"{key}.lora_down.weight"] = delta.down.detach().float().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = delta.up.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(delta.down.shape[0]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for lora.safetensors and training.json"
    )
    parser.add_argument("--teacher", default="wan-world", help="the teacher's profile")
    parser.add_argument("--prompts", type=int, default=DistillRecipe.prompts)
    parser.add_argument("--steps", type=int, default=DistillRecipe.steps)
    parser.add_argument("--rank", type=int, default=DistillRecipe.rank)
    parser.add_argument("--device", help="default: CUDA when available, else the CPU")
    args = parser.parse_args(argv)
    recipe = DistillRecipe(prompts=args.prompts, steps=args.steps, rank=args.rank)
    torch.manual_seed(recipe.seed)

    pipeline = WanPipeline.from_profile(load_profile(args.teacher), args.device)
    captions = [caption(sample_scene(np.random.default_rng([recipe.seed, i]))) for i in range(recipe.prompts)]
    start = time.perf_counter()
    states, conds = teacher_states(pipeline, captions, recipe)
    teacher_seconds = time.perf_counter() - start
    dit = pipeline.experts[0].float().requires_grad_(False)
    result = train_student(dit, states, conds, recipe, pipeline.device)

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(lora_state(result.pop("deltas")), str(args.out / LORA_FILE))
    record = {
        "command": f"python -P -m smartdiff.world.distill --out {args.out.name} --prompts {args.prompts} "
        f"--steps {args.steps} --rank {args.rank}",
        "teacher": args.teacher,
        "recipe": asdict(recipe),
        "device": torch.cuda.get_device_name() if pipeline.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "teacher_trajectories_seconds": round(teacher_seconds, 1),
        "training": result,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
