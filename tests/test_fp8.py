"""fp8 weights and products (pipeline/fp8.py) on the CPU: the rounding bound, the product, the
checkpoint formats users share, LoRAs before quantisation, and a whole video with gemm fp8."""

from __future__ import annotations

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
from smartdiff.pipeline.fp8 import (
    FP8,
    RELATIVE_ERROR,
    SUBNORMAL_ERROR,
    FP8Linear,
    QuantizedRows,
    dequantize_rows,
    quantize_rows,
    require_fp8_gemm,
)
from smartdiff.pipeline.loading import read_safetensors
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.wan import WanPipeline

TINY = load_model_config("tiny")
CPU = torch.device("cpu")
LINEAR = "blocks.0.self_attn.q.weight"


def test_round_trip_stays_within_the_stated_bound():
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, each with values spread over six decades.
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    w *= torch.logspace(-6, 0, 256)[torch.randperm(256, generator=g)]
    values, scale = quantize_rows(w)
    assert values.dtype == FP8 and scale.shape == (64, 1)
    error = (dequantize_rows(values, scale) - w).abs()
    bound = torch.maximum(RELATIVE_ERROR * w.abs(), SUBNORMAL_ERROR * scale)
    assert bool((error <= bound * (1 + 1e-6)).all())
    # The bound is the real one, not a loose one: some element comes close to it.
    normal = w.abs() >= 2.0**-6 * scale
    assert (error[normal] / w.abs()[normal]).max() > 0.5 * RELATIVE_ERROR
    # The largest element of each row maps to e4m3's largest value, exactly.
    assert torch.equal(values.float().abs().amax(dim=1), torch.full((64,), 448.0))


def test_fp8_linear_is_the_scaled_product():
    g = torch.Generator().manual_seed(1)
    w, bias, x = (
        torch.randn(48, 64, generator=g),
        torch.randn(48, generator=g),
        torch.randn(2, 5, 64, generator=g),
    )
    layer = FP8Linear(64, 48)
    values, scale = quantize_rows(w)
    layer.load_state_dict({"weight": values, "weight_scale": scale.reshape(-1), "bias": bias})
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == x.dtype
    xq, xs = quantize_rows(x.reshape(-1, 64))
    expected = dequantize_rows(xq, xs) @ dequantize_rows(values, scale).T + bias
    torch.testing.assert_close(out.reshape(-1, 48), expected, rtol=1e-5, atol=1e-4)
    exact = torch.nn.functional.linear(x, w, bias)
    relative = (out - exact).norm() / exact.norm()
    assert 1e-4 < relative < 0.05  # fp8, so not exact; within a few percent
    # Rows quantised where they were computed give the same product; the GELU needs the tensor.
    rows = QuantizedRows.of((xq, xs), x)
    assert torch.equal(layer(rows), out)
    with pytest.raises(ValueError, match="the GELU is applied while quantising"):
        layer(rows, gelu=True)


def tiny_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(checkpoint / "diffusion_pytorch_model.safetensors")


def block_linears(state: dict[str, torch.Tensor]) -> list[str]:
    attention = (".self_attn.", ".cross_attn.")
    names = [k for k in state if k.startswith("blocks.") and k.endswith(".weight") and state[k].dim() == 2]
    return [k for k in names if any(part in k for part in attention) or ".ffn." in k]


def lightx2v_file(state: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LightX2V's scaled fp8: e4m3 block linears with weight_scale [out, 1], the rest in bf16."""
    out, quantized = {}, {}
    for key, tensor in state.items():
        if key in block_linears(state):
            values, scale = quantize_rows(tensor)
            out[key], out[f"{key}_scale"] = values, scale
            quantized[key] = (values, scale)
        else:
            out[key] = tensor.to(torch.bfloat16)
    save_file(out, str(path))
    return quantized


def comfy_file(state: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ComfyUI's scaled_fp8: a marker, one scale per tensor, a static input scale, and the prefix."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    quantized = {}
    for key, tensor in state.items():
        name = f"model.diffusion_model.{key}"
        if key in block_linears(state):
            scale = tensor.abs().max() / 448.0
            values = (tensor / scale).to(FP8)
            module = name.removesuffix(".weight")
            out[name], out[f"{module}.scale_weight"] = values, scale.reshape(1)
            out[f"{module}.scale_input"] = torch.ones(1)
            quantized[key] = (values, scale.expand(tensor.shape[0]))
        else:
            out[name] = tensor.to(torch.bfloat16)
    save_file(out, str(path))
    return quantized


@pytest.mark.parametrize("write", [lightx2v_file, comfy_file], ids=["lightx2v", "comfyui"])
def test_fp8_checkpoints_load_as_written(tiny_checkpoint, tmp_path, write):
    state = tiny_state(tiny_checkpoint)
    path = tmp_path / "dit_fp8.safetensors"
    quantized = write(state, path)
    # gemm fp8: the file's e4m3 bytes and scales, untouched.
    dit = load_dit(path, None, TINY.dit, torch.float32, CPU, gemm="fp8")
    for key, (values, scale) in quantized.items():
        module = dit.get_submodule(key.removesuffix(".weight"))
        assert isinstance(module, FP8Linear)
        assert torch.equal(module.weight.view(torch.uint8), values.view(torch.uint8))
        torch.testing.assert_close(module.weight_scale, scale.reshape(-1).float(), rtol=0, atol=0)
    # gemm dtype: dequantised into the model dtype, the rest as stored.
    plain = load_dit(path, None, TINY.dit, torch.float32, CPU).state_dict()
    for key, (values, scale) in quantized.items():
        torch.testing.assert_close(plain[key], dequantize_rows(values, scale), rtol=0, atol=0)
    bias = "blocks.0.self_attn.q.bias"
    torch.testing.assert_close(plain[bias], state[bias].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_loras_merge_before_quantisation(tiny_checkpoint, tmp_path):
    state = tiny_state(tiny_checkpoint)
    path = tmp_path / "dit_fp8.safetensors"
    values, scale = lightx2v_file(state, path)[LINEAR]
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    lora = tmp_path / "lora.safetensors"
    save_file(
        {"blocks.0.self_attn.q.lora_down.weight": down, "blocks.0.self_attn.q.lora_up.weight": up}, str(lora)
    )
    dit = load_dit(path, None, TINY.dit, torch.float32, CPU, [LoraConfig(path=str(lora))], gemm="fp8")
    module = dit.get_submodule("blocks.0.self_attn.q")
    expected_values, expected_scale = quantize_rows(dequantize_rows(values, scale) + up @ down)
    assert torch.equal(module.weight.view(torch.uint8), expected_values.view(torch.uint8))
    torch.testing.assert_close(module.weight_scale, expected_scale.reshape(-1), rtol=0, atol=0)


def test_a_video_with_fp8_products(tiny_checkpoint):
    params = validate_params({"prompt": "a red ball", "seed": 1, "steps": 4}, TINY)
    plain = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    fp8 = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu", gemm="fp8")
    linears = [m for m in fp8.experts[0].modules() if isinstance(m, FP8Linear)]
    assert len(linears) == 10 * TINY.dit.num_layers  # q, k, v, o twice, and the two FFN layers per block
    a, b = plain.generate(params).frames, fp8.generate(params).frames
    assert not np.array_equal(a, b)
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 3.0  # out of 255: the same video
    streamed = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu", gemm="fp8", low_mem_level=3)
    assert np.array_equal(streamed.generate(params).frames, b)  # streamed blocks keep their fp8 state


def test_fp8_needs_a_device_with_fp8_products():
    require_fp8_gemm(CPU)  # torch's reference kernel
    with pytest.raises(ValueError, match="gemm fp8 needs fp8 tensor cores"):
        require_fp8_gemm(torch.device("meta"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("gemm: int4\n", "gemm 'int4' is not one of dtype, fp8"),
        ("dit_weights: [a.safetensors, b.safetensors]\n", "dit_weights: 2 files for 1 DiT"),
    ],
)
def test_bad_fp8_settings_fail_the_profile_load(config_dir, extra, message):
    (config_dir / "profiles" / "bad.yaml").write_text(f"name: bad\nmodel: tiny\ncheckpoint: tiny\n{extra}")
    with pytest.raises(ValueError, match=message):
        load_profile("bad")


def test_a_profile_serves_an_fp8_file_in_place_of_the_checkpoints_dit(config_dir, tiny_checkpoint, tmp_path):
    path = tmp_path / "dit_fp8.safetensors"
    lightx2v_file(tiny_state(tiny_checkpoint), path)
    (config_dir / "profiles" / "fp8.yaml").write_text(
        f"name: fp8\nmodel: tiny\ncheckpoint: {tiny_checkpoint}\ndit_weights: [{path}]\ngemm: fp8\n"
    )
    pipe = WanPipeline.from_profile(load_profile("fp8"), "cpu")
    assert isinstance(pipe.experts[0].get_submodule("blocks.1.ffn.2"), FP8Linear)
    frames = pipe.generate(validate_params({"prompt": "x", "seed": 0, "steps": 2}, TINY)).frames
    assert frames.shape == (9, 64, 64, 3)


def test_generate_runs_an_fp8_file_with_fp8_products(tiny_checkpoint, tmp_path):
    path = tmp_path / "dit_fp8.safetensors"
    comfy_file(tiny_state(tiny_checkpoint), path)

    def generate(gemm: str) -> str:
        command = [*python_module_command("smartdiff"), "generate", "--model-dir", str(tiny_checkpoint)]
        command += ["--dit-weights", str(path), "--gemm", gemm, "--prompt", "x", "--steps", "2"]
        done = subprocess.run(
            [*command, "--out", f"{gemm}.mp4"], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["gemm"]

    assert generate("fp8") == "fp8"
    assert generate("dtype") == "float32"  # the file's weights dequantised, on the CPU


def test_fp8_blocks_quantise_their_normalised_inputs_inside_the_norm(tiny_checkpoint, monkeypatch):
    """q/k/v, the cross-attention's q and the first feed-forward layer read e4m3 rows made by their
    norm (pipeline.fused.*_fp8): the same numbers as when each linear quantises the norm's output."""
    from smartdiff.pipeline import fp8

    pipe = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu", gemm="fp8")
    params = validate_params({"prompt": "a red ball", "seed": 1, "steps": 4}, TINY)
    cond, _ = pipe.encode_text(params)
    latents, dit = pipe.initial_noise(params), pipe.experts[0]
    quantised_widths: list[int] = []
    quantize = fp8.quantize_activations

    def counted(x: torch.Tensor, gelu: bool = False) -> fp8.QuantizedRows:
        quantised_widths.append(x.shape[-1])
        return quantize(x, gelu)

    monkeypatch.setattr(fp8, "quantize_activations", counted)
    with torch.no_grad():
        in_the_norm = dit(latents, torch.tensor([500]), cond)
        per_block = len(quantised_widths) / TINY.dit.num_layers
        quantised_widths.clear()
        dit.set_token_chunks(2)  # memory level 4's path: each linear quantises its bf16 input
        by_the_linears = dit(latents, torch.tensor([500]), cond)
    # Left to quantise apart: the two attention outputs, the text (k and v) and the feed-forward's
    # hidden; with chunks also q/k/v once, the cross-attention's q and, per chunk, both FFN layers.
    assert per_block == 4
    assert len(quantised_widths) / TINY.dit.num_layers == 9
    assert torch.equal(in_the_norm, by_the_linears)
