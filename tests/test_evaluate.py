"""The quality yardstick (world/evaluate.py) and the shipped world model it measures."""

from __future__ import annotations

import numpy as np
import pytest

from smartdiff.pipeline.checkpoint import open_checkpoint
from smartdiff.pipeline.config import load_profile
from smartdiff.world.evaluate import ATTRIBUTES, evaluate, markdown, psnr, run_variant, ssim, variants_of
from smartdiff.world.scenes import DETAIL_KINDS, MOTIONS, SHAPES, Scene, prompt_set, render


def _clip(seed: int = 0) -> np.ndarray:
    return render(Scene("circle", "red", "white", "right"), frames=5, size=48)


def test_psnr_is_infinite_for_equal_videos_and_falls_with_noise() -> None:
    clip = _clip()
    rng = np.random.default_rng(0)
    noisy = [np.clip(clip + rng.normal(0, s, clip.shape), 0, 255).astype(np.uint8) for s in (2, 8, 32)]
    assert psnr(clip, clip) == float("inf")
    values = [psnr(clip, n) for n in noisy]
    assert values[0] > values[1] > values[2] > 10
    # sigma 8 noise (clipped at 0 and 255): about 10 log10(255^2 / 64) = 30 dB before clipping.
    assert 29 < values[1] < 36


def test_ssim_is_one_for_equal_videos_symmetric_and_falls_with_noise() -> None:
    clip = _clip()
    rng = np.random.default_rng(1)
    noisy = [np.clip(clip + rng.normal(0, s, clip.shape), 0, 255).astype(np.uint8) for s in (4, 16, 64)]
    assert ssim(clip, clip) == pytest.approx(1.0)
    assert ssim(clip, noisy[1]) == pytest.approx(ssim(noisy[1], clip))
    values = [ssim(clip, n) for n in noisy]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_ssim_sees_structure_that_psnr_weighs_like_noise() -> None:
    """A shifted object and uniform brightness offset of similar MSE: SSIM punishes the shift more."""
    clip = _clip()
    shifted = np.roll(clip, 2, axis=2)
    mse = np.mean((clip.astype(float) - shifted) ** 2)
    offset = np.clip(clip.astype(float) + np.sqrt(mse), 0, 255).astype(np.uint8)
    assert ssim(clip, shifted) < ssim(clip, offset)


def test_variants_list_every_world_profile_exact_first_then_its_caches() -> None:
    names = [v.name for v in variants_of("wan-world")]
    assert names[0] == "wan-world"
    expected = {
        "wan-world+teacache",
        "wan-world+pab",
        "wan-world+cfg_cache",
        "wan-world-sage",
        "wan-world-sparge",
    }
    assert expected <= set(names)
    # More CFG cache settings: their own variants, after the default one; the default is not repeated.
    extra = variants_of("wan-world", cfg_cache=((3, 0, 900), (2, 0, 641)))
    cached = [v for v in extra if v.profile.name == "wan-world" and v.cfg_cache]
    assert [v.name for v in cached] == ["wan-world+cfg_cache", "wan-world+cfg_cache:n3:0-900"]
    assert cached[1].request_fields() == {"cfg_cache_interval": 3, "cfg_cache_start": 0, "cfg_cache_end": 900}
    with pytest.raises(ValueError, match="no profile"):
        variants_of("no-such-model")


def test_shipped_world_model_loads_through_the_normal_loader() -> None:
    profile = load_profile("wan-world")
    checkpoint = open_checkpoint(profile.checkpoint_dir)
    assert checkpoint.layout == "official"
    assert checkpoint.model.name == "wan-world"


def test_shipped_model_follows_its_prompts() -> None:
    """The first 8 prompts of the prompt set (one per motion, seed = prompt index) on the lossless
    profile: the probe reads the prompt's colour, shape, motion and background in every video."""
    scenes = prompt_set()[:8]
    assert sorted(scene.motion for scene in scenes) == sorted(MOTIONS)
    assert {scene.shape for scene in scenes} == set(SHAPES)
    run = run_variant(variants_of("wan-world")[0], {"prompts": scenes}, device="cpu")["sets"]["prompts"]
    assert run["adherence"] == dict.fromkeys(ATTRIBUTES, 1.0)
    assert set(run["by_kind"]) == set(MOTIONS)


def test_yardstick_on_the_shipped_model() -> None:
    only = ["wan-world+pab", "wan-world+cfg_cache", "wan-world-sage"]
    report = evaluate("wan-world", prompts=2, device="cpu", only=only, detail_prompts=3)
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["wan-world", *only]
    reference, pab = rows["wan-world"], rows["wan-world+pab"]
    # 25 guided steps; the CFG cache's default window (t < 641) holds 9 of them, and every other
    # one of those (4) reuses the guidance term instead of running the unconditional branch.
    assert reference["block_stacks_per_video"] == pab["block_stacks_per_video"] == 50
    assert rows["wan-world+cfg_cache"]["block_stacks_per_video"] == 46
    # The reference against itself: identical videos.
    assert reference["psnr_db"] == 99.0 and reference["ssim"] == pytest.approx(1.0)
    assert reference["speedup"] == 1.0
    # PAB reuses attention outputs: close to the reference, not equal to it.
    assert 15 < pab["psnr_db"] < 99.0 and 0.5 < pab["ssim"] < 1.0
    for row in (reference, pab):
        assert set(row["adherence"]) == {"prompts", "detail"}
        detail = row["adherence"]["detail"]
        assert set(detail["by_kind"]) == set(DETAIL_KINDS)  # the first three detail prompts: one of each
        for rates in (row["adherence"]["prompts"], detail, *detail["by_kind"].values()):
            assert all(0.0 <= rates[k] <= 1.0 for k in ATTRIBUTES)
    # No CUDA here: the 8-bit profile is reported, with the reason, not silently dropped.
    assert "CUDA" in rows["wan-world-sage"]["unavailable"]
    table = markdown(report)
    assert table.count("\n| wan-world") == 4 and "unavailable" in table
    assert "| detail shape |" in table and table.count("%") == 3 * 2 * len(ATTRIBUTES)
    assert table.count("| 46 |") == 1  # the CFG cache's block stacks a video
