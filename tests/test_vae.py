"""The Wan2.1 VAE: official checkpoint layout, fidelity to diffusers' AutoencoderKLWan, causality."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_reference
from diffusers import AutoencoderKLWan

from smartdiff.pipeline.config import VAEConfig
from smartdiff.pipeline.loading import CheckpointError
from smartdiff.pipeline.vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    WanVAE,
    diffusers_vae_arguments,
    diffusers_vae_key_to_official,
)

# Fidelity bound against diffusers, fp32 on CPU: max |ours - theirs| <= TOLERANCE * max(1, max |theirs|).
TOLERANCE = 1e-4


def _tiny_config(num_res_blocks: int) -> VAEConfig:
    return VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=num_res_blocks)


def _diffusers_vae(config: VAEConfig, seed: int) -> AutoencoderKLWan:
    """A diffusers VAE of ``config`` with random weights everywhere, gammas and biases included."""
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**diffusers_vae_arguments(config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1, generator=generator)
            else:
                # Variance-preserving scale, so activations neither vanish nor saturate the clamp.
                fan_in = param[0].numel()
                param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
    return model.eval()


def _converted(model: AutoencoderKLWan, config: VAEConfig) -> WanVAE:
    state = {diffusers_vae_key_to_official(k, config): v for k, v in model.state_dict().items()}
    assert len(state) == len(model.state_dict()), "two diffusers keys mapped to the same name"
    ours = WanVAE(config)
    ours.load_state_dict(state, strict=True)
    return ours.eval()


@pytest.fixture(scope="module", params=[1, 2], ids=["res1", "res2"])
def pair(request: pytest.FixtureRequest) -> tuple[AutoencoderKLWan, WanVAE]:
    config = _tiny_config(request.param)
    theirs = _diffusers_vae(config, seed=request.param)
    return theirs, _converted(theirs, config)


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    assert ours.shape == theirs.shape
    diff = (ours.float() - theirs.float()).abs().max().item()
    return diff, TOLERANCE * max(1.0, theirs.abs().max().item())


def test_meta_build_matches_official_checkpoint_layout() -> None:
    expected = [(name, list(shape)) for name, shape in read_reference("wan2.1-vae").items()]
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    assert all(t.is_meta for t in vae.state_dict().values())
    got = [(name, list(t.shape)) for name, t in vae.state_dict().items()]
    missing = sorted({n for n, _ in expected} - {n for n, _ in got})
    extra = sorted({n for n, _ in got} - {n for n, _ in expected})
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    assert got == expected


def test_diffusers_default_layout_maps_onto_official_layout() -> None:
    # The real-size diffusers VAE (Wan2.1 defaults), built without memory, renamed key by key.
    with torch.device("meta"):
        theirs = AutoencoderKLWan()
        ours = WanVAE(VAEConfig())
    mapped = {diffusers_vae_key_to_official(k): list(v.shape) for k, v in theirs.state_dict().items()}
    assert mapped == {k: list(v.shape) for k, v in ours.state_dict().items()}


def test_diffusers_key_mapping_examples_and_errors() -> None:
    assert diffusers_vae_key_to_official("quant_conv.weight") == "conv1.weight"
    assert diffusers_vae_key_to_official("encoder.norm_out.gamma") == "encoder.head.0.gamma"
    assert (
        diffusers_vae_key_to_official("decoder.mid_block.resnets.1.norm2.gamma")
        == "decoder.middle.2.residual.3.gamma"
    )
    assert (
        diffusers_vae_key_to_official("decoder.up_blocks.1.upsamplers.0.time_conv.bias")
        == "decoder.upsamples.7.time_conv.bias"
    )
    # With one resnet per encoder stage, the decoder's stages hold 2 resnets and one upsample.
    assert (
        diffusers_vae_key_to_official("decoder.up_blocks.2.resnets.1.conv1.weight", _tiny_config(1))
        == "decoder.upsamples.7.residual.2.weight"
    )
    for bad in (
        "decoder.up_blocks.3.upsamplers.0.resample.1.weight",  # no upsample after the last stage
        "decoder.up_blocks.0.resnets.3.conv1.weight",
        "encoder.down_blocks.11.conv1.weight",
        "encoder.mid_block.attentions.0.to_out.weight",
        "decoder.conv_in.scale",
        "vae.encoder.conv_in.weight",
    ):
        with pytest.raises(CheckpointError, match=bad.replace(".", r"\.")):
            diffusers_vae_key_to_official(bad)


def test_unsupported_z_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="z_dim"):
        WanVAE(VAEConfig(base_dim=8, z_dim=4))


def test_decode_matches_diffusers(pair: tuple[AutoencoderKLWan, WanVAE]) -> None:
    theirs, ours = pair
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = _stats()
    video = ours.decode(latents)
    with torch.no_grad():
        expected = theirs.decode(latents * std + mean).sample
    assert video.shape == (1, 3, 9, 64, 64) and video.dtype == torch.float32
    # The comparison means something only if the output is not all clamped to +-1 or near 0.
    assert (video.abs() < 0.99).float().mean() > 0.3 and video.std() > 0.05
    diff, bound = _max_diff(video, expected)
    print(f"decode max abs diff vs diffusers: {diff:.3g}")
    assert diff <= bound


def test_encode_matches_diffusers(pair: tuple[AutoencoderKLWan, WanVAE]) -> None:
    theirs, ours = pair
    clip = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = _stats()
    latents = ours.encode(clip)
    with torch.no_grad():
        expected = (theirs.encode(clip).latent_dist.mean - mean) / std
    assert latents.shape == (1, 16, 3, 8, 8)
    assert expected.std() > 0.05
    diff, bound = _max_diff(latents, expected)
    print(f"encode max abs diff vs diffusers: {diff:.3g} (max |latent| {expected.abs().max():.3g})")
    assert diff <= bound


def test_decode_is_causal(pair: tuple[AutoencoderKLWan, WanVAE]) -> None:
    _, ours = pair
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    full = ours.decode(latents)
    torch.testing.assert_close(ours.decode(latents[:, :, :1]), full[:, :, :1], rtol=0, atol=1e-6)
    # Changing the last latent frame leaves the video frames of the earlier ones alone.
    changed = latents.clone()
    changed[:, :, 2] += 1.0
    torch.testing.assert_close(ours.decode(changed)[:, :, :5], full[:, :, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(ours.decode(changed)[:, :, 5:], full[:, :, 5:])


@pytest.mark.parametrize("chunk", [2, 3, 6])
def test_decoding_in_chunks_gives_the_frame_by_frame_video(pair, chunk: int) -> None:
    _, ours = pair
    latents = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(4))
    one_by_one = ours.decode(latents)
    ours.decode_chunk = chunk  # 5 frames after the first: the last chunk may be shorter
    try:
        chunked = ours.decode(latents)
    finally:
        ours.decode_chunk = WanVAE.DECODE_CHUNK
    assert chunked.shape == one_by_one.shape == (1, 3, 21, 64, 64)
    torch.testing.assert_close(chunked, one_by_one, rtol=0, atol=1e-5)


def test_encode_is_causal(pair: tuple[AutoencoderKLWan, WanVAE]) -> None:
    _, ours = pair
    clip = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    full = ours.encode(clip)
    torch.testing.assert_close(ours.encode(clip[:, :, :5]), full[:, :, :2], rtol=0, atol=1e-5)


def test_decode_is_reentrant_and_leaves_no_state(pair: tuple[AutoencoderKLWan, WanVAE]) -> None:
    # A fresh copy: the shared fixture has run calls already, so state left behind would be there too.
    ours = WanVAE(pair[1].config).eval()
    ours.load_state_dict(pair[1].state_dict())
    latents = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    attributes = {name: set(vars(m)) for name, m in ours.named_modules()}
    first = ours.decode(latents)
    ours.encode(torch.zeros(1, 3, 5, 64, 64))  # an unrelated call in between must not matter
    second = ours.decode(latents)
    assert torch.equal(first, second)
    assert {name: set(vars(m)) for name, m in ours.named_modules()} == attributes


def test_bfloat16_runs_in_parameter_dtype(pair: tuple[AutoencoderKLWan, WanVAE]) -> None:
    _, ours = pair
    config = ours.config
    low = WanVAE(config).to(torch.bfloat16).eval()
    low.load_state_dict(ours.state_dict())
    latents = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    video = low.decode(latents)
    assert video.dtype == torch.bfloat16 and video.shape == (1, 3, 5, 64, 64)
    assert (video.float() - ours.decode(latents)).abs().mean() < 0.05
    assert low.encode(video.float()).shape == (1, 16, 2, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the channels-last path runs on CUDA")
def test_gpu_path_matches_the_cpu(pair: tuple[AutoencoderKLWan, WanVAE]) -> None:
    """On CUDA the VAE runs channels-last, its fused norm writing each causal convolution's window,
    with batch 2 and chunks of 2 latent frames: the CPU's video and latents, in fp32 with TF32 off
    (with TF32 convolutions the encoder's error passed 5e-3 of the latents' range on an H100)."""
    _, ours = pair
    gpu = WanVAE(ours.config).eval()
    gpu.load_state_dict(ours.state_dict())
    gpu = gpu.cuda().to_channels_last()
    latents = torch.randn(2, 16, 4, 8, 10, generator=torch.Generator().manual_seed(5))
    clip = torch.rand(2, 3, 9, 64, 80, generator=torch.Generator().manual_seed(6)) * 2 - 1
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        video, encoded = gpu.decode(latents.cuda()), gpu.encode(clip.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert video.is_contiguous() and video.shape == (2, 3, 13, 64, 80) and encoded.is_contiguous()
    for got, expected in ((video, ours.decode(latents)), (encoded, ours.encode(clip))):
        diff, bound = _max_diff(got.cpu(), expected)
        assert diff <= 10 * bound, diff
