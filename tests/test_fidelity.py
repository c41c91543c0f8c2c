"""Fidelity against diffusers: a Diffusers-layout checkpoint written by diffusers' own classes, loaded
through our loader, gives the same text states, the same two-step sampling loop and the same decode."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers import WanPipeline as DiffusersWanPipeline
from transformers import UMT5Config, UMT5EncoderModel

from smartdiff.pipeline.config import load_model_config
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.schedulers import SIGMA_MAX
from smartdiff.pipeline.text_encoder import TINY_VOCABULARY, load_tokenizer, write_tiny_tokenizer
from smartdiff.pipeline.vae import diffusers_vae_arguments
from smartdiff.pipeline.wan import WanPipeline

TINY = load_model_config("tiny")


class OfficialScheduleUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC on Wan's official sigma schedule (0.999 -> 0).

    diffusers' own flow default starts at 1.0 and stops at 1/1000, which is not what the official
    Wan code samples; the solver itself is the same.
    """

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        sigmas = np.linspace(SIGMA_MAX, 0, num_inference_steps + 1)[:-1]
        super().set_timesteps(device=device, sigmas=sigmas)


def randomise(module: torch.nn.Module, scale: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "gamma" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * scale / max(1, p[0].numel()) ** 0.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers pipeline, our pipeline loaded from the folder diffusers wrote)."""
    torch.manual_seed(0)
    d, t5 = TINY.dit, TINY.t5
    transformer = WanTransformer3DModel(
        patch_size=d.patch_size,
        num_attention_heads=d.num_heads,
        attention_head_dim=d.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=d.text_dim,
        freq_dim=d.freq_dim,
        ffn_dim=d.ffn_dim,
        num_layers=d.num_layers,
    )
    randomise(transformer, 1.0)
    vae = AutoencoderKLWan(**diffusers_vae_arguments(TINY.vae))
    randomise(vae, 1.0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=t5.vocab_size,
            d_model=t5.d_model,
            d_ff=t5.d_ff,
            d_kv=t5.d_kv,
            num_layers=t5.num_layers,
            num_heads=t5.num_heads,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_encoder_decoder=False,
            dropout_rate=0.0,
        )
    )
    root = tmp_path_factory.mktemp("diffusers")
    write_tiny_tokenizer(root / "tokenizer_src", TINY_VOCABULARY)
    scheduler = OfficialScheduleUniPC(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
        num_train_timesteps=1000,
        solver_order=2,
    )
    theirs = DiffusersWanPipeline(
        tokenizer=load_tokenizer(root / "tokenizer_src"),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
    )
    theirs.save_pretrained(root / "checkpoint")
    ours = WanPipeline.from_checkpoint(root / "checkpoint", device="cpu")
    return theirs.to(torch.float32), ours


def test_layout_is_detected(pair):
    _, ours = pair
    assert ours.model.name == "tiny"


def test_text_states_match(pair):
    theirs, ours = pair
    params = validate_params(
        {"prompt": "a red ball moving left", "negative_prompt": "blurry", "seed": 0}, TINY
    )
    cond, uncond = ours.encode_text(params)
    expected, expected_neg = theirs.encode_prompt(
        params.prompt, params.negative_prompt, max_sequence_length=TINY.dit.text_len, device="cpu"
    )
    assert torch.allclose(cond, expected, atol=1e-5) and torch.allclose(uncond, expected_neg, atol=1e-5)


def test_two_step_sampling_and_decode_match(pair):
    theirs, ours = pair
    params = validate_params(
        {
            "prompt": "a red ball moving left",
            "negative_prompt": "blurry",
            "seed": 3,
            "steps": 2,
            "guidance": 5.0,
            "frames": 9,
            "size": "64x64",
        },
        TINY,
    )
    cond, uncond = ours.encode_text(params)
    noise = ours.initial_noise(params)
    with torch.no_grad():
        expected = theirs(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            latents=noise.clone(),
            height=64,
            width=64,
            num_frames=9,
            num_inference_steps=2,
            guidance_scale=5.0,
            output_type="latent",
            return_dict=False,
        )[0]
        got = ours.denoise(noise.clone(), cond, uncond, params)
    scale = expected.abs().max()
    assert scale > 0.1
    assert (got - expected).abs().max() <= 1e-4 * scale

    # Decode: diffusers un-normalises with its latents_mean/std and returns [-1, 1] from vae.decode.
    mean = torch.tensor(theirs.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(theirs.vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video_theirs = theirs.vae.decode(expected * std + mean, return_dict=False)[0].clamp(-1, 1)
        video_ours = ours.vae.decode(got)
    assert video_ours.shape == (1, 3, 9, 64, 64)
    assert (video_ours - video_theirs).abs().max() <= 1e-3
