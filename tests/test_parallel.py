"""One job over several processes (pipeline/parallel.py), on CPU with gloo.

Process groups of 2 and 4 must reproduce the one-process result of attention, of a DiT forward and
of a whole denoising loop, with a token count the sequence degree divides and with one that needs
padding. Tolerances are max abs errors in fp32: the parallel runs only sum in another order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import smartdiff.pipeline.config as config_module
from smartdiff.kernels import get_backend
from smartdiff.pipeline.config import DiTConfig, ModelConfig, ParallelConfig, load_model_config, load_profile
from smartdiff.pipeline.dit import WanDiT
from smartdiff.pipeline.parallel import (
    ParallelGuidance,
    ParallelLayout,
    ShardedDiT,
    attention_with_lse,
    build_layout,
    gather_tokens,
    group_ranks,
    merge_partials,
    padded_length,
    sequence_parallel_backend,
    shard_tokens,
)
from smartdiff.pipeline.params import validate_params
from smartdiff.pipeline.tiny import random_state
from smartdiff.pipeline.wan import GenerationResult, Guidance, WanPipeline

TOLERANCE = {"attention": 1e-5, "dit": 1e-5, "denoise": 1e-4}

sdpa = get_backend("sdpa")

# ---------------------------------------------------------------------------------------------
# In one process: the attention numerics, the layout, the configuration


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention in float64, (batch, tokens, heads, dim)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def test_attention_with_lse_is_softmax_attention_and_its_logsumexp():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 37, 3, 16, generator=g), *torch.randn(2, 2, 29, 3, 16, generator=g)
    out, lse = attention_with_lse(q, k, v, query_chunk=8)  # several query chunks
    scores = torch.einsum("bqhd,bkhd->bqhk", q.double(), k.double()) / 4
    assert out.dtype == lse.dtype == torch.float32
    assert (out - reference_attention(q, k, v)).abs().max() < 1e-6
    assert (lse - scores.logsumexp(-1)).abs().max() < 1e-5


@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["plain", "scores-beyond-exp-range"])
def test_merged_partials_equal_attention_over_all_keys(scale):
    g = torch.Generator().manual_seed(1)
    # scale 40 makes scores of several hundred: exp() of them overflows fp32, the merge must not.
    q = scale * torch.randn(1, 11, 2, 8, generator=g)
    k, v = torch.randn(2, 1, 30, 2, 8, generator=g)
    expected = reference_attention(q, k, v)
    blocks = [slice(0, 12), slice(12, 13), slice(13, 30)]
    for order in ([0, 1, 2], [2, 0, 1]):
        out, lse = attention_with_lse(q, k[:, blocks[order[0]]], v[:, blocks[order[0]]])
        for i in order[1:]:
            out, lse = merge_partials(out, lse, *attention_with_lse(q, k[:, blocks[i]], v[:, blocks[i]]))
        assert torch.isfinite(out).all()
        assert (out - expected).abs().max() < 1e-5


def test_group_layout_cfg2_ulysses2_ring2():
    groups = group_ranks(ParallelConfig(cfg=2, ulysses=2, ring=2))
    assert groups == {
        "ulysses": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "ring": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "sequence": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "cfg": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }


def test_shards_are_the_padded_sequence_in_rank_order():
    x = torch.arange(1, 6, dtype=torch.float32).view(1, 5, 1)  # 5 tokens over 4 shards: 3 pads
    config = ParallelConfig(ulysses=2, ring=2)
    shards = []
    for rank in range(4):
        ranks = group_ranks(config)["sequence"][0]
        layout = ParallelLayout(config, rank, [], [], ranks, [rank], None, None, None, None)
        shards.append(shard_tokens(x, layout, dim=1))
    assert torch.cat(shards, dim=1).flatten().tolist() == [1, 2, 3, 4, 5, 0, 0, 0]


def test_parallel_config_says_what_is_allowed():
    wan13, wan14 = load_model_config("wan2.1-t2v-1.3b"), load_model_config("wan2.1-t2v-14b")
    with pytest.raises(ValueError, match=r"parallel.cfg must be 1 or 2 .*got 3"):
        ParallelConfig(cfg=3)
    with pytest.raises(ValueError, match="parallel.ring must be a positive integer, got 0"):
        ParallelConfig(ring=0)
    with pytest.raises(ValueError, match=r"ulysses\n  Input should be a valid integer.*input_value=True"):
        ParallelConfig(ulysses=True)
    with pytest.raises(
        ValueError, match="the wan2.1-t2v-1.3b model's 12 heads allow ulysses 1, 2, 3, 4, 6 or 12"
    ):
        ParallelConfig(ulysses=5).validate(wan13)
    with pytest.raises(ValueError, match="40 heads allow ulysses 1, 2, 4, 5, 8, 10, 20 or 40"):
        ParallelConfig(ulysses=3).validate(wan14)
    with pytest.raises(
        ValueError, match="cfg 2 x ulysses 2 x ring 2 needs 8 processes, the process group has 4"
    ):
        ParallelConfig(cfg=2, ulysses=2, ring=2).validate(wan14, world_size=4)
    ParallelConfig(cfg=2, ulysses=4, ring=2).validate(wan14, world_size=16)


def test_build_layout_without_a_process_group_is_one_process():
    tiny = load_model_config("tiny")
    layout = build_layout(ParallelConfig(), tiny)
    assert (layout.rank, layout.sequence_rank, layout.cfg_rank, layout.sequence_group) == (0, 0, 0, None)
    with pytest.raises(ValueError, match="ring 2 needs 2 processes, the process group has 1"):
        build_layout(ParallelConfig(ring=2), tiny)


def write_profile(folder: Path, name: str, parallel: str) -> None:
    (folder / "profiles" / f"{name}.yaml").write_text(
        f"name: {name}\nmodel: tiny\ncheckpoint: tiny\nparallel: {parallel}\n"
    )


def test_profiles_default_to_one_process():
    parallel = {name: load_profile(name).parallel for name in config_module.list_profile_names()}
    # The worker group's test profile (tests/test_parallel_worker.py); every other one is one process.
    assert parallel.pop("tiny-cfg2") == ParallelConfig(cfg=2)
    assert set(parallel.values()) == {ParallelConfig()}


def test_profile_parallel_mapping_is_read_and_validated(config_dir):
    write_profile(config_dir, "split", "{cfg: 2, ulysses: 2, ring: 1}")
    assert load_profile("split").parallel == ParallelConfig(cfg=2, ulysses=2, ring=1)
    assert load_profile("split").parallel.world_size == 4
    bad = {
        "heads": ("{ulysses: 4}", "the tiny model's 2 heads allow ulysses 1 or 2"),
        "cfg": ("{cfg: 4}", "parallel.cfg must be 1 or 2"),
        "key": ("{tensor: 2}", "parallel.tensor: unknown setting"),
        "type": ("{ring: two}", "parallel.ring: input should be a valid integer, got 'two'"),
    }
    for name, (parallel, message) in bad.items():
        write_profile(config_dir, name, parallel)
        with pytest.raises(ValueError, match=rf"profiles/{name}\.yaml: .*{message}"):
            load_profile(name)


# ---------------------------------------------------------------------------------------------
# Process groups of 2 and 4 on gloo


@dataclass(frozen=True)
class Case:
    name: str
    check: str  # "attention", "dit", "denoise" or "unmasked" (the seed's padding bug, on purpose)
    parallel: ParallelConfig
    shape: tuple[int, ...]  # attention: (tokens,); else latent (frames, height, width)
    heads: int = 2  # 4: a random 4-head DiT instead of the tiny checkpoint's 2-head one
    flexcache: str = "none"
    guidance: float = 5.0
    solver: str = "unipc"


# Latent grids with patch (1, 2, 2): 2*4*4 = 32 tokens (divisible by 2 and 4), 3*3*5 = 45 (padded).
SHAPES = {
    "attention": {"divisible": (32,), "padded": (45,)},
    "dit": {"divisible": (2, 8, 8), "padded": (3, 6, 10)},
    "denoise": {"divisible": (2, 8, 8), "padded": (3, 6, 10)},
}
FEW_TOKENS = (1, 2, 10)  # 5 tokens: over ring 4 the last chunk is padding only


def mode_cases(mode: str, parallel: ParallelConfig, checks: list[str], heads: int = 2) -> list[Case]:
    return [
        Case(f"{mode}-{check}-{fit}", check, parallel, shape, heads)
        for check in checks
        for fit, shape in SHAPES[check].items()
    ]


CFG2, ULYSSES2, RING2 = ParallelConfig(cfg=2), ParallelConfig(ulysses=2), ParallelConfig(ring=2)
RING4, ULYSSES4 = ParallelConfig(ring=4), ParallelConfig(ulysses=4)
ULYSSES2_RING2, CFG2_ULYSSES2 = ParallelConfig(ulysses=2, ring=2), ParallelConfig(cfg=2, ulysses=2)
PADDED = SHAPES["dit"]["padded"]

WORLDS = {
    2: [
        *mode_cases("cfg2", CFG2, ["denoise"]),
        *mode_cases("ulysses2", ULYSSES2, ["attention", "dit", "denoise"]),
        *mode_cases("ring2", RING2, ["attention", "dit", "denoise"]),
        Case("cfg2-denoise-guidance1", "denoise", CFG2, PADDED, guidance=1.0),  # one branch only
        Case("ring2-denoise-pab", "denoise", RING2, PADDED, flexcache="pab"),
        # Steps that reuse the guidance term run the conditional branch alone on every rank.
        Case("ulysses2-denoise-cfg-cache", "denoise", ULYSSES2, PADDED, flexcache="cfg_cache"),
        # Fresh noise at every step: the same on every rank, drawn from the request's seed.
        Case("ulysses2-denoise-distill", "denoise", ULYSSES2, PADDED, guidance=1.0, solver="distill"),
        Case("ulysses2-unmasked", "unmasked", ULYSSES2, PADDED),
        Case("ring2-unmasked", "unmasked", RING2, PADDED),
    ],
    4: [
        *mode_cases("ring4", RING4, ["attention", "dit", "denoise"]),
        Case("ring4-attention-few", "attention", RING4, (5,)),
        Case("ring4-dit-few", "dit", RING4, FEW_TOKENS),
        *mode_cases("ulysses2xring2", ULYSSES2_RING2, ["attention", "dit", "denoise"]),
        Case("ulysses2xring2-denoise-teacache", "denoise", ULYSSES2_RING2, PADDED, flexcache="teacache"),
        *mode_cases("cfg2xulysses2", CFG2_ULYSSES2, ["dit", "denoise"]),
        *mode_cases("ulysses4", ULYSSES4, ["attention", "dit"], heads=4),
        Case("ulysses2xring2-unmasked", "unmasked", ULYSSES2_RING2, PADDED),
    ],
}
ALL_CASES = [case for cases in WORLDS.values() for case in cases]

FOUR_HEADS = ModelConfig(
    name="tiny-4-heads",
    display_name="tiny with 4 heads",
    dit=DiTConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=4, text_dim=32, text_len=64),
)


def four_head_dit() -> WanDiT:
    with torch.device("meta"):
        dit = WanDiT(FOUR_HEADS.dit)
    dit.load_state_dict(random_state(dit, 3, torch.device("cpu"), torch.float32), assign=True)
    return dit.eval().requires_grad_(False)


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    return (got.double() - expected.double()).abs().max().item()


def check_attention(case: Case, layout: ParallelLayout, pipeline: WanPipeline, dit: WanDiT) -> dict:
    tokens = case.shape[0]
    length = padded_length(tokens, layout.config.sequence)
    g = torch.Generator().manual_seed(tokens)
    q, k, v = torch.randn(3, 2, length, 4, 16, generator=g)
    # Large padding rows: any padding key that got through would swamp the real ones.
    for x in (q, k, v):
        x[:, tokens:] *= 100
    expected = sdpa(q[:, :tokens], k[:, :tokens], v[:, :tokens])
    backend = sequence_parallel_backend(layout, pipeline.attention, tokens)
    out = backend(*(shard_tokens(x, layout, dim=1) for x in (q, k, v)))
    return {"error": max_error(gather_tokens(out, layout)[:, :tokens], expected)}


def dit_inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(1, 16, *shape, generator=g), torch.tensor([700]), torch.randn(1, 64, 32, generator=g)


def check_dit(case: Case, layout: ParallelLayout, pipeline: WanPipeline, dit: WanDiT) -> dict:
    latents, t, context = dit_inputs(case.shape)
    expected = dit(latents, t, context)
    return {"error": max_error(ShardedDiT(dit, layout, pipeline.attention)(latents, t, context), expected)}


def check_unmasked(case: Case, layout: ParallelLayout, pipeline: WanPipeline, dit: WanDiT) -> dict:
    """The seed's bug on purpose: every padded token is taken for a real key."""
    latents, t, context = dit_inputs(case.shape)
    expected = dit(latents, t, context)
    sharded = ShardedDiT(dit, layout, pipeline.attention)
    degree = layout.config.sequence
    sharded.self_attention_for = lambda tokens: sequence_parallel_backend(
        layout, pipeline.attention, padded_length(tokens, degree)
    )
    return {"error": max_error(sharded(latents, t, context), expected)}


def check_denoise(case: Case, layout: ParallelLayout, pipeline: WanPipeline, dit: WanDiT) -> dict:
    request = {"prompt": "x", "seed": 0, "steps": 6, "guidance": case.guidance, "solver": case.solver}
    if case.flexcache == "cfg_cache":  # the unconditional branch every 2nd step
        request |= {"cfg_cache_interval": 2, "cfg_cache_start": 0, "cfg_cache_end": 1000}
    else:
        request["flexcache"] = case.flexcache
    if case.flexcache == "teacache":
        request["teacache_threshold"] = 0.5  # the tiny model's scale: some steps reuse
    params = validate_params(request, pipeline.model)
    g = torch.Generator().manual_seed(sum(case.shape))
    latents = torch.randn(1, 16, *case.shape, generator=g)
    cond, uncond = torch.randn(2, 1, 64, 32, generator=g)
    expected = pipeline.denoise(latents, cond, uncond, params)  # Guidance: one process
    result = GenerationResult(frames=np.empty(0), params=params, fps=16)
    pipeline.velocity_model = ParallelGuidance(layout)
    try:
        got = pipeline.denoise(latents, cond, uncond, params, result=result)
    finally:
        pipeline.velocity_model = Guidance()
    return {"error": max_error(got, expected), "cache": result.cache}


CHECKS = {
    "attention": check_attention,
    "dit": check_dit,
    "unmasked": check_unmasked,
    "denoise": check_denoise,
}


def run_cases(rank: int, world: int, folder: str, checkpoint: str, cases: list[Case]) -> None:
    """One process of the group: every case, its outcome written to ``folder/rank<rank>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    pipeline = WanPipeline.from_checkpoint(checkpoint, device="cpu")
    four_heads = four_head_dit()
    outcomes = {}
    for case in cases:
        model, dit = (FOUR_HEADS, four_heads) if case.heads == 4 else (pipeline.model, pipeline.experts[0])
        with torch.no_grad():
            outcomes[case.name] = CHECKS[case.check](case, build_layout(case.parallel, model), pipeline, dit)
    Path(folder, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tiny_checkpoint, tmp_path_factory) -> dict[str, list[dict]]:
    """Every case run once, in a group of 2 then one of 4 processes: {case name: outcome per rank}."""
    found: dict[str, list[dict]] = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # 2 cores for up to 4 processes
        for world, cases in WORLDS.items():
            folder = tmp_path_factory.mktemp(f"world{world}")
            mp.spawn(run_cases, args=(world, str(folder), str(tiny_checkpoint), cases), nprocs=world)
            ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]
            found.update({case.name: [outcome[case.name] for outcome in ranks] for case in cases})
    return found


def errors(outcomes: dict, case: Case) -> list[float]:
    return [outcome["error"] for outcome in outcomes[case.name]]


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.check != "unmasked"], ids=lambda c: c.name)
def test_parallel_matches_one_process(outcomes, case):
    assert max(errors(outcomes, case)) <= TOLERANCE[case.check], errors(outcomes, case)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.check == "unmasked"], ids=lambda c: c.name)
def test_padding_keys_left_unmasked_would_fail(outcomes, case):
    # The same forward with the padding taken for real keys is off by far more than the tolerance.
    assert min(errors(outcomes, case)) > 100 * TOLERANCE["dit"], errors(outcomes, case)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.flexcache != "none"], ids=lambda c: c.name)
def test_feature_caching_reuses_on_shards(outcomes, case):
    for outcome in outcomes[case.name]:
        cache = outcome["cache"]
        if case.flexcache == "teacache":
            reused = cache["reused"]
        elif case.flexcache == "pab":
            reused = cache["attention"]["self"]["reused"]
        else:
            reused = cache["uncond_reused"]
        assert reused > 0, cache


def test_every_padded_case_needs_padding():
    for case in ALL_CASES:
        sharded = case.parallel.sequence > 1
        if sharded and ("padded" in case.name or "few" in case.name or case.check == "unmasked"):
            tokens = case.shape[0] if case.check == "attention" else math.prod(case.shape) // 4
            assert tokens % case.parallel.sequence, case.name
