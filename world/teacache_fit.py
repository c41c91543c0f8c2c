"""Fit TeaCache's rescaling polynomial for the world model, from its own denoising runs.

    python -P -m smartdiff.world.teacache_fit --prompts 16

TeaCache skips the block stack while the accumulated, rescaled relative L1 change of the
timestep-modulated input (since the last computed step) stays under a threshold, and then reuses the
block stack's last residual (output minus input). The rescaling polynomial maps the input's change
to the residual's change. The published fits are for the real Wan checkpoints; this fits one for our
own weights. It runs the lossless sampler on the first ``--prompts`` prompts of the prompt set
(seed = prompt index) and, for every step after the first of every CFG branch, takes the relative
L1 change of the modulated input and of the residual from the step before. A least-squares
polynomial of ``--degree`` through those pairs is printed as JSON: ``coefficients`` (highest power
first, as ``teacache.coefficients`` in the model config wants them), the number of pairs and R^2.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from smartdiff.pipeline.config import ProfileConfig, TeaCacheConfig, load_profile
from smartdiff.pipeline.dit import WanDiT
from smartdiff.pipeline.flexcache import COND, UNCOND, FlexCache, relative_l1, teacache_input
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.wan import DenoiseStep, WanPipeline
from smartdiff.world.scenes import caption, prompt_set


class ChangeRecorder:
    """A velocity model (the guidance branches each step asks for, no caching) that records, per
    expert and branch, the change of the modulated input and of the block-stack residual from the
    step before."""

    def __init__(self, teacache: TeaCacheConfig) -> None:
        self.teacache = teacache
        self.pairs: list[tuple[float, float]] = []
        self.last: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def new_video(self) -> None:
        self.last.clear()  # changes are taken between steps of one video

    def branches(
        self, dit: WanDiT, cache: FlexCache, step: DenoiseStep, with_uncond: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        velocities = []
        for branch, context in ((COND, step.cond), (UNCOND, step.uncond))[: 2 if with_uncond else 1]:
            inputs = dit.prepare(step.latents, step.t, context)
            out = dit.run_blocks(inputs)
            modulated = teacache_input(inputs, self.teacache)
            residual = (out - inputs.x).float()
            key = (step.expert, branch)
            if key in self.last:
                old_input, old_residual = self.last[key]
                self.pairs.append((relative_l1(modulated, old_input), relative_l1(residual, old_residual)))
            self.last[key] = (modulated, residual)
            velocities.append(dit.finish(out, inputs))
        return velocities[0], velocities[1] if with_uncond else None


def recording_pipeline(
    profile: ProfileConfig, device: str | None = None
) -> tuple[WanPipeline, ChangeRecorder]:
    """The profile's pipeline with a ChangeRecorder as its velocity model."""
    recorder = ChangeRecorder(profile.model_config.teacache)
    return WanPipeline.from_profile(profile, device, velocity_model=recorder), recorder


def change_pairs(pipeline: WanPipeline, recorder: ChangeRecorder, prompts: int) -> list[tuple[float, float]]:
    """(input change, residual change) between consecutive steps, over the first ``prompts`` prompts."""
    for seed, scene in enumerate(prompt_set()[:prompts]):
        recorder.new_video()
        params = validate_params({"prompt": caption(scene), "seed": seed}, pipeline.model)
        cond, uncond = pipeline.encode_text(params)
        pipeline.denoise(pipeline.initial_noise(params), cond, uncond, params)
    return recorder.pairs


def fit(pairs: list[tuple[float, float]], degree: int) -> dict:
    """Least-squares polynomial residual change ~ input change, and how much of the variance it explains."""
    x, y = np.array(pairs).T
    coefficients = np.polyfit(x, y, degree)
    predicted = np.polyval(coefficients, x)
    r2 = 1.0 - float(np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2))
    return {"coefficients": [float(c) for c in coefficients], "pairs": len(pairs), "r2": round(r2, 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="wan-world", help="a profile of the world model")
    parser.add_argument("--prompts", type=int, default=16, help="the first N prompts of the prompt set")
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--device", help="default: CUDA when available, else the CPU")
    args = parser.parse_args(argv)
    pipeline, recorder = recording_pipeline(load_profile(args.profile), args.device)
    with torch.no_grad():
        pairs = change_pairs(pipeline, recorder, args.prompts)
    print(json.dumps({"profile": args.profile, "prompts": args.prompts, **fit(pairs, args.degree)}, indent=2))


if __name__ == "__main__":
    main()
