"""Memory levels on the CPU: tiled VAE, block streaming bookkeeping, the prompt cache, chunked FFN."""

import numpy as np
import pytest
import torch

from smartdiff.pipeline.config import DiTConfig, VAEConfig, load_model_config
from smartdiff.pipeline.dit import WanDiT
from smartdiff.pipeline.loading import assign_weights
from smartdiff.pipeline.memory import BlockStreamer, MemoryPlan
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.tiny import random_state, write_tiny_checkpoint
from smartdiff.pipeline.vae import WanVAE, run_in_strips, strip_layout
from smartdiff.pipeline.wan import WanPipeline

TINY = load_model_config("tiny")


def tiny_vae() -> WanVAE:
    with torch.device("meta"):
        vae = WanVAE(VAEConfig(base_dim=8, num_res_blocks=1))
    return assign_weights(
        vae, random_state(vae, 10, torch.device("cpu"), torch.float32), "x", torch.float32, "cpu"
    )


def tiny_dit(layers: int = 3) -> WanDiT:
    config = DiTConfig(dim=64, ffn_dim=128, num_layers=layers, num_heads=2, text_dim=32, text_len=16)
    with torch.device("meta"):
        dit = WanDiT(config)
    return assign_weights(
        dit, random_state(dit, 3, torch.device("cpu"), torch.float32), "x", torch.float32, "cpu"
    )


def test_tiled_decode_and_encode_stay_close_to_untiled():
    vae = tiny_vae()
    vae.STRIP_LATENTS, vae.OVERLAP_LATENTS = 10, 3  # strips of 10 rows at 0, 7 and 14 of 24
    latents = torch.randn(1, 16, 2, 24, 40, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(latents)
    tiled = vae.tiled_decode(latents)
    assert tiled.shape == whole.shape == (1, 3, 5, 192, 320)
    # Stated tolerance: mean |difference| <= 0.05 on the [-1, 1] scale (about 6 of 255 levels). The
    # VAE's mid-block attention is global per frame, so tiles cannot be exact; seams are blended.
    assert (tiled - whole).abs().mean() <= 0.05
    video = whole.float()
    assert (vae.tiled_encode(video) - vae.encode(video)).abs().mean() <= 0.05 * vae.encode(
        video
    ).abs().mean() * 3


@pytest.mark.parametrize(("most", "overlap"), [(10, 3), (32, 4)])
def test_strips_cover_every_row_as_few_and_even_as_they_can(most: int, overlap: int):
    for rows in range(1, 200):
        height, starts = strip_layout(rows, most, overlap)
        assert height <= max(most, rows) and starts[0] == 0 and starts[-1] + height == rows
        assert all(b - a <= height - overlap for a, b in zip(starts, starts[1:]))
        fewer = len(starts) - 1  # one strip fewer could not cover the rows
        assert fewer == 0 or fewer * most - (fewer - 1) * overlap < rows
    height, starts = strip_layout(90, 32, 4)  # a 720p latent: 4 strips of 26 rows, 1.16x the work
    assert (height, len(starts)) == (26, 4)


def test_strip_blend_weights_sum_to_one_on_every_row():
    x = torch.randn(1, 2, 3, 23, 5, generator=torch.Generator().manual_seed(0))

    def upsample(t):  # a decoder with no reach across rows: strips must reproduce it exactly
        return t.repeat_interleave(8, -2).repeat_interleave(8, -1)

    torch.testing.assert_close(run_in_strips(upsample, x, 10, 3, 8, 1), upsample(x))
    torch.testing.assert_close(run_in_strips(lambda t: t[..., ::8, ::8], upsample(x), 10, 3, 1, 8), x)


def test_one_strip_is_exactly_the_untiled_decode():
    vae = tiny_vae()
    latents = torch.randn(1, 16, 2, 8, 8)
    assert torch.equal(vae.tiled_decode(latents), vae.decode(latents))


def test_block_streaming_order_residency_and_result():
    dit = tiny_dit(layers=3)
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([700]), torch.randn(1, 16, 32)
    with torch.no_grad():
        expected = dit(x, t, ctx)
        streamer = BlockStreamer(dit.blocks, "cpu", keep_log=True)
        first = dit(x, t, ctx)
        second = dit(x, t, ctx)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    log = streamer.log
    assert log.max_resident == 2
    # The next block is always loaded before the current one computes; each is released after.
    assert log.events[:8] == [
        ("load", 0),
        ("compute", 0),
        ("load", 1),
        ("release", 0),
        ("compute", 1),
        ("load", 2),
        ("release", 1),
        ("compute", 2),
    ]
    assert log.events[8:10] == [("release", 2), ("load", 0)]  # block 0 prefetched for the next forward
    for i, (event, block) in enumerate(log.events):
        if event == "compute":
            assert ("load", block) in log.events[:i]


def test_level_3_generates_the_same_video_and_releases_the_idle_expert(tmp_path):
    root = write_tiny_checkpoint(tmp_path / "moe", model_name="tiny-moe")
    params = {"prompt": "a red ball", "seed": 0, "frames": 1, "steps": 10, "shift": 3.0}
    plain = WanPipeline.from_checkpoint(root, device="cpu")
    streamed = WanPipeline.from_checkpoint(root, device="cpu", low_mem_level=3)
    a = plain.generate(validate_params(params, plain.model))
    b = streamed.generate(validate_params(params, streamed.model))
    assert np.array_equal(a.frames, b.frames)
    assert streamed.text_encoder.streamer is not None  # level 2 and up stream the T5 blocks too
    assert 1 in b.expert_per_step and streamed.active_expert == 1
    assert streamed.streamers[0].loaded == {}  # the high-noise expert holds nothing once idle


def test_prompt_cache_makes_repeats_free(tiny_checkpoint):
    pipe = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    encoder = pipe.text_encoder
    first = pipe.generate(validate_params({"prompt": "a red ball", "seed": 1}, TINY))
    assert encoder.encoder_runs == 1  # prompt and default negative prompt in one batch
    pipe.generate(validate_params({"prompt": "a red ball", "seed": 1}, TINY))
    assert encoder.encoder_runs == 1  # both cached
    pipe.generate(validate_params({"prompt": "a blue cube", "seed": 1}, TINY))
    assert encoder.encoder_runs == 2  # only the new prompt ran; the negative prompt came from the cache
    fresh = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    assert np.array_equal(
        fresh.generate(validate_params({"prompt": "a red ball", "seed": 1}, TINY)).frames, first.frames
    )
    encoder.cache_size = 2
    encoder.encode(["one", "two", "three"])
    assert len(encoder.cache) == 2


def test_token_chunked_blocks_match():
    dit = tiny_dit()
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([300]), torch.randn(1, 16, 32)
    with torch.no_grad():
        expected = dit(x, t, ctx)
        dit.set_token_chunks(8)
        chunked = dit(x, t, ctx)
    assert torch.allclose(chunked, expected, atol=1e-5)
    assert MemoryPlan(4).token_chunks == 8 and MemoryPlan(3).token_chunks == 1


def test_levels_are_checked():
    with pytest.raises(ValueError, match="low_mem_level must be one of"):
        MemoryPlan(5)
    plans = [MemoryPlan(level) for level in range(5)]
    assert [p.tiled_vae for p in plans] == [False, True, True, True, True]
    assert [p.stream_text_encoder for p in plans] == [False, False, True, True, True]
    assert [p.stream_dit for p in plans] == [False, False, False, True, True]


def test_the_estimate_covers_the_measured_peaks():
    from smartdiff.pipeline.memory import estimate_job_bytes

    gb = 2**30
    # Activation peaks measured on the H200 (docs/PERFORMANCE.md): stage peak minus resident weights.
    assert estimate_job_bytes(3, 32760, 1536, 480, 832, 81) >= (2.52 - 0.81) * gb  # 1.3B denoise
    assert estimate_job_bytes(3, 75600, 5120, 720, 1280, 81) >= (12.54 - 2.08) * gb  # 14B denoise
    assert estimate_job_bytes(4, 75600, 5120, 720, 1280, 81) >= (10.81 - 2.08) * gb
    assert estimate_job_bytes(0, 32760, 1536, 480, 832, 81) >= (17.65 - 15.16) * gb  # 1.3B VAE decode
    # ...and is not wildly above them (a refusal must mean something).
    assert estimate_job_bytes(3, 75600, 5120, 720, 1280, 81) <= 2 * (12.54 - 2.08) * gb
