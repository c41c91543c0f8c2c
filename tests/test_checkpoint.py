"""Checkpoints describe themselves: config.json defines the DiT, checked against the weights; known
models add their sampling defaults; model and profile YAML are type-checked."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from smartdiff.pipeline.checkpoint import load_dit, open_checkpoint, read_dit_config
from smartdiff.pipeline.config import (
    DiTConfig,
    ModelConfig,
    SamplingConfig,
    load_model_config,
    load_profile,
)
from smartdiff.pipeline.loading import CheckpointError
from smartdiff.pipeline.params import ParamError, validate_params
from smartdiff.pipeline.tiny import write_random_checkpoint

TINY = load_model_config("tiny")
# A research variant no model config describes: other widths and depth, no cross-attention norm.
VARIANT_DIT = DiTConfig(
    dim=96, ffn_dim=160, num_layers=3, num_heads=3, text_dim=32, text_len=48, cross_attn_norm=False
)


@pytest.fixture
def copy_of_tiny(tiny_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny"))


def write_json(path: Path, update: dict, drop: tuple[str, ...] = ()) -> None:
    raw = {**json.loads(path.read_text()), **update}
    path.write_text(json.dumps({k: v for k, v in raw.items() if k not in drop}))


def test_the_official_config_json_identifies_the_released_models(tmp_path):
    # The config.json files of the Wan2.1 releases: they leave text_dim, patch_size and the norms to
    # the model's defaults.
    released = {
        "wan2.1-t2v-1.3b": {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30},
        "wan2.1-t2v-14b": {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40},
    }
    common = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "eps": 1e-06, "freq_dim": 256}
    common |= {"in_dim": 16, "model_type": "t2v", "out_dim": 16, "text_len": 512}
    for name, shape in released.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**common, **shape}))
        stated = read_dit_config(path)
        model = load_model_config(name)
        assert stated == {**shape, "eps": 1e-6, "freq_dim": 256, "in_dim": 16, "out_dim": 16, "text_len": 512}
        assert all(getattr(model.dit, key) == value for key, value in stated.items())


def test_a_checkpoint_of_unknown_shape_loads_with_generic_defaults_and_says_so(tmp_path, caplog):
    variant = ModelConfig(name="variant", display_name="variant", dit=VARIANT_DIT, vae=TINY.vae, t5=TINY.t5)
    root = write_random_checkpoint(tmp_path / "variant", variant)
    with caplog.at_level(logging.WARNING):
        checkpoint = open_checkpoint(root)
    assert checkpoint.model.dit == VARIANT_DIT  # every field from config.json, none from a model config
    assert checkpoint.model.name == "custom" and checkpoint.model.sampling == SamplingConfig()
    assert "matches no known model" in caplog.text and "generic defaults" in caplog.text
    # No TeaCache polynomial was ever fitted to it: asking for TeaCache is refused, PAB is not.
    with pytest.raises(ParamError, match="no fitted TeaCache polynomial"):
        validate_params({"prompt": "x", "flexcache": "teacache"}, checkpoint.model)
    assert validate_params({"prompt": "x", "flexcache": "pab"}, checkpoint.model).flexcache == "pab"
    dit = load_dit(root, "official", checkpoint.model.dit, torch.float32, torch.device("cpu"))
    assert dit.blocks[0].norm3 is None and len(dit.blocks) == 3
    with torch.no_grad():
        out = dit(torch.randn(1, 16, 2, 8, 8), torch.tensor([500]), torch.randn(1, 48, 32))
    assert out.shape == (1, 16, 2, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(CheckpointError, match="holds a DiT of no known model .dim 96, ffn 160, 3 layers."):
        open_checkpoint(root, "tiny")


def test_a_config_json_that_disagrees_with_the_weights_names_both(copy_of_tiny):
    write_json(copy_of_tiny / "config.json", {"ffn_dim": 256})
    with pytest.raises(
        CheckpointError,
        match=r"config.json says ffn_dim 256, but the weights say 128 "
        r"\(blocks.0.ffn.0.weight \[128, 64\] in diffusion_pytorch_model.safetensors\)",
    ):
        open_checkpoint(copy_of_tiny)
    write_json(copy_of_tiny / "config.json", {"ffn_dim": 128, "qk_norm": False})
    with pytest.raises(CheckpointError, match="says qk_norm False, but the weights say True"):
        open_checkpoint(copy_of_tiny)


def test_what_config_json_leaves_out_comes_from_the_weights(copy_of_tiny):
    write_json(
        copy_of_tiny / "config.json", {}, drop=("text_dim", "patch_size", "qk_norm", "cross_attn_norm")
    )
    assert open_checkpoint(copy_of_tiny).model.name == "tiny"
    (copy_of_tiny / "config.json").unlink()  # no file at all: the shapes alone, heads from the model config
    assert open_checkpoint(copy_of_tiny, "tiny").model.dit == TINY.dit


def test_settings_the_project_cannot_honour_are_errors(tmp_path):
    cases = {
        "model_type": ({"model_type": "i2v", "dim": 8}, "model_type 'i2v' is not supported"),
        "image": ({"num_attention_heads": 2, "attention_head_dim": 4, "image_dim": 1280}, "image_dim 1280"),
        "unknown": ({"dim": 8, "num_registers": 4}, r"unknown settings \['num_registers'\]"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(raw))
        with pytest.raises(CheckpointError, match=message):
            read_dit_config(path)


def test_the_diffusers_config_json_is_read_under_our_names(tmp_path):
    path = tmp_path / "config.json"
    diffusers = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 12, "attention_head_dim": 128}
    diffusers |= {"in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960}
    diffusers |= {"num_layers": 30, "patch_size": [1, 2, 2], "eps": 1e-6, "cross_attn_norm": True}
    diffusers |= {"qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "image_dim": None}
    path.write_text(json.dumps(diffusers))
    stated = read_dit_config(path)
    assert stated["dim"] == 1536 and stated["num_heads"] == 12 and stated["patch_size"] == (1, 2, 2)
    assert "qk_norm" not in stated  # diffusers normalises whatever it says: the weights decide
    dit = load_model_config("wan2.1-t2v-1.3b").dit
    assert all(getattr(dit, key) == value for key, value in stated.items())


def test_model_and_profile_yaml_values_are_type_checked(config_dir):
    tiny = (config_dir / "models" / "tiny.yaml").read_text()
    (config_dir / "models" / "tiny.yaml").write_text(
        tiny.replace("text_len: 64}", "text_len: 64, eps: 1e-06}")
    )
    with pytest.raises(
        ValueError, match=r"tiny.yaml: dit.eps: input should be a valid number, got '1e-06' .*1.0e-06"
    ):
        load_model_config("tiny")
    (config_dir / "models" / "tiny.yaml").write_text(tiny + "sampeling: {steps: 4}\n")
    load_model_config.cache_clear()
    with pytest.raises(ValueError, match="model.sampeling: unknown setting"):
        load_model_config("tiny")
    (config_dir / "models" / "tiny.yaml").write_text(tiny)
    load_model_config.cache_clear()
    (config_dir / "profiles" / "p.yaml").write_text("name: p\nmodel: tiny\ncheckpoint: x\ncompile: 'yes'\n")
    with pytest.raises(ValueError, match="profile.compile: input should be a valid boolean, got 'yes'"):
        load_profile("p")
    (config_dir / "profiles" / "p.yaml").write_text("name: p\nmodel: tiny\ncheckpoint: x\ndtype: float32\n")
    with pytest.raises(ValueError, match="profile.dtype: input should be 'auto', 'bf16', 'fp16' or 'fp32'"):
        load_profile("p")
