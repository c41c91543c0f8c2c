"""The quality yardstick: every acceleration profile of a model against its lossless output.

    python -P -m smartdiff.world.evaluate --model wan-world --json-out eval.json --markdown-out eval.md

For each profile of the model (``configs/profiles/*.yaml`` whose ``model`` it is) and each feature
cache the profile offers (none, then each of its ``flexcache`` strategies; the CFG cache at interval
2 in its default window, and at the settings of each ``--cfg-cache INTERVAL,START,END``), every
prompt of two fixed sets is generated with seed = its index in its set: the one-object prompts
(``world.scenes.prompt_set``) and the detail prompts (``detail_prompt_set``: two objects, small
objects, thin bars). Each video is read back by ``world.probe`` (prompt adherence: colour, shape,
motion, background; per set, and per kind of prompt) and compared with the lossless video of the
same prompt and seed (PSNR and SSIM over all frames of both sets). The lossless reference is the
first profile whose attention is exact, with no feature cache. Speed is the mean wall time of the
denoising loop per video, and the speed-up is against that reference; the block stacks a video ran
(both guidance branches) count what TeaCache and the CFG cache skip. A profile whose backend cannot
run here (e.g. an 8-bit kernel without CUDA) is listed as unavailable, with the reason.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smartdiff.pipeline.config import ProfileConfig, list_profile_names, load_profile
from smartdiff.pipeline.params import CFG_CACHE_DEFAULTS
from smartdiff.world.probe import adherence, probe
from smartdiff.world.scenes import Scene, caption, detail_kind, detail_prompt_set, prompt_set

ATTRIBUTES = ("colour", "shape", "motion", "background")


# The CFG cache is asked for by its interval: by default the yardstick runs it at this one, in the
# request's default window.
CFG_CACHE_DEFAULT = (2, CFG_CACHE_DEFAULTS["cfg_cache_start"], CFG_CACHE_DEFAULTS["cfg_cache_end"])


@dataclass(frozen=True)
class Variant:
    """One profile, run with one of the feature caches it offers: no cache, a strategy ("teacache",
    "pab") or the CFG cache at ``cfg_cache`` = (interval, start, end)."""

    profile: ProfileConfig
    flexcache: str = "none"
    cfg_cache: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        if self.cfg_cache is not None:
            interval, start, end = self.cfg_cache
            settings = "" if self.cfg_cache == CFG_CACHE_DEFAULT else f":n{interval}:{start}-{end}"
            return f"{self.profile.name}+cfg_cache{settings}"
        return self.profile.name if self.flexcache == "none" else f"{self.profile.name}+{self.flexcache}"

    def request_fields(self) -> dict:
        """What a request of this variant asks for besides its prompt and seed."""
        if self.cfg_cache is None:
            return {"flexcache": self.flexcache}
        return dict(zip(("cfg_cache_interval", "cfg_cache_start", "cfg_cache_end"), self.cfg_cache))


def variants_of(model: str, cfg_cache: tuple[tuple[int, int, int], ...] = ()) -> list[Variant]:
    """Every profile of ``model`` without a cache, then with each cache it offers (the CFG cache at
    its default settings and at each of ``cfg_cache``); exact ones first."""
    profiles = [p for p in map(load_profile, list_profile_names()) if p.model == model]
    if not profiles:
        raise ValueError(f"no profile runs model {model!r}")
    profiles.sort(key=lambda p: (p.attention != "sdpa", p.name))
    variants = []
    for profile in profiles:
        variants.append(Variant(profile))
        for cache in profile.flexcache:
            if cache != "cfg_cache":
                variants.append(Variant(profile, cache))
            else:
                settings = dict.fromkeys((CFG_CACHE_DEFAULT, *cfg_cache))  # in order, once each
                variants += [Variant(profile, cfg_cache=s) for s in settings]
    return variants


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 videos (inf when equal)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur over the two axes before the last (H, W of [..., H, W, C]); valid region."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    size = 2 * radius + 1
    h, w = x.shape[-3], x.shape[-2]
    rows = sum(taps[i] * x[..., i : h - size + 1 + i, :, :] for i in range(size))
    return sum(taps[i] * rows[..., :, i : w - size + 1 + i, :] for i in range(size))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 videos [F, H, W, 3]: Gaussian window (sigma 1.5, 11 taps), per channel,
    the constants of Wang et al. (K1 0.01, K2 0.03, range 255), averaged over frames and channels."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _gaussian_blur(x), _gaussian_blur(y)
    vx = _gaussian_blur(x * x) - mx * mx
    vy = _gaussian_blur(y * y) - my * my
    cov = _gaussian_blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index.mean())


# The prompt sets the yardstick reads: name -> (the scenes, what a scene's adherence is broken down by).
PROMPT_SETS: dict[str, tuple[Callable[[], list[Scene]], Callable[[Scene], str]]] = {
    "prompts": (prompt_set, lambda scene: scene.motion),
    "detail": (detail_prompt_set, detail_kind),
}


def adherence_rates(hits: list[dict[str, bool]]) -> dict[str, float]:
    """Per attribute, the share of ``adherence`` results that are right."""
    return {k: float(np.mean([h[k] for h in hits])) for k in ATTRIBUTES}


def run_variant(variant: Variant, scene_sets: dict[str, list[Scene]], device: str | None) -> dict:
    """Load the variant's pipeline and generate every prompt of every set (seed = index in its set);
    per set the frames, denoising times, adherence and adherence by kind."""
    from smartdiff.kernels.registry import BackendUnavailable
    from smartdiff.pipeline.params import validate_params
    from smartdiff.pipeline.wan import WanPipeline

    try:
        pipeline = WanPipeline.from_profile(variant.profile, device)
    except BackendUnavailable as error:
        return {"unavailable": str(error)}
    model = variant.profile.model_config
    sets = {}
    for set_name, scenes in scene_sets.items():
        videos, denoise_seconds, block_stacks, hits = [], [], [], []
        for seed, scene in enumerate(scenes):
            request = {"prompt": caption(scene), "seed": seed, **variant.request_fields()}
            params = validate_params(request, model, variant.profile)
            start = time.perf_counter()
            result = pipeline.generate(params)
            denoise_seconds.append(result.seconds.get("denoise", time.perf_counter() - start))
            videos.append(result.frames)
            block_stacks.append(result.cache["computed"])
            hits.append(adherence(probe(result.frames), scene))
        kind_of = PROMPT_SETS[set_name][1]
        kinds = sorted({kind_of(scene) for scene in scenes})
        sets[set_name] = {
            "videos": videos,
            "denoise_seconds": denoise_seconds,
            "block_stacks": block_stacks,
            "adherence": adherence_rates(hits),
            "by_kind": {
                kind: adherence_rates([h for h, s in zip(hits, scenes) if kind_of(s) == kind])
                for kind in kinds
            },
        }
    return {"attention": pipeline.attention.implementation, "sets": sets}


def _rounded(rates: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in rates.items()}


def evaluate(
    model: str,
    prompts: int = 48,
    device: str | None = None,
    only: list[str] | None = None,
    detail_prompts: int = 48,
    cfg_cache: tuple[tuple[int, int, int], ...] = (),
) -> dict:
    """The yardstick table for ``model`` over the first ``prompts`` prompts of the prompt set and the
    first ``detail_prompts`` of the detail prompt set; ``cfg_cache``: more (interval, start, end)
    settings of the CFG cache to run, beside its default."""
    counts = {"prompts": prompts, "detail": detail_prompts}
    scene_sets = {name: PROMPT_SETS[name][0]()[:count] for name, count in counts.items() if count > 0}
    variants = variants_of(model, cfg_cache)
    if only:
        unknown = set(only) - {v.name for v in variants}
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)} (known: {[v.name for v in variants]})")
        variants = [v for v in variants if v.name in only or v is variants[0]]
    rows, reference = [], None
    for variant in variants:
        run = run_variant(variant, scene_sets, device)
        row = {"variant": variant.name, "profile": variant.profile.name, "flexcache": variant.flexcache}
        row["cfg_cache"] = variant.cfg_cache
        if "unavailable" in run:
            rows.append({**row, "unavailable": run["unavailable"]})
            continue
        if reference is None:
            reference = run
        pairs = [
            pair
            for name, result in run["sets"].items()
            for pair in zip(result["videos"], reference["sets"][name]["videos"])
        ]
        seconds, reference_seconds = (
            np.mean([s for result in r["sets"].values() for s in result["denoise_seconds"]])
            for r in (run, reference)
        )
        rows.append(
            {
                **row,
                "attention": run["attention"],
                "denoise_s_per_video": round(float(seconds), 3),
                "speedup": round(float(reference_seconds / seconds), 3),
                # Block stacks run a video, both branches: what TeaCache and the CFG cache save.
                "block_stacks_per_video": float(
                    np.mean([n for result in run["sets"].values() for n in result["block_stacks"]])
                ),
                "adherence": {
                    name: {
                        **_rounded(result["adherence"]),
                        "by_kind": {kind: _rounded(rates) for kind, rates in result["by_kind"].items()},
                    }
                    for name, result in run["sets"].items()
                },
                "psnr_db": round(float(np.mean([min(psnr(a, b), 99.0) for a, b in pairs])), 2),
                "ssim": round(float(np.mean([ssim(a, b) for a, b in pairs])), 4),
            }
        )
    return {"model": model, "prompts": counts, "seeds": "prompt index within its set", "rows": rows}


def markdown(report: dict) -> str:
    """The table: one row per variant, adherence per set and attribute (PSNR is capped at 99 dB, which
    identical videos reach)."""
    sets = [name for name, count in report["prompts"].items() if count > 0]
    counts = ", ".join(f"{report['prompts'][name]} {name}" for name in sets)
    heads = [f"{name} {attribute}" for name in sets for attribute in ATTRIBUTES]
    lines = [
        f"Model {report['model']}; {counts} prompts, seed = prompt index within its set.",
        "",
        "| variant | denoise s/video | speed-up | block stacks/video | "
        + " | ".join(heads)
        + " | PSNR dB | SSIM |",
        "|---|---|---|---|" + "---|" * len(heads) + "---|---|",
    ]
    for row in report["rows"]:
        if "unavailable" in row:
            lines.append(
                f"| {row['variant']} | unavailable: {row['unavailable'][:80]} |" + " |" * (len(heads) + 4)
            )
            continue
        rates = [row["adherence"][name][attribute] for name in sets for attribute in ATTRIBUTES]
        lines.append(
            f"| {row['variant']} | {row['denoise_s_per_video']} | {row['speedup']}x | "
            f"{row['block_stacks_per_video']:g} | "
            + " | ".join(f"{100 * r:.0f}%" for r in rates)
            + f" | {row['psnr_db']} | {row['ssim']} |"
        )
    return "\n".join(lines) + "\n"


def _cfg_cache_setting(text: str) -> tuple[int, int, int]:
    try:
        interval, start, end = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INTERVAL,START,END, got {text!r}") from None
    return interval, start, end


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="wan-world")
    parser.add_argument("--prompts", type=int, default=48, help="the first N prompts of the prompt set")
    parser.add_argument(
        "--detail-prompts", type=int, default=48, help="the first N prompts of the detail set (0: none)"
    )
    parser.add_argument("--device", help="default: CUDA when available, else the CPU")
    parser.add_argument("--variants", help="comma-separated variant names (default: all)")
    parser.add_argument(
        "--cfg-cache",
        type=_cfg_cache_setting,
        action="append",
        default=[],
        metavar="INTERVAL,START,END",
        help="also run the CFG cache at these settings (repeatable; variant wan-world+cfg_cache:n2:0-900)",
    )
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--markdown-out", type=Path)
    args = parser.parse_args(argv)
    only = args.variants.split(",") if args.variants else None
    report = evaluate(args.model, args.prompts, args.device, only, args.detail_prompts, tuple(args.cfg_cache))
    text = json.dumps(report, indent=2)
    print(text)
    table = markdown(report)
    print(table)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    if args.markdown_out:
        args.markdown_out.write_text(table)


if __name__ == "__main__":
    main()
