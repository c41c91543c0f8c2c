"""The whole pipeline on the tiny checkpoint: MP4 out, determinism, Wan2.2's expert switch, layouts."""

import json
import subprocess

import numpy as np
import pytest
import torch

from smartdiff.cli import python_module_command
from smartdiff.pipeline.checkpoint import open_checkpoint
from smartdiff.pipeline.config import load_model_config, load_profile
from smartdiff.pipeline.loading import CheckpointError
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.tiny import RandomWeights, write_random_checkpoint, write_tiny_checkpoint
from smartdiff.pipeline.video import read_mp4
from smartdiff.pipeline.wan import BatchedGuidance, WanPipeline

TINY = load_model_config("tiny")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def test_generate_command_writes_a_valid_mp4(tiny_checkpoint, tmp_path):
    out = tmp_path / "video.mp4"
    command = [
        *python_module_command("smartdiff"),
        "generate",
        "--model-dir",
        str(tiny_checkpoint),
        "--prompt",
        "a red ball moving left",
        "--size",
        "96x64",
        "--frames",
        "13",
        "--steps",
        "3",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["seed"] == 5 and summary["frames"] == 13 and summary["model"] == "tiny"
    assert "denoise" in done.stderr  # the progress bar names the stage

    frames, meta = read_mp4(out)
    assert frames.shape == (13, 64, 96, 3)
    assert meta["codec"] == "h264" and meta["fps"] == 16.0 and meta["pix_fmt"].startswith("yuv420p")
    assert out.read_bytes().find(b"moov") < out.read_bytes().find(b"mdat")  # faststart: index first

    # The file holds the video the pipeline made: same per-frame brightness as a direct run.
    pipe = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    params = validate_params(
        {"prompt": "a red ball moving left", "size": "96x64", "frames": 13, "steps": 3, "seed": 5}, TINY
    )
    direct = pipe.generate(params).frames
    assert np.abs(frames.mean(axis=(1, 2, 3)) - direct.mean(axis=(1, 2, 3))).max() < 2.0


def test_bad_parameters_fail_before_loading(tiny_checkpoint, tmp_path):
    command = [
        *python_module_command("smartdiff"),
        "generate",
        "--model-dir",
        str(tiny_checkpoint),
        "--prompt",
        "x",
        "--frames",
        "8",
        "--out",
        str(tmp_path / "x.mp4"),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert "frames: must be 4n+1" in done.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_same_seed_same_video_and_seed_matters(pipe):
    params = validate_params({"prompt": "a blue square", "seed": 3, "steps": 2}, TINY)
    a = pipe.generate(params)
    b = pipe.generate(params)
    assert np.array_equal(a.frames, b.frames)
    c = pipe.generate(validate_params({"prompt": "a blue square", "seed": 4, "steps": 2}, TINY))
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (9, 64, 64, 3) and a.frames.dtype == np.uint8
    assert set(a.seconds) == {"text_encode", "denoise", "vae_decode"}


def test_progress_reports_every_stage_and_step(pipe):
    seen = []
    pipe.generate(
        validate_params({"prompt": "a cat", "seed": 1, "steps": 3}, TINY),
        lambda stage, i, n: seen.append((stage, i, n)),
    )
    assert seen == [
        ("text_encode", 0, 1),
        ("denoise", 1, 3),
        ("denoise", 2, 3),
        ("denoise", 3, 3),
        ("vae_decode", 0, 1),
    ]


def test_guidance_one_skips_the_unconditional_pass(pipe):
    calls = []
    handle = pipe.experts[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe.generate(validate_params({"prompt": "a cat", "seed": 1, "steps": 2, "guidance": 1.0}, TINY))
        assert len(calls) == 2
        calls.clear()
        pipe.generate(validate_params({"prompt": "a cat", "seed": 1, "steps": 2, "guidance": 2.0}, TINY))
        assert len(calls) == 4
    finally:
        handle.remove()


def test_wan22_switches_experts_at_timestep_875(tmp_path):
    root = write_tiny_checkpoint(tmp_path / "moe", model_name="tiny-moe")
    pipe = WanPipeline.from_checkpoint(root, device="cpu")
    assert pipe.model.name == "tiny-moe" and len(pipe.experts) == 2
    calls = {0: 0, 1: 0}
    for i, dit in enumerate(pipe.experts):
        dit.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    params = validate_params({"prompt": "a red ball", "seed": 0, "frames": 1}, pipe.model)
    assert (params.steps, params.shift, params.guidance, params.guidance_low_noise) == (40, 12.0, 4.0, 3.0)
    result = pipe.generate(params)
    assert result.expert_per_step == [0] * 26 + [1] * 14
    assert result.guidance_per_step == [4.0] * 26 + [3.0] * 14
    assert calls == {0: 52, 1: 28}  # two forwards (cond, uncond) per step


@pytest.mark.parametrize("level", [0, 3])
def test_warm_up_runs_each_expert_once_at_the_default_size(tmp_path, level):
    root = write_tiny_checkpoint(tmp_path / "moe", model_name="tiny-moe")
    pipe = WanPipeline.from_checkpoint(root, device="cpu", low_mem_level=level)
    shapes = {0: [], 1: []}
    for i, dit in enumerate(pipe.experts):
        dit.register_forward_hook(lambda module, args, out, i=i: shapes[i].append(tuple(args[0].shape)))
    assert pipe.warm_up() > 0
    default = validate_params({"prompt": "any"}, pipe.model)
    assert shapes == {0: [(1, *pipe.latent_shape(default))], 1: [(1, *pipe.latent_shape(default))]}


def test_checkpoint_identity_and_errors(tiny_checkpoint, tmp_path):
    assert open_checkpoint(tiny_checkpoint).model.name == "tiny"
    with pytest.raises(CheckpointError, match="holds tiny, not wan2.1-t2v-1.3b"):
        open_checkpoint(tiny_checkpoint, "wan2.1-t2v-1.3b")
    with pytest.raises(CheckpointError, match="hub at run time is not supported"):
        open_checkpoint("Wan-AI/Wan2.1-T2V-1.3B")
    broken = tmp_path / "broken"
    write_tiny_checkpoint(broken)
    (broken / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"missing VAE weights: .*Wan2.1_VAE.pth does not exist"):
        WanPipeline.from_checkpoint(broken, device="cpu")


def test_sharded_dit_loads_like_a_single_file(tmp_path):
    from smartdiff.pipeline.tiny import write_dit

    single = write_tiny_checkpoint(tmp_path / "single")
    cpu = torch.device("cpu")
    write_dit(tmp_path / "sharded", TINY, 0, seed=0, device=cpu, dtype=torch.float32, shards=3)
    assert len(list((tmp_path / "sharded").glob("*-of-00003.safetensors"))) == 3
    from smartdiff.pipeline.checkpoint import load_dit

    a = load_dit(single, "official", TINY.dit, torch.float32, torch.device("cpu")).state_dict()
    b = load_dit(tmp_path / "sharded", "official", TINY.dit, torch.float32, torch.device("cpu")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_attention_is_timed_at_the_models_own_shape(tiny_checkpoint):
    from smartdiff.pipeline.wan import self_attention_shape

    # PERFORMANCE.md's shapes: 1.3B at 832x480x81 and 14B at 1280x720x81.
    assert self_attention_shape(load_model_config("wan2.1-t2v-1.3b")) == (1, 32760, 12, 128)
    assert self_attention_shape(load_model_config("wan2.1-t2v-14b")) == (1, 75600, 40, 128)
    pipe = WanPipeline.from_checkpoint(tiny_checkpoint, "tiny", "cpu", attention="auto")
    assert pipe.attention.name == "auto" and "torch-sdpa-cpu" in pipe.attention.implementation


def test_profile_options_reach_the_backend_and_compile_switches_the_token_ops(tiny_checkpoint):
    with pytest.raises(ValueError, match="does not take options"):
        WanPipeline.from_checkpoint(tiny_checkpoint, "tiny", "cpu", attention_options={"topk": 0.5})
    pipe = WanPipeline.from_checkpoint(tiny_checkpoint, "tiny", "cpu", compile=True)
    assert all(dit.ops.compiled for dit in pipe.experts)
    assert not WanPipeline.from_checkpoint(tiny_checkpoint, "tiny", "cpu").experts[0].ops.compiled


@pytest.mark.parametrize("level", [0, 3])
def test_random_weights_drawn_in_memory_equal_the_written_checkpoint(tmp_path, level):
    """What the GPU benchmarks build with no file: the same modules and weights, the same video."""
    moe = load_model_config("tiny-moe")
    root = write_random_checkpoint(tmp_path / "moe", moe, seed=3)
    from_files = WanPipeline.from_checkpoint(root, "tiny-moe", "cpu", low_mem_level=level)
    in_memory = WanPipeline.from_weights(RandomWeights(moe, seed=3), "cpu", low_mem_level=level)
    assert "no checkpoint file" in RandomWeights(moe).origin
    pairs = [*zip(from_files.experts, in_memory.experts), (from_files.vae, in_memory.vae)]
    pairs.append((from_files.text_encoder.model, in_memory.text_encoder.model))
    for a, b in pairs:
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    prompt = "a red ball moving left, fast!"
    assert (
        from_files.text_encoder.tokenize([prompt])[0].tolist()
        == in_memory.text_encoder.tokenize([prompt])[0].tolist()
    )
    params = validate_params({"prompt": prompt, "steps": 3, "seed": 1, "size": "64x64", "frames": 5}, moe)
    first, second = from_files.generate(params), in_memory.generate(params)
    assert second.expert_per_step == first.expert_per_step and len(set(first.expert_per_step)) == 2
    assert np.array_equal(first.frames, second.frames)


def block_stack_batches(pipeline: WanPipeline) -> list[int]:
    """The batch size of every block-stack evaluation (calls of the first block) from now on."""
    batches = []
    pipeline.experts[0].blocks[0].register_forward_pre_hook(lambda _, args: batches.append(len(args[0])))
    return batches


def test_cfg_batch_runs_both_branches_in_one_forward_and_makes_the_same_video(
    tiny_checkpoint, config_dir, monkeypatch
):
    (config_dir / "profiles" / "tiny-batched.yaml").write_text(
        "name: tiny-batched\nmodel: tiny\ncheckpoint: tiny\ncfg_batch: true\n"
    )
    monkeypatch.setenv("SMARTDIFF_CHECKPOINT_ROOT", str(tiny_checkpoint.parent))
    batched = WanPipeline.from_profile(load_profile("tiny-batched"), "cpu")
    assert isinstance(batched.velocity_model, BatchedGuidance)
    plain = WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    params = validate_params({"prompt": "a red ball", "seed": 2, "steps": 4, "guidance": 5.0}, TINY)
    batched_calls, plain_calls = block_stack_batches(batched), block_stack_batches(plain)
    a, b = batched.generate(params), plain.generate(params)
    assert batched_calls == [2] * 4 and plain_calls == [1] * 8
    assert a.cache["computed"] == b.cache["computed"] == 8  # both branches of every step, in the log
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1  # float rounding only
    # Guidance 1: the conditional branch alone, one forward of batch 1.
    batched_calls.clear()
    batched.generate(validate_params({"prompt": "x", "seed": 2, "steps": 4, "guidance": 1.0}, TINY))
    assert batched_calls == [1] * 4


@pytest.mark.parametrize(
    ("flag", "extra", "message"),
    [
        ("cfg_batch", "flexcache: [teacache]", "a feature cache decides per branch"),
        ("cfg_batch", "parallel: {cfg: 2}", "this profile is parallel"),
        ("cfg_batch", "cfg: false", "this profile has cfg: false"),
        ("cuda_graphs", "flexcache: [pab]", "a feature cache decides per step"),
        ("cuda_graphs", "low_mem_level: 3", "low_mem_level 3 and 4 stream its blocks"),
        ("cuda_graphs", "parallel: {ulysses: 2}", "this profile is parallel"),
    ],
)
def test_a_profile_flag_with_what_it_cannot_run_with_fails_the_load(config_dir, flag, extra, message):
    (config_dir / "profiles" / "bad.yaml").write_text(
        f"name: bad\nmodel: tiny\ncheckpoint: tiny\n{flag}: true\n{extra}\n"
    )
    with pytest.raises(ValueError, match=message):
        load_profile("bad")


def test_cuda_graphs_refuse_a_cpu_pipeline(tiny_checkpoint):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, this pipeline runs on cpu"):
        WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_replay_one_graph_per_size_and_make_the_eager_video(tmp_path):
    root = write_tiny_checkpoint(tmp_path / "moe", model_name="tiny-moe")
    graphed = WanPipeline.from_checkpoint(root, device="cuda", cuda_graphs=True)
    eager = WanPipeline.from_checkpoint(root, device="cuda")
    params = validate_params({"prompt": "a red ball", "seed": 5, "steps": 6, "guidance": 4.0}, graphed.model)
    a, b = graphed.generate(params), eager.generate(params)
    # Each step's inputs reach the graph: the same video as the eager forwards, both experts used.
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1
    assert set(a.expert_per_step) == {0, 1}
    assert [len(dit.graphed.graphs) for dit in graphed.experts] == [1, 1]  # cond and uncond share one
    wide = validate_params({"prompt": "a red ball", "seed": 5, "steps": 2, "size": "96x64"}, graphed.model)
    c, d = graphed.generate(wide), eager.generate(wide)
    assert c.frames.shape == (9, 64, 96, 3) and np.abs(c.frames.astype(int) - d.frames.astype(int)).max() <= 1
    assert len(graphed.experts[0].graphed.graphs) == 2
    # Back at the first size, its graph still reads what it read when captured.
    assert np.array_equal(graphed.generate(params).frames, a.frames)
