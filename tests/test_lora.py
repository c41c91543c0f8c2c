"""LoRAs merged into the DiT at load, in each key format users have, on the tiny model."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from smartdiff.cli import python_module_command
from smartdiff.pipeline.checkpoint import load_dit
from smartdiff.pipeline.config import LoraConfig, load_model_config, load_profile
from smartdiff.pipeline.loading import CheckpointError
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.tiny import write_random_checkpoint
from smartdiff.pipeline.wan import WanPipeline

TINY = load_model_config("tiny")
RANK = 4
CPU = torch.device("cpu")


def base_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_dit(checkpoint, "official", TINY.dit, torch.float32, CPU).state_dict()


def merged_state(checkpoint: Path, *loras: LoraConfig) -> dict[str, torch.Tensor]:
    return load_dit(checkpoint, "official", TINY.dit, torch.float32, CPU, loras).state_dict()


def pair(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, inp, generator=g), torch.randn(out, RANK, generator=g)  # down A, up B


def write(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> LoraConfig:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return LoraConfig(path=str(path), strength=0.7)


def low_rank(down: torch.Tensor, up: torch.Tensor, strength: float, alpha: float = RANK) -> torch.Tensor:
    return (up @ down) * (strength * alpha / RANK)


def test_each_key_format_merges_exactly(tiny_checkpoint, tmp_path):
    base = base_state(tiny_checkpoint)
    q_down, q_up = pair(64, 64, 1)
    k_down, k_up = pair(64, 64, 2)
    v_down, v_up = pair(64, 64, 3)
    o_down, o_up = pair(64, 64, 4)
    ffn_down, ffn_up = pair(128, 64, 5)
    bias = torch.randn(64)
    norm = torch.randn(64)
    head = torch.randn(base["head.head.bias"].shape)
    modulation = torch.randn(base["blocks.1.modulation"].shape)
    head_modulation = torch.randn(base["head.modulation"].shape)
    formats = {
        # ComfyUI: official names under diffusion_model., lora_down/lora_up with alpha.
        "comfy": (
            {
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight": q_down,
                "diffusion_model.blocks.0.self_attn.q.lora_up.weight": q_up,
                "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(8.0),
            },
            {"blocks.0.self_attn.q.weight": low_rank(q_down, q_up, 0.7, 8.0)},
        ),
        # kohya: lora_unet_ and the module path with "_" for ".".
        "kohya": (
            {
                "lora_unet_blocks_1_cross_attn_k.lora_down.weight": k_down,
                "lora_unet_blocks_1_cross_attn_k.lora_up.weight": k_up,
                "lora_unet_blocks_1_cross_attn_k.alpha": torch.tensor(2.0),
            },
            {"blocks.1.cross_attn.k.weight": low_rank(k_down, k_up, 0.7, 2.0)},
        ),
        # Diffusers / PEFT: diffusers' module names, lora_A/lora_B, no alpha (alpha = rank).
        "diffusers": (
            {
                "transformer.blocks.0.attn1.to_v.lora_A.weight": v_down,
                "transformer.blocks.0.attn1.to_v.lora_B.weight": v_up,
                "transformer.blocks.1.ffn.net.0.proj.lora_A.weight": ffn_down,
                "transformer.blocks.1.ffn.net.0.proj.lora_B.weight": ffn_up,
            },
            {
                "blocks.0.self_attn.v.weight": low_rank(v_down, v_up, 0.7),
                "blocks.1.ffn.0.weight": low_rank(ffn_down, ffn_up, 0.7),
            },
        ),
        # LightX2V's distill LoRAs: official names, low-rank pairs plus full deltas (diff, diff_b).
        "lightx2v": (
            {
                "diffusion_model.blocks.0.self_attn.o.lora_A.weight": o_down,
                "diffusion_model.blocks.0.self_attn.o.lora_B.weight": o_up,
                "diffusion_model.blocks.0.self_attn.o.diff_b": bias,
                "diffusion_model.blocks.0.norm3.diff": norm,
                "diffusion_model.head.head.diff_b": head,
                "diffusion_model.blocks.1.modulation.diff": modulation,
                "diffusion_model.head.diff_m": head_modulation,
            },
            {
                "blocks.0.self_attn.o.weight": low_rank(o_down, o_up, 0.7),
                "blocks.0.self_attn.o.bias": bias * 0.7,
                "blocks.0.norm3.weight": norm * 0.7,
                "head.head.bias": head * 0.7,
                "blocks.1.modulation": modulation * 0.7,
                "head.modulation": head_modulation * 0.7,
            },
        ),
    }
    for name, (tensors, changes) in formats.items():
        merged = merged_state(tiny_checkpoint, write(tmp_path, name, tensors))
        for key, value in merged.items():
            expected = base[key] + changes[key] if key in changes else base[key]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_loras_stack(tiny_checkpoint, tmp_path):
    base = base_state(tiny_checkpoint)
    down, up = pair(64, 64, 7)
    key = "diffusion_model.blocks.0.self_attn.q"
    first = write(tmp_path, "first", {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    second = write(tmp_path, "second", {f"{key}.lora_down.weight": -down, f"{key}.lora_up.weight": 2 * up})
    merged = merged_state(tiny_checkpoint, first, second)
    expected = base["blocks.0.self_attn.q.weight"] + low_rank(down, up, 0.7) + low_rank(-down, 2 * up, 0.7)
    torch.testing.assert_close(merged["blocks.0.self_attn.q.weight"], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {
                "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),
                "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(64, RANK),
            },
            r"'diffusion_model.blocks.7.self_attn.q.lora_down.weight' maps to no weight of the DiT",
        ),
        (
            {
                "blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),
                "blocks.0.self_attn.q.lora_up.weight": torch.zeros(63, RANK),
            },
            r"lora_up.weight \[63, 4\] @ .*lora_down.weight \[4, 64\] "
            r"does not fit blocks.0.self_attn.q.weight \[64, 64\]",
        ),
        ({"blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 64)}, "has no partner"),
        ({"blocks.0.norm3.diff": torch.zeros(65)}, r"diff \[65\] does not fit blocks.0.norm3.weight \[64\]"),
        ({"model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 4)}, "of no known format"),
        ({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(4, 4)}, "maps to no weight"),
    ],
)
def test_what_cannot_be_merged_is_an_error_naming_it(tiny_checkpoint, tmp_path, tensors, message):
    with pytest.raises(CheckpointError, match=message):
        merged_state(tiny_checkpoint, write(tmp_path, "bad", tensors))


def test_a_wan22_lora_names_its_expert(tmp_path):
    moe = load_model_config("tiny-moe")
    root = write_random_checkpoint(tmp_path / "moe", moe, seed=2)
    down, up = pair(64, 64, 9)
    key = "diffusion_model.blocks.0.self_attn.q"
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    low = LoraConfig(path=write(tmp_path, "low", tensors).path, strength=1.0, expert="low")
    plain = WanPipeline.from_checkpoint(root, "tiny-moe", "cpu")
    tuned = WanPipeline.from_checkpoint(root, "tiny-moe", "cpu", [low])
    name = "blocks.0.self_attn.q.weight"
    assert torch.equal(plain.experts[0].state_dict()[name], tuned.experts[0].state_dict()[name])  # high
    expected = plain.experts[1].state_dict()[name] + up @ down
    torch.testing.assert_close(tuned.experts[1].state_dict()[name], expected, rtol=0, atol=1e-6)


def test_a_profile_pins_its_loras_and_the_result_lists_them(config_dir, tiny_checkpoint, tmp_path):
    down, up = pair(64, 64, 11)
    key = "diffusion_model.blocks.0.cross_attn.v"
    lora = write(tmp_path, "style", {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    (config_dir / "profiles" / "styled.yaml").write_text(
        f"name: styled\nmodel: tiny\ncheckpoint: {tiny_checkpoint}\n"
        f"loras: [{{path: {lora.path}, strength: 0.5}}]\n"
    )
    profile = load_profile("styled")
    assert profile.loras == (LoraConfig(path=lora.path, strength=0.5),)
    pipe = WanPipeline.from_profile(profile, "cpu")
    plain = WanPipeline.from_checkpoint(tiny_checkpoint, "tiny", "cpu")
    params = validate_params({"prompt": "a red ball", "seed": 1, "steps": 2}, pipe.model)
    result = pipe.generate(params)
    digest = hashlib.sha256(Path(lora.path).read_bytes()).hexdigest()[:16]
    expected = {"file": "style.safetensors", "sha256": digest, "strength": 0.5, "expert": "both"}
    assert result.loras == [expected]
    assert not np.array_equal(result.frames, plain.generate(params).frames)  # the LoRA is in the weights


def test_lora_option_parses_path_strength_and_expert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert LoraConfig.parse("style.safetensors") == LoraConfig(path=str(tmp_path / "style.safetensors"))
    assert LoraConfig.parse("a.safetensors:0.25:low") == LoraConfig(
        path=str(tmp_path / "a.safetensors"), strength=0.25, expert="low"
    )
    for bad in ("a.safetensors:strong", "a.safetensors:1:middle"):
        with pytest.raises(ValueError, match=r"PATH\[:STRENGTH\[:high\|low\|both\]\]"):
            LoraConfig.parse(bad)


def test_generate_command_merges_a_lora_from_the_working_folder(tiny_checkpoint, tmp_path):
    down, up = pair(64, 64, 13)
    key = "diffusion_model.blocks.1.self_attn.k"
    write(tmp_path, "style", {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    common = [*python_module_command("smartdiff"), "generate", "--model-dir", str(tiny_checkpoint)]
    common += ["--prompt", "a red ball", "--steps", "2", "--seed", "3", "--out", "out.mp4"]
    done = subprocess.run(
        [*common, "--lora", "style.safetensors:0.5"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(lora["file"], lora["strength"]) for lora in summary["loras"]] == [("style.safetensors", 0.5)]
    assert (tmp_path / "out.mp4").stat().st_size > 0

    missing = subprocess.run(
        [*common, "--lora", "gone.safetensors"], cwd=tmp_path, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "gone.safetensors" in missing.stderr


def test_streamed_levels_stream_the_merged_weights(tiny_checkpoint, tmp_path):
    down, up = pair(64, 64, 17)
    key = "diffusion_model.blocks.0.self_attn.v"
    lora = write(tmp_path, "style", {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    params = validate_params({"prompt": "a red ball", "seed": 2, "steps": 3}, TINY)
    resident = WanPipeline.from_checkpoint(tiny_checkpoint, "tiny", "cpu", [lora]).generate(params)
    streamed = WanPipeline.from_checkpoint(tiny_checkpoint, "tiny", "cpu", [lora], low_mem_level=3)
    assert streamed.streamers[0] is not None
    assert np.array_equal(streamed.generate(params).frames, resident.frames)
    plain = WanPipeline.from_checkpoint(tiny_checkpoint, "tiny", "cpu", low_mem_level=3).generate(params)
    assert not np.array_equal(plain.frames, resident.frames)
