"""Fitting TeaCache's rescaling polynomial on the world model (world/teacache_fit.py)."""

from __future__ import annotations

import math

import pytest

from smartdiff.pipeline.config import load_profile
from smartdiff.world.teacache_fit import change_pairs, fit, recording_pipeline


def test_fit_recovers_a_polynomial_and_scores_it() -> None:
    pairs = [(x / 10, 2 * (x / 10) ** 2 - 0.5 * (x / 10) + 0.1) for x in range(1, 12)]
    result = fit(pairs, degree=2)
    assert result["coefficients"] == pytest.approx([2.0, -0.5, 0.1], abs=1e-9)
    assert result["pairs"] == 11 and result["r2"] == 1.0
    noisy = [(x, y + (0.05 if i % 2 else -0.05)) for i, (x, y) in enumerate(pairs)]
    assert 0.9 < fit(noisy, degree=2)["r2"] < 1.0


def test_change_pairs_cover_every_step_after_the_first_of_both_branches() -> None:
    pipeline, recorder = recording_pipeline(load_profile("wan-world"), "cpu")
    pairs = change_pairs(pipeline, recorder, prompts=2)
    steps = pipeline.model.sampling.steps
    assert len(pairs) == 2 * 2 * (steps - 1)  # two videos, each with two branches, no pair across videos
    assert all(math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0 for x, y in pairs)
    first = pairs[: 2 * (steps - 1)]
    # The timestep embedding changes most near the end of sampling, where sigma falls fastest.
    assert max(x for x, _ in first[-4:]) > min(x for x, _ in first[:4])
