"""FlexCache on the tiny model: TeaCache and PAB do exactly what their settings say."""

import numpy as np
import pytest

from smartdiff.pipeline.config import ProfileConfig, load_model_config
from smartdiff.pipeline.dit import WanBlock
from smartdiff.pipeline.flexcache import COND, UNCOND
from smartdiff.pipeline.params import ParamError, validate_params
from smartdiff.pipeline.tiny import write_tiny_checkpoint
from smartdiff.pipeline.wan import WanPipeline

TINY = load_model_config("tiny")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def run(pipe, **extra):
    raw = {"prompt": "a red ball moving left", "seed": 3, "steps": 20, **extra}
    return pipe.generate(validate_params(raw, pipe.model))


def count_block_stacks(pipe):
    calls = []
    handle = pipe.experts[0].blocks[0].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_teacache_threshold_zero_is_exactly_the_uncached_video(pipe):
    plain = run(pipe)
    cached = run(pipe, flexcache="teacache", teacache_threshold=0.0)
    assert np.array_equal(plain.frames, cached.frames)
    assert cached.cache["reused"] == 0 and cached.cache["computed"] == 40


def test_large_threshold_reuses_and_counts_match_the_calls(pipe):
    calls, handle = count_block_stacks(pipe)
    try:
        result = run(pipe, flexcache="teacache", teacache_threshold=0.5)
    finally:
        handle.remove()
    stats = result.cache
    assert stats["reused"] > 10
    assert stats["computed"] == len(calls)  # the block stack ran exactly as often as reported
    assert stats["computed"] + stats["reused"] == 40
    assert stats["peak_cache_bytes"] > 0
    assert not np.array_equal(result.frames, run(pipe).frames)


def test_first_and_last_steps_are_always_computed(pipe):
    result = run(pipe, flexcache="teacache", teacache_threshold=1.0)
    log = result.cache_log
    for record in log:
        if record.step in (0, 19):
            assert record.computed, record
    assert any(not r.computed for r in log)


def test_cond_and_uncond_keep_separate_state(pipe):
    import torch

    from smartdiff.pipeline.flexcache import FlexCache

    params = validate_params(
        {"prompt": "a cat", "seed": 1, "steps": 8, "flexcache": "teacache", "teacache_threshold": 1.0}, TINY
    )
    cache = FlexCache(params, TINY, [999, 995, 990, 985, 980, 975, 970, 965])
    cond, uncond = pipe.encode_text(params)
    latents = pipe.initial_noise(params)
    for step, t in enumerate(cache.timesteps[:6]):
        t_batch = torch.tensor([t])
        cache.forward(pipe.experts[0], 0, COND, step, latents, t_batch, cond)
        if step >= 3:  # the unconditional branch joins late: it has no residual of its own yet
            cache.forward(pipe.experts[0], 0, UNCOND, step, latents, t_batch, uncond)
    cond_log = [r.computed for r in cache.log if r.branch == COND]
    uncond_log = [r.computed for r in cache.log if r.branch == UNCOND]
    assert cond_log[3] is False  # cond reuses its residual at step 3 ...
    assert uncond_log[0] is True  # ... while uncond, at the same step, must compute its own
    states = cache._impl.states
    assert not torch.equal(states[(0, COND)].residual, states[(0, UNCOND)].residual)


def test_pab_follows_its_schedule_step_by_step(pipe):
    settings = {
        "pab_self_interval": 2,
        "pab_cross_interval": 3,
        "pab_self_start": 100,
        "pab_self_end": 900,
        "pab_cross_start": 200,
        "pab_cross_end": 950,
    }
    result = run(pipe, flexcache="pab", **settings)
    from smartdiff.pipeline.schedulers import make_scheduler

    timesteps = make_scheduler("unipc", 20, 5.0).timesteps.tolist()
    blocks = len(pipe.experts[0].blocks)

    def expected(start, end, interval, step):
        # Every block reuses when the step is inside the window and not a refresh step.
        return blocks if start < timesteps[step] < end and step % interval != 0 else 0

    for record in result.cache_log:
        assert record.computed
        assert record.self_reused == expected(100, 900, 2, record.step), record
        assert record.cross_reused == expected(200, 950, 3, record.step), record
    stats = result.cache["attention"]
    assert stats["self"]["reused"] == sum(r.self_reused for r in result.cache_log) > 0
    assert stats["self"]["reused"] + stats["self"]["computed"] == 40 * blocks
    assert result.cache["reused"] == 0 and result.cache["peak_cache_bytes"] > 0


def test_consecutive_requests_equal_fresh_pipelines(pipe, tiny_checkpoint):
    first = run(pipe, flexcache="teacache", teacache_threshold=0.3)
    second = run(pipe, flexcache="pab")
    third = run(pipe)
    assert np.array_equal(
        first.frames,
        run(
            WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu"),
            flexcache="teacache",
            teacache_threshold=0.3,
        ).frames,
    )
    assert np.array_equal(
        second.frames, run(WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu"), flexcache="pab").frames
    )
    assert np.array_equal(
        third.frames, run(WanPipeline.from_checkpoint(tiny_checkpoint, device="cpu")).frames
    )
    # Nothing is left wrapped or hooked on the model after caching requests.
    dit = pipe.experts[0]
    assert all(type(b) is WanBlock for b in dit.blocks)
    assert not dit._forward_hooks and not any(b._forward_hooks for b in dit.blocks)


def test_wan22_gives_each_expert_its_own_state(tmp_path):
    root = write_tiny_checkpoint(tmp_path / "moe", model_name="tiny-moe")
    pipe = WanPipeline.from_checkpoint(root, device="cpu")
    result = pipe.generate(
        validate_params(
            {
                "prompt": "a red ball",
                "seed": 0,
                "frames": 1,
                "flexcache": "teacache",
                "teacache_threshold": 0.5,
            },
            pipe.model,
        )
    )
    experts = {r.expert for r in result.cache_log}
    assert experts == {0, 1}
    # The first step of the low-noise expert computes: the high-noise expert's residual is not its own.
    first_low = min(r.step for r in result.cache_log if r.expert == 1)
    assert all(r.computed for r in result.cache_log if r.step == first_low)
    assert result.cache["reused"] > 0


def tiny_profile(flexcache: tuple[str, ...]) -> ProfileConfig:
    return ProfileConfig(name="t", model="tiny", checkpoint="tiny", flexcache=flexcache)


def test_flexcache_validation():
    with pytest.raises(ParamError, match="unknown strategy 'magic'"):
        validate_params({"prompt": "x", "flexcache": "magic"}, TINY)
    with pytest.raises(ParamError, match="teacache_threshold: must be between 0.0 and 1.0"):
        validate_params({"prompt": "x", "flexcache": "teacache", "teacache_threshold": 3}, TINY)
    with pytest.raises(ParamError, match="'pab' is not allowed on this profile \\(allowed: teacache\\)"):
        validate_params({"prompt": "x", "flexcache": "pab"}, TINY, tiny_profile(("teacache",)))
    with pytest.raises(ParamError, match="'teacache' is not allowed on this profile \\(allowed: none\\)"):
        validate_params({"prompt": "x", "flexcache": "teacache"}, TINY, tiny_profile(()))
    with pytest.raises(ParamError, match="teacache_threshold: only applies with flexcache=teacache"):
        validate_params({"prompt": "x", "teacache_threshold": 0.1}, TINY)
    with pytest.raises(ParamError, match="pab_self_interval: must be between 1 and 20"):
        validate_params({"prompt": "x", "flexcache": "pab", "pab_self_interval": 0}, TINY)
    with pytest.raises(ParamError, match="pab_cross_start: must be below pab_cross_end"):
        validate_params(
            {"prompt": "x", "flexcache": "pab", "pab_cross_start": 900, "pab_cross_end": 100}, TINY
        )
    defaults = validate_params({"prompt": "x", "flexcache": "teacache"}, load_model_config("wan2.1-t2v-14b"))
    assert defaults.teacache_threshold == 0.2  # the 14B's own operating point, by identity
    assert (
        validate_params(
            {"prompt": "x", "flexcache": "teacache"}, load_model_config("wan2.1-t2v-1.3b")
        ).teacache_threshold
        == 0.08
    )


def cfg_cache_schedule(steps: int, interval: int, start: int, end: int) -> list[int]:
    """The steps whose unconditional branch the CFG cache reuses: inside the window, all but every
    ``interval``-th (the step before always left a guidance term, computed or carried)."""
    from smartdiff.pipeline.schedulers import make_scheduler

    timesteps = make_scheduler("unipc", steps, TINY.sampling.shift).timesteps.tolist()
    return [i for i, t in enumerate(timesteps) if start < t < end and i % interval != 0]


def test_cfg_cache_skips_the_unconditional_forward_on_its_schedule(pipe):
    calls, handle = count_block_stacks(pipe)
    try:
        result = run(pipe, cfg_cache_interval=3, cfg_cache_start=200, cfg_cache_end=990)
    finally:
        handle.remove()
    reused = cfg_cache_schedule(20, 3, 200, 990)
    assert 5 <= len(reused) < 20
    assert result.cache["uncond_reused"] == len(reused)
    assert len(calls) == result.cache["computed"] == 40 - len(reused)  # no forward for a reused branch
    assert sorted({r.step for r in result.cache_log if r.branch == UNCOND}) == [
        i for i in range(20) if i not in reused
    ]
    assert result.cache["peak_cache_bytes"] > 0
    # Interval 1 reuses nothing: exactly the uncached video.
    plain = run(pipe)
    assert np.array_equal(run(pipe, cfg_cache_interval=1).frames, plain.frames)
    assert not np.array_equal(result.frames, plain.frames)


def test_cfg_cache_stands_in_the_kept_guidance_term():
    import torch

    from smartdiff.pipeline.flexcache import FlexCache
    from smartdiff.pipeline.wan import apply_guidance

    params = validate_params(
        {"prompt": "x", "steps": 4, "cfg_cache_interval": 2, "cfg_cache_start": 0, "cfg_cache_end": 1000},
        TINY,
    )
    cache = FlexCache(params, TINY, [999, 700, 400, 100])
    g = torch.Generator().manual_seed(0)
    cond0, uncond0, cond1 = (torch.randn(2, 3, generator=g) for _ in range(3))
    assert cache.computes_uncond(0, 0)  # step 0 computes: nothing kept yet
    assert torch.equal(cache.uncond_velocity(0, 0, cond0, uncond0), uncond0)
    assert not cache.computes_uncond(0, 1) and cache.computes_uncond(1, 1)  # each expert its own term
    uncond1 = cache.uncond_velocity(0, 1, cond1, None)
    assert torch.equal(uncond1, cond1 - (cond0 - uncond0))
    # The guided velocity: the conditional one plus (guidance - 1) times the kept term.
    torch.testing.assert_close(apply_guidance(cond1, uncond1, 5.0), cond1 + 4.0 * (cond0 - uncond0))
    assert cache.computes_uncond(0, 2)  # every 2nd step computes again ...
    cache.uncond_velocity(0, 2, cond1, uncond0)
    assert not cache.computes_uncond(0, 3) and cache.stats()["uncond_reused"] == 1


def test_cfg_cache_batched_runs_one_branch_where_it_reuses(tiny_checkpoint):
    profile = ProfileConfig(
        name="t", model="tiny", checkpoint=str(tiny_checkpoint), flexcache=("cfg_cache",), cfg_batch=True
    )
    pipe = WanPipeline.from_profile(profile, device="cpu")
    batches = []
    handle = pipe.experts[0].blocks[0].register_forward_hook(lambda m, a, out: batches.append(out.shape[0]))
    try:
        request = {"prompt": "a red ball moving left", "seed": 3, "steps": 20, "cfg_cache_interval": 2}
        result = pipe.generate(validate_params({**request, "cfg_cache_end": 900}, TINY, profile))
    finally:
        handle.remove()
    reused = cfg_cache_schedule(20, 2, 0, 900)
    assert reused and result.cache["uncond_reused"] == len(reused)
    assert batches == [1 if i in reused else 2 for i in range(20)]


def test_cfg_cache_validation():
    allowed = tiny_profile(("cfg_cache",))
    params = validate_params({"prompt": "x", "cfg_cache_interval": 2}, TINY, allowed)
    assert (params.cfg_cache_start, params.cfg_cache_end) == (0, 641)  # FasterCache's window
    with pytest.raises(ParamError, match="cfg_cache_interval: the CFG cache is not allowed on profile t"):
        validate_params({"prompt": "x", "cfg_cache_interval": 2}, TINY, tiny_profile(("pab",)))
    with pytest.raises(ParamError, match="cfg_cache_end: only applies with cfg_cache_interval"):
        validate_params({"prompt": "x", "cfg_cache_end": 500}, TINY, allowed)
    with pytest.raises(ParamError, match="cfg_cache_start: must be below cfg_cache_end"):
        validate_params({"prompt": "x", "cfg_cache_interval": 2, "cfg_cache_start": 700}, TINY, allowed)
    with pytest.raises(ParamError, match="cfg_cache_interval: must be between 1 and 10"):
        validate_params({"prompt": "x", "cfg_cache_interval": 0}, TINY, allowed)
    with pytest.raises(ParamError, match="guidance 1 never computes"):
        validate_params({"prompt": "x", "cfg_cache_interval": 2, "guidance": 1.0}, TINY, allowed)


def test_profiles_refuse_a_cfg_cache_with_nothing_to_save():
    from smartdiff.pipeline.config import ParallelConfig, check_cfg_cache, check_cuda_graphs

    check_cuda_graphs(tiny_profile(("cfg_cache",)))  # the graphs replay whole forwards: compatible
    with pytest.raises(ValueError, match="cfg: false"):
        check_cfg_cache(
            ProfileConfig(name="t", model="tiny", checkpoint="x", flexcache=("cfg_cache",), cfg=False)
        )
    parallel = ProfileConfig(
        name="t", model="tiny", checkpoint="x", flexcache=("cfg_cache",), parallel=ParallelConfig(cfg=2)
    )
    with pytest.raises(ValueError, match="would save nothing"):
        check_cfg_cache(parallel)
