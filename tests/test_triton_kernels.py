"""Our Triton sage/sparge kernels (kernels/triton_sage.py, kernels/triton_sparge.py) and their wiring.

The kernels run on this CPU machine through Triton's interpreter. It must be switched on
(TRITON_INTERPRET=1) before triton is imported, and must not leak into other tests, so each kernel
check (a ``_check_*`` function below) runs in a fresh Python process: ``_in_interpreter`` starts it
and shows its traceback if it fails. This process never imports triton unless a GPU is present.

What the interpreter (Triton 3.9) emulates, measured: int8 x int8 -> int32 ``tl.dot`` exactly; fp8
e4m3 operands in ``tl.dot`` exactly (widened to fp16, fp32 accumulation); fp32 -> fp16 casts
(numpy, round to nearest even). What it does not: its fp32 -> fp8 e4m3 cast rounds ties away from
zero and drops the carry into odd exponents (31.2 -> 16 instead of 32; triton-lang/triton#8322,
open fixes in PRs #9808 and #11897), so every child first replaces that one conversion with torch's
(``_faithful_fp8_casts``), which rounds as the GPU's cvt.rn.satfinite.e4m3x2.f32 does. That the
attention kernels compile for Hopper (to sm_90 cubins, ptxas included) is checked here too, without
a GPU (``test_kernels_compile_for_hopper``). The GPU's own cast, and everything compiled running, is
checked by ``test_compiled_kernels_on_gpu`` (CUDA machines only) and by bench/attention_gpu.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from smartdiff.kernels import get_backend
from smartdiff.kernels.reference import (
    _sage_core,
    _token_mask,
    attention_reference,
    block_mask,
    clustered_qkv,
    quantize_int8_per_block,
    relative_error,
    sage_reference,
    sparse_reference,
)
from smartdiff.kernels.registry import BackendUnavailable
from smartdiff.kernels.sparge import SparsityStats

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The interpreter these checks were measured with (the test extra's pin). Older ones differ: on a
# GPU machine with Triton 3.6, its interpreter failed at the kernels' runtime loop bound
# (range(0, n_k // BLOCK_N): "only 0-dimensional arrays can be converted to Python scalars").
INTERPRETER_VERSION = "3.9.0"


def _in_interpreter(check: Callable[..., None], **kwargs: object) -> None:
    """Run ``check(**kwargs)`` in a fresh Python with Triton's interpreter on; fail with its output."""
    installed = importlib.metadata.version("triton")
    if installed != INTERPRETER_VERSION:  # e.g. a GPU machine's own Triton: the compiled test covers it
        pytest.skip(f"the interpreter checks need triton=={INTERPRETER_VERSION} (installed: {installed})")
    _in_fresh_python(check, {**os.environ, "TRITON_INTERPRET": "1"}, kwargs)


def _in_fresh_python(check: Callable[..., None], env: dict[str, str], kwargs: dict) -> None:
    code = (
        f"import json, sys; sys.path.insert(0, {str(TESTS)!r}); import test_triton_kernels as t; "
        f"t._child_main({check.__name__!r}, json.loads(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code, json.dumps(kwargs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{check.__name__}({kwargs}) failed:\n{result.stdout}\n{result.stderr}"


def _child_main(name: str, kwargs: dict) -> None:
    assert "triton" not in sys.modules
    if os.environ.get("TRITON_INTERPRET") == "1":
        _faithful_fp8_casts()
    globals()[name](**kwargs)


def _faithful_fp8_casts() -> None:
    """Replace the interpreter's fp32 -> fp8 e4m3 cast (see the module docstring) with torch's."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(values, from_dtype, to_dtype, rounding_mode):
        if from_dtype == tl.float32 and to_dtype == tl.float8e4nv:
            x = torch.from_numpy(np.ascontiguousarray(values).view(np.float32))
            # The GPU's cvt saturates; torch's cast would give NaN past 448.
            return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return original(values, from_dtype, to_dtype, rounding_mode)

    interpreter._convert_float = convert


def _gaussian(
    tokens: int, dim: int, heads: int = 2, seed: int = 0, kv_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = kv_tokens or tokens
    return (
        torch.randn(1, tokens, heads, dim, generator=g),
        torch.randn(1, kv, heads, dim, generator=g),
        torch.randn(1, kv, heads, dim, generator=g),
    )


# --- checks run in the interpreter ---------------------------------------------------------------


def _check_fp8_casts_round_like_torch() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, N: tl.constexpr):
        offsets = tl.arange(0, N)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.float8e4nv, fp_downcast_rounding="rtne"))

    # 31.2 and 126.5 are where the interpreter's own cast goes wrong; 100 and 104 are ties; 500 saturates.
    x = torch.tensor([31.2, 126.5, 100.0, 104.0, 500.0, -500.0, 0.3, 3e-3] + [0.0] * 8)
    y = torch.empty(16, dtype=torch.float8_e4m3fn)
    cast[(1,)](x, y, 16)
    assert torch.equal(y.float(), x.clamp(-448, 448).to(torch.float8_e4m3fn).float())
    assert y[0].item() == 32.0 and y[2].item() == 96.0 and y[4].item() == 448.0


def _check_quantiser_matches_reference(dtype: str) -> None:
    from smartdiff.kernels import triton_sage

    q, k, _ = (t.to(DTYPES[dtype]) for t in _gaussian(tokens=300, dim=64, seed=1))
    values, scales = triton_sage.quantize_int8_per_block(q, 128)
    assert values.shape == (2, 384, 64) and scales.shape == (2, 3)
    ref_values, ref_scales = quantize_int8_per_block(q.transpose(1, 2), 128)
    assert torch.equal(values.view(1, 2, 384, 64)[:, :, :300], ref_values)
    assert torch.equal(scales.view(1, 2, 3), ref_scales)
    assert not values[:, 300:].any()  # zero padding, which the kernel reads unmasked

    # K smoothing: the mean is taken in another order than the reference's, so allow one step.
    mean = k.mean(dim=1, dtype=torch.float32)
    values, scales = triton_sage.quantize_int8_per_block(k, 64, mean=mean)
    kh = k.transpose(1, 2).float()
    ref_values, ref_scales = quantize_int8_per_block(kh - kh.mean(dim=-2, keepdim=True), 64)
    torch.testing.assert_close(scales.view(1, 2, 5), ref_scales, rtol=1e-5, atol=0)
    step_diff = (values.view(1, 2, 320, 64)[:, :, :300].int() - ref_values.int()).abs()
    assert step_diff.max() <= 1 and (step_diff == 0).float().mean() > 0.999
    assert not values[:, 300:].any()


def _check_v_is_scaled_per_channel_and_transposed() -> None:
    from smartdiff.kernels.triton_sage import prepare_v

    _, _, v = _gaussian(tokens=100, dim=64, seed=2)
    v = v * torch.linspace(0.1, 10.0, 64)  # channels of very different ranges
    v8, scale = prepare_v(v, 64, pv_fp8=True)
    assert v8.dtype == torch.float8_e4m3fn and v8.shape == (2, 64, 128) and scale.shape == (2, 64)
    expected_scale = v.abs().amax(dim=1)[0] / 448.0  # (heads, d)
    torch.testing.assert_close(scale, expected_scale)
    expected = (v[0].permute(1, 2, 0) / expected_scale[..., None]).to(torch.float8_e4m3fn)
    # The keys of each 16 in the fp8 product's operand order: position 4q + 2h + b holds key
    # 2q + 8h + b. Padded to 128 keys with zeros first, as the kernel stores them.
    padded = torch.zeros(2, 64, 128, dtype=torch.float8_e4m3fn)
    padded[..., :100] = expected
    key_of = torch.tensor([2 * q + 8 * h + b for q in range(4) for h in range(2) for b in range(2)])
    order = (torch.arange(0, 128, 16)[:, None] + key_of).flatten()
    assert torch.equal(v8.float(), padded[..., order].float())
    assert v8.float().abs().amax(dim=-1).eq(448.0).all()  # each channel's max reaches 448
    v16, ones = prepare_v(v, 64, pv_fp8=False)
    assert v16.dtype == torch.float16 and torch.equal(v16[..., :100], v[0].permute(1, 2, 0).half())
    assert torch.equal(ones, torch.ones(2, 64))


def _check_sage_fp16_pv_matches_reference(tokens: int, dim: int, kv_tokens: int | None = None) -> None:
    from smartdiff.kernels.triton_sage import CONFIGS, sage_attention

    q, k, v = _gaussian(tokens, dim, seed=3, kv_tokens=kv_tokens)
    out = sage_attention(q, k, v, pv_fp8=False)
    assert out.shape == q.shape and out.dtype == q.dtype
    config = CONFIGS[dim]
    oracle = sage_reference(q, k, v, block_q=config.block_m, block_k=config.block_n, pv_dtype=None)
    # Same numerics except that the kernel rounds P~ against the running row max (online softmax).
    assert relative_error(out, oracle) < 1e-3
    exact = attention_reference(q, k, v)
    err, oracle_err = relative_error(out, exact), relative_error(oracle, exact)
    assert abs(err - oracle_err) < 0.05 * oracle_err


def _check_sage_fp8_pv_matches_reference(tokens: int, dim: int) -> None:
    from smartdiff.kernels.triton_sage import CONFIGS, sage_attention

    q, k, v = _gaussian(tokens, dim, seed=4)
    out = sage_attention(q, k, v, pv_fp8=True)
    exact = attention_reference(q, k, v)
    oracle = sage_reference(q, k, v, block_q=CONFIGS[dim].block_m, block_k=CONFIGS[dim].block_n)
    err, oracle_err = relative_error(out, exact), relative_error(oracle, exact)
    # fp8 P~ quantised against the running max instead of the final one: same size of error.
    assert 0.01 < err < 0.1
    assert abs(err - oracle_err) < 0.2 * oracle_err
    assert err > 2 * relative_error(sage_attention(q, k, v, pv_fp8=False), exact)  # fp8 really used


def _check_sage_on_clustered_inputs() -> None:
    from smartdiff.kernels.triton_sage import sage_attention

    q, k, v = clustered_qkv(1, 2, 450, 64, clusters=6, seed=5)
    exact = attention_reference(q, k, v)
    err = relative_error(sage_attention(q, k, v), exact)
    assert 1e-4 < err < 0.02
    assert err < 1.5 * relative_error(sage_reference(q, k, v), exact)


def _check_sage_keeps_the_input_dtype(dtype: str) -> None:
    from smartdiff.kernels.triton_sage import sage_attention

    q, k, v = _gaussian(200, 64, seed=6)
    half = [t.to(DTYPES[dtype]) for t in (q, k, v)]
    out = sage_attention(*half)
    assert out.dtype == DTYPES[dtype] and out.shape == q.shape and out.isfinite().all()
    assert relative_error(out, attention_reference(*half)) < 0.1


def _check_tma_loads_give_the_pointer_kernels_output() -> None:
    from smartdiff.kernels.triton_sage import KernelConfig, sage_attention
    from smartdiff.kernels.triton_sparge import block_sparse_sage_attention

    # 200 queries and 300 keys: partial last tiles of both, and a tail key block.
    q, k, v = _gaussian(200, 64, seed=14, kv_tokens=300)
    mask = _hand_made_mask()[:, :, :2]  # 2 map rows of 128 queries, 5 key blocks
    pointers, tma = KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 2, tma=True)
    for pv_fp8 in (True, False):
        assert torch.equal(sage_attention(q, k, v, pv_fp8, tma), sage_attention(q, k, v, pv_fp8, pointers))
        sparse = block_sparse_sage_attention(q, k, v, mask, pv_fp8, tma)
        assert torch.equal(sparse, block_sparse_sage_attention(q, k, v, mask, pv_fp8, pointers))


def _check_kernels_compile_for_hopper() -> None:
    """The attention kernels and the block map's selection through Triton's whole pipeline to an
    sm_90 cubin (ptxas included), at the default configs and with TMA loads: what the interpreter
    cannot show, without a GPU."""
    from smartdiff.kernels.triton_build import (
        compile_for_hopper,
        compile_fp8_norm_for_hopper,
        compile_fp8_quantize_for_hopper,
        compile_gluon_for_hopper,
        compile_selection_for_hopper,
        compile_vae_norm_for_hopper,
        compile_vae_residual_sum_for_hopper,
        default_configs,
        instruction_counts,
        resource_usage,
    )
    from smartdiff.kernels.triton_sage import HOPPER_REGISTERS

    for d in (64, 128):
        for tma in (False, True):
            for kind, config in default_configs(d, tma).items():
                compiled = compile_for_hopper(kind == "sparse", config, d)
                assert len(compiled.asm["cubin"]) > 1000
                # Q.K as int8 and P.V as fp8 warpgroup products, no 16-bit one: the 8-bit numerics
                # run on Hopper's 8-bit tensor-core instructions. And P feeds its product from the
                # registers the scores left it in (fp8_operand_order): no shuffle by index, which a
                # change of register layout needs and the row reductions (SHFL.BFLY) do not.
                counts = instruction_counts(compiled)
                products = {op.split(".")[0] for op in counts if "GMMA" in op}
                assert products == {"IGMMA", "QGMMA"} and "SHFL.IDX" not in counts, counts
                # The row max shuffles across a row's 4 threads in each of the two tile bodies (the
                # loop, the partial last tile); the row sum, kept in 4 parts (rescaled_row_sums),
                # once at the end: 2 butterfly rounds a row each time.
                rows_per_thread = 2 * config.block_m // (config.num_warps * 16)  # 2 of each warp's 16
                assert counts["SHFL.BFLY"] == 3 * 2 * rows_per_thread, counts
    # A register cap reaches ptxas: the dense default's tiles (at one stage, so that shared memory
    # leaves room for four programs) take more than a four-program share of the multiprocessor's
    # registers uncapped; capped at that share, four of their programs fit.
    dense = replace(default_configs(128, tma=True)["dense"], num_stages=1)
    four_programs = HOPPER_REGISTERS // (4 * dense.num_warps * 32)
    assert resource_usage(compile_for_hopper(False, dense, 128))["registers"] > four_programs
    usage = resource_usage(compile_for_hopper(False, replace(dense, max_registers=four_programs), 128))
    assert usage["registers"] <= four_programs and usage["programs_per_multiprocessor"] == 4, usage
    # The block map's selection: 1.3B and 14B rows (512 and 1,182 key blocks), both cuts.
    for n_pad, use_cdf in ((512, False), (2048, True)):
        assert len(compile_selection_for_hopper(n_pad, use_cdf, use_sim=True).asm["cubin"]) > 1000
    # fp8 activations: the 1.3B and 14B widths and the 14B feed-forward's hidden, with the GELU.
    for cols, gelu in ((1536, False), (5120, False), (13824, True)):
        assert len(compile_fp8_quantize_for_hopper(cols, gelu).asm["cubin"]) > 1000
    for cols in (1536, 5120):  # the fp8 linears' input norms, 1.3B and 14B
        assert len(compile_fp8_norm_for_hopper(cols).asm["cubin"]) > 1000
    # The VAE's channel norm at every width, with and without a convolution's bias; its residual sum.
    for channels, silu, bias in (
        (96, True, True),
        (192, True, False),
        (384, False, False),
        (384, True, True),
    ):
        assert len(compile_vae_norm_for_hopper(channels, silu, bias).asm["cubin"]) > 1000
    for channels in (96, 192, 384):
        assert len(compile_vae_residual_sum_for_hopper(channels).asm["cubin"]) > 1000
    # The Gluon attention kernel, dense and block-sparse: in its loop the next tile's Q.K is issued
    # before this tile's softmax, and waited for only after this tile's P.V is issued.
    for sparse in (False, True):
        compiled = compile_gluon_for_hopper(sparse)
        assert len(compiled.asm["cubin"]) > 1000
        schedule = _mma_schedule(compiled.asm["ptx"])
        assert any(schedule[i : i + 4] == ["q.k", "exp2", "p.v", "wait"] for i in range(len(schedule))), (
            schedule
        )


def _mma_schedule(ptx: str) -> list[str]:
    """The PTX's int8 and fp8 MMAs, MMA waits and exp2s in order, repeats of one kind collapsed."""
    kinds = {"s8": "q.k", "e4m3": "p.v", "wait": "wait", "ex2": "exp2"}
    schedule: list[str] = []
    for op in re.findall(r"wgmma\.mma_async\S*\.(s8|e4m3)\.|wgmma\.(wait)_group|(ex2)\.approx", ptx):
        kind = kinds["".join(op)]
        if not schedule or schedule[-1] != kind:
            schedule.append(kind)
    return schedule


def _check_fp8_row_quantiser_matches_the_reference() -> None:
    import torch.nn.functional as F

    from smartdiff.kernels.triton_fp8 import quantize_rows_fused
    from smartdiff.pipeline.fp8 import dequantize_rows, quantize_rows

    g = torch.Generator().manual_seed(5)
    # Rows of very different ranges, one zero row, and a width of three chunks of 1,024 columns, the
    # last one masked (its largest value in the tail for some rows).
    x = torch.randn(7, 2600, generator=g) * torch.logspace(-3, 2, 7)[:, None]
    x[::2, 2599] = 30.0
    x[3] = 0.0
    x = x.to(torch.bfloat16)
    values, scale = quantize_rows_fused(x)
    expected_values, expected_scale = quantize_rows(x)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    # With the GELU in fp32 first: the same up to the tanh's last bits (one e4m3 step at most). Three
    # more rows put the largest |GELU| on the negative side, where the first pass finds it without
    # the GELU: all below GELU's minimum (at -0.7525), all between it and 0, and across it.
    negative = torch.rand(3, 2600, generator=g) * torch.tensor([[-5.0], [-0.75], [-2.1]])
    negative[0] -= 0.76
    negative[2] += 0.1
    x = torch.cat([x, negative.to(torch.bfloat16)])
    values, scale = quantize_rows_fused(x, gelu=True)
    expected_values, expected_scale = quantize_rows(F.gelu(x.float(), approximate="tanh"))
    torch.testing.assert_close(scale, expected_scale, rtol=1e-5, atol=0)
    step = 2.0**-3 * dequantize_rows(expected_values, expected_scale).abs() + 2.0**-9 * expected_scale
    assert bool(
        (
            (dequantize_rows(values, scale) - dequantize_rows(expected_values, expected_scale)).abs() <= step
        ).all()
    )


def _check_fp8_norm_quantiser_matches_the_reference() -> None:
    import torch.nn.functional as F

    from smartdiff.kernels.triton_fp8 import norm_quantize_rows
    from smartdiff.pipeline.fp8 import dequantize_rows, quantize_rows

    g = torch.Generator().manual_seed(7)
    # Two batch entries of 4 tokens, 2,600 columns (three chunks, the last masked): rows of very
    # different ranges, one far from zero on average (the variance must not cancel), one constant
    # (its norm is the modulation's ``add`` alone).
    x = torch.randn(2, 4, 2600, generator=g) * torch.logspace(-2, 2, 8).view(2, 4, 1)
    x[0, 1] += 500.0
    x[1, 2] = 3.0
    x = x.to(torch.bfloat16)
    mul, add = 1 + torch.randn(2, 2600, generator=g), torch.randn(2, 2600, generator=g)
    weight, bias = torch.randn(2600, generator=g), torch.zeros(2600)
    for m, a in ((mul, add), (weight, bias)):  # per batch entry (modulated), one for all (affine)
        m3, a3 = (t.expand(2, 2600)[:, None] for t in (m, a))
        normed = F.layer_norm(x.double(), (2600,), eps=1e-6) * m3.double() + a3.double()
        values, scale = norm_quantize_rows(x, m, a, 1e-6)
        expected_values, expected_scale = quantize_rows(normed.flatten(0, 1))
        torch.testing.assert_close(scale, expected_scale.float(), rtol=1e-5, atol=1e-12)
        # Within one e4m3 step of the quantised float64 norm (fp32 math, other reduction order).
        step = 2.0**-3 * dequantize_rows(expected_values, expected_scale).abs() + 2.0**-9 * expected_scale
        difference = dequantize_rows(values, scale) - dequantize_rows(expected_values, expected_scale)
        assert bool((difference.abs() <= step).all())
    # A constant row with no ``add``: all zero, and the smallest scale.
    values, scale = norm_quantize_rows(x, weight, bias, 1e-6)
    assert scale[6].item() == torch.tensor(1e-12).item() and not values[6].float().any()


def _check_vae_norm_matches_pytorch() -> None:
    import torch.nn.functional as F

    from smartdiff.kernels.triton_norm import rms_norm_channels
    from smartdiff.pipeline.vae import RMSNorm

    g = torch.Generator().manual_seed(6)
    # Two batch entries, 5 and 40 channels (padded to 8 and 64), positions that are no multiple of a
    # program's rows (the masked tail), one position all zero (the epsilon), and a 2-D norm's input
    # (the VAE's attention block); inputs in either layout, channels-last out.
    for shape in ((2, 5, 3, 7, 50), (3, 5, 9, 11), (2, 40, 2, 3, 5)):
        x = torch.randn(shape, generator=g)
        x[0, :, 0] = 0.0
        channels = shape[1]
        norm = RMSNorm(channels, spatial_dims=len(shape) - 2)
        layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
        with torch.no_grad():
            norm.gamma.uniform_(0.5, 1.5, generator=g)
            for silu in (False, True):
                expected = norm.reference(x, silu)
                for given in (x, x.contiguous(memory_format=layout)):
                    got = rms_norm_channels(given, norm.gamma, silu)
                    assert got.is_contiguous(memory_format=layout)
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
                assert got.abs().max() > 0.5  # not a zero output passing
            # bf16 in, bf16 out: fp32 inside, one rounding, within one bf16 step (2^-7 relative): the
            # interpreter's fp32 -> bf16 cast truncates (1.0 + 2^-7 - 2^-12 -> 1.0, measured) where the
            # GPU's rounds to nearest.
            got = rms_norm_channels(x.bfloat16(), norm.gamma.bfloat16(), silu=True)
            assert got.dtype == torch.bfloat16
            gamma = norm.gamma.bfloat16().float()
            exact = F.silu(F.normalize(x.bfloat16().float(), dim=1) * channels**0.5 * gamma)
            torch.testing.assert_close(got.float(), exact, rtol=2**-7, atol=1e-6)
    # With a causal conv's past frames: those frames first, untouched, then the norm of x's, for
    # each batch entry (the output's batch stride is not the input's).
    x = torch.randn(2, 5, 3, 4, 6, generator=g)
    past = torch.randn(2, 5, 2, 4, 6, generator=g)
    norm = RMSNorm(5)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5, generator=g)
        got = rms_norm_channels(x, norm.gamma, silu=True, past=past)
        assert got.shape == (2, 5, 5, 4, 6) and got.is_contiguous(memory_format=torch.channels_last_3d)
        assert torch.equal(got[:, :, :2], past)
        torch.testing.assert_close(got[:, :, 2:], norm.reference(x, silu=True), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm(x, silu=True, past=past), got, rtol=1e-5, atol=1e-6)  # CPU path
        # A convolution's bias added by the norm: the norm of x + bias, with and without past frames.
        bias = torch.randn(5, generator=g) * 3
        expected = norm.reference(x + bias.view(-1, 1, 1, 1), silu=True)
        got = rms_norm_channels(x, norm.gamma, True, bias=bias)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        got = rms_norm_channels(x, norm.gamma, True, past=past, bias=bias)
        assert torch.equal(got[:, :, :2], past)
        torch.testing.assert_close(got[:, :, 2:], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm(x, silu=True, past=past, bias=bias), got, rtol=1e-5, atol=1e-6)


def _check_vae_residual_sum_matches_pytorch() -> None:
    from smartdiff.kernels.triton_norm import residual_sum

    g = torch.Generator().manual_seed(7)
    # 40 channels; 2 x 40 x 3 x 7 x 9 elements, no multiple of a program's block (the masked tail);
    # either input layout, channels-last out; a bf16 sum rounded once from fp32.
    y, skip = torch.randn(2, 2, 40, 3, 7, 9, generator=g).unbind(0)
    bias = torch.randn(40, generator=g)
    expected = y + bias.view(-1, 1, 1, 1) + skip
    for given in (y, y.contiguous(memory_format=torch.channels_last_3d)):
        got = residual_sum(given, bias, skip)
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    got = residual_sum(y.bfloat16(), bias, skip.bfloat16())
    exact = y.bfloat16().float() + bias.view(-1, 1, 1, 1) + skip.bfloat16().float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, rtol=2**-7, atol=1e-6)


def _check_sage_rejects_what_it_cannot_run() -> None:
    from smartdiff.kernels.triton_sage import sage_attention

    q, k, v = _gaussian(64, 64)
    for bad in (
        (q, k, v[..., :32]),  # head dims differ
        (q[..., :48], k[..., :48], v[..., :48]),  # head dim 48
        (q.double(), k.double(), v.double()),  # float64
        (q, k[:, :10], v),  # k and v token counts differ
    ):
        try:
            sage_attention(*bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted shapes {[tuple(t.shape) for t in bad]} / {bad[0].dtype}")


def _check_sparse_with_every_block_equals_dense() -> None:
    from smartdiff.kernels.triton_sage import sage_attention
    from smartdiff.kernels.triton_sparge import block_sparse_sage_attention

    q, k, v = _gaussian(300, 64, seed=7)
    everything = torch.ones(1, 2, 3, 5, dtype=torch.bool)
    for pv_fp8 in (True, False):
        dense = sage_attention(q, k, v, pv_fp8=pv_fp8)
        assert torch.equal(block_sparse_sage_attention(q, k, v, everything, pv_fp8=pv_fp8), dense)


def _hand_made_mask() -> torch.Tensor:
    """(1, 2, 3, 5): head 0 drops the partial last key block everywhere and query block 0 keeps
    nothing; head 1 keeps the partial block (last in its list) for query blocks 0 and 2."""
    return torch.tensor(
        [
            [[0, 0, 0, 0, 0], [1, 0, 1, 1, 0], [0, 1, 0, 1, 0]],
            [[1, 0, 0, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]],
        ],
        dtype=torch.bool,
    )[None]


def _check_sparse_at_a_hand_made_mask() -> None:
    from smartdiff.kernels.triton_sage import KernelConfig
    from smartdiff.kernels.triton_sparge import block_sparse_sage_attention

    q, k, v = _gaussian(300, 64, seed=8)
    mask = _hand_made_mask()
    token_mask = _token_mask(mask, 128, 64, 300, 300)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    # 64-token query tiles share their map block's list; Q is then quantised per 64 tokens.
    for block_m in (64, 128):
        config = KernelConfig(block_m=block_m, block_n=64, num_warps=4, num_stages=2)
        out = block_sparse_sage_attention(q, k, v, mask, pv_fp8=False, config=config)
        # The same numerics over the kept tokens only, in torch: int8 Q.K, smoothing, fp16 P.V.
        oracle = _sage_core(qh, kh, vh, block_m, 64, None, True, token_mask).transpose(1, 2)
        assert relative_error(out, oracle) < 1e-3
    out = block_sparse_sage_attention(q, k, v, mask, pv_fp8=False)
    assert not out[:, :128, 0].any()  # head 0, query block 0 kept nothing: zeros, as the reference
    exact = sparse_reference(q, k, v, mask)
    assert relative_error(out, exact) < 0.03
    fp8 = block_sparse_sage_attention(q, k, v, mask, pv_fp8=True)
    assert 0.01 < relative_error(fp8, exact) < 0.1


def _check_dropped_blocks_are_never_read() -> None:
    from smartdiff.kernels.triton_sparge import block_sparse_sage_attention

    q, k, v = _gaussian(300, 64, seed=9)
    mask = _hand_made_mask()
    before = block_sparse_sage_attention(q, k, v, mask, pv_fp8=False)
    # Key block 4 (tokens 256-299) is dropped for every query block of head 0. With fp16 P.V no V
    # scale spans all tokens, so NaN there reaches the output only if the kernel reads it.
    v = v.clone()
    v[:, 256:] = float("nan")
    after = block_sparse_sage_attention(q, k, v, mask, pv_fp8=False)
    assert torch.equal(after[:, :, 0], before[:, :, 0])
    assert after[:, :, 1].isnan().any()  # head 1 keeps that block: the NaN does arrive there


def _check_sparge_uses_the_reference_block_map() -> None:
    from smartdiff.kernels.triton_sparge import (
        block_map,
        block_sparse_sage_attention,
        kept_block_lists,
        sparge_attention,
    )

    q, k, v = clustered_qkv(1, 2, 700, 64, clusters=5, seed=10)
    selections = (
        {"topk": 0.5, "sim_threshold": None},
        {"topk": 0.25, "sim_threshold": 0.6},
        {"cdf": 0.9, "sim_threshold": 0.6},
        {"cdf": 0.5, "sim_threshold": 0.3},
        {"cdf": 1.0, "sim_threshold": None},
    )
    for selection in selections:
        out, mask = sparge_attention(q, k, v, **selection)
        assert torch.equal(mask, block_mask(q, k, 128, 64, **selection))
        assert torch.equal(out, block_sparse_sage_attention(q, k, v, mask))
        # The map's own kept lists: those of its mask, ascending.
        blocks, (kept, counts) = block_map(q, k, **selection), kept_block_lists(mask)
        assert torch.equal(blocks.counts, counts)
        listed = torch.arange(kept.shape[-1]) < counts[..., None]  # the entries the kernel reads
        assert torch.equal(blocks.kept[listed], kept[listed])
    _, mask = sparge_attention(q, k, v, topk=0.5, sim_threshold=None)
    assert (mask.sum(dim=-1) == 5).all()  # int(0.5 * 11 key blocks) kept by every query block
    # Gaussian tokens are alike in no block: every block is kept, whatever the selection.
    gaussian_q, gaussian_k = torch.randn(1, 300, 2, 64), torch.randn(1, 300, 2, 64)
    assert block_map(gaussian_q, gaussian_k, topk=0.25, sim_threshold=0.6).mask.all()


def _check_pooling_matches_the_reference() -> None:
    from smartdiff.kernels.reference import _heads_first, _pool_and_similarity
    from smartdiff.kernels.triton_sparge import pool_blocks

    q, k, _ = clustered_qkv(2, 3, 300, 64, clusters=4, seed=11)  # 300: a partial last block
    k_mean = k.mean(dim=1)
    for x, block, mean in ((q, 128, None), (k, 64, k_mean)):
        pooled, sim = pool_blocks(x, block, mean=mean)
        xh = _heads_first(x) - (0 if mean is None else mean[:, :, None, :])
        ref_pooled, ref_sim = _pool_and_similarity(xh, block)
        torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sim, ref_sim, rtol=1e-5, atol=1e-6)
        assert sim.min() < 0.5 < sim.max()  # clusters that cross blocks and blocks inside one


def _check_block_map_at_many_key_blocks_and_ties() -> None:
    from smartdiff.kernels.triton_sparge import block_map

    # Many key blocks per row (128), as the 14B shape has (1,182): the selection against the reference.
    q, k, _ = clustered_qkv(1, 2, 8192, 64, clusters=40, seed=12)
    for selection in ({"topk": 0.3}, {"cdf": 0.7}, {"cdf": 0.95}):
        mask = block_map(q, k, sim_threshold=None, **selection).mask
        assert torch.equal(mask, block_mask(q, k, 128, 64, sim_threshold=None, **selection))
        assert 0 < mask.float().mean() < 1
    # Exact ties: one query block, key blocks of constant tokens scoring 5, 4, 3, 3, 3, 3, 1, 0, ...
    # A cut inside the tie keeps the lowest indices first.
    q = torch.zeros(1, 128, 1, 64)
    q[..., 0] = 1.0
    levels = torch.tensor([5.0, 4, 3, 3, 3, 3, 1] + [0.0] * 9)
    k = torch.zeros(1, 16 * 64, 1, 64)
    k[0, :, 0, 0] = levels.repeat_interleave(64)
    for topk, kept in ((0.25, 4), (0.3125, 5), (0.375, 6)):
        mask = block_map(q, k, topk=topk, sim_threshold=None).mask[0, 0, 0]
        assert mask.tolist() == [i < kept for i in range(16)], (topk, mask)
    score = (levels - levels.mean()) * 64**-0.5  # the pooled scores: K smoothed, q = e0
    p = torch.softmax(score, dim=0)
    for crossing in (2, 3, 4):  # cdf just below the mass of blocks 0..crossing: keep 0..crossing
        cdf = float(p[: crossing + 1].sum()) - 1e-4
        mask = block_map(q, k, cdf=cdf, sim_threshold=None).mask[0, 0, 0]
        assert mask.tolist() == [i <= crossing for i in range(16)], (cdf, mask)


def _check_kept_block_lists() -> None:
    from smartdiff.kernels.triton_sparge import kept_block_lists

    mask = torch.rand(2, 3, 4, 9, generator=torch.Generator().manual_seed(11)) < 0.4
    kept, counts = kept_block_lists(mask)
    assert kept.dtype == counts.dtype == torch.int32
    flat = mask.flatten(0, 1)
    for row in range(6):
        for q_block in range(4):
            expected = flat[row, q_block].nonzero().flatten()
            assert counts[row, q_block] == len(expected)
            assert torch.equal(kept[row, q_block, : len(expected)].long(), expected)


def _pretend_cuda(capability: tuple[int, int]) -> None:
    """Let the backends build on this CPU: the interpreter runs their kernels on CPU tensors."""
    from smartdiff.kernels import sage, sparge

    sage.needs_cuda = sparge.needs_cuda = lambda device: []
    sage._gpu_capability = lambda device: capability


def _check_backends_run_our_kernels() -> None:
    from smartdiff.kernels.triton_sage import sage_attention
    from smartdiff.kernels.triton_sparge import sparge_attention

    _pretend_cuda((9, 0))
    q, k, v = clustered_qkv(1, 2, 300, 64, clusters=3, seed=12)
    backend = get_backend("sage", "cpu", implementation="triton")
    assert backend.implementation.startswith("smartdiff-triton int8-qk fp8-pv (triton-")
    assert backend.error_class == "8bit"
    assert torch.equal(backend(q, k, v), sage_attention(q, k, v, pv_fp8=True))

    stats = SparsityStats()
    sparse = get_backend("sparge", "cpu", implementation="triton", topk=0.5, sim_threshold=-1.0, stats=stats)
    assert sparse.implementation.startswith("smartdiff-triton block-sparse topk=0.5 sim>-1.0 int8-qk fp8-pv")
    assert sparse.error_class == "sparse"
    # The text is not a video: its cross-attention runs exact, and stays out of the statistics.
    assert sparse.for_cross_attention() == get_backend("sdpa", "cpu")
    assert sparse.implementation.endswith("; cross-attention torch-sdpa-cpu")
    out = sparse(q, k, v)
    expected, mask = sparge_attention(q, k, v, topk=0.5, sim_threshold=None)
    assert torch.equal(out, expected)
    sparse(q, k, v)
    summary = stats.summary()
    assert summary["calls"] == 2 and summary["total_blocks"] == 2 * mask.numel()
    assert summary["kept_blocks"] == 2 * int(mask.sum())
    assert summary["kept_fraction"] == 0.4  # int(0.5 * 5) of the 5 key blocks of each query block
    # A CUDA graph that captured the calls adds to the same tensor at every replay: reset in place.
    counts = stats._counts
    stats.reset()
    sparse(q, k, v)
    assert stats._counts is counts and stats.summary()["calls"] == 1


def _check_backends_choose_pv_by_gpu() -> None:
    _pretend_cuda((8, 0))  # an A100: int8 tensor cores, no fp8
    assert "fp16-pv" in get_backend("sage", "cpu", implementation="triton").implementation
    assert "fp16-pv" in get_backend("sparge", "cpu", implementation="triton").implementation
    for name in ("sage", "sparge"):
        try:
            get_backend(name, "cpu", implementation="triton", pv="fp8")
        except BackendUnavailable as e:
            assert "sm_89" in str(e) and "sm_80" in str(e)
        else:
            raise AssertionError(f"{name}: fp8 P.V accepted on sm_80")
    _pretend_cuda((7, 5))
    try:
        get_backend("sage", "cpu", implementation="triton", pv="fp16")
    except BackendUnavailable as e:
        assert "sm_80+" in str(e) and "sm_75" in str(e)
    else:
        raise AssertionError("our kernel accepted on sm_75")


# --- tests ---------------------------------------------------------------------------------------


def test_the_fp8_casts_of_the_test_interpreter_round_like_the_gpu():
    _in_interpreter(_check_fp8_casts_round_like_torch)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_quantiser_matches_the_reference(dtype):
    _in_interpreter(_check_quantiser_matches_reference, dtype=dtype)


def test_fp8_row_quantiser_matches_the_reference():
    _in_interpreter(_check_fp8_row_quantiser_matches_the_reference)


def test_fp8_norm_quantiser_matches_the_reference():
    _in_interpreter(_check_fp8_norm_quantiser_matches_the_reference)


def test_the_vae_norm_kernel_matches_pytorch():
    _in_interpreter(_check_vae_norm_matches_pytorch)


def test_the_vae_residual_sum_kernel_matches_pytorch():
    _in_interpreter(_check_vae_residual_sum_matches_pytorch)


def test_v_is_scaled_per_channel_to_fp8_and_transposed():
    _in_interpreter(_check_v_is_scaled_per_channel_and_transposed)


@pytest.mark.parametrize(("tokens", "dim", "kv_tokens"), [(300, 64, None), (200, 128, None), (200, 64, 77)])
def test_sage_kernel_with_fp16_pv_matches_the_reference(tokens, dim, kv_tokens):
    _in_interpreter(_check_sage_fp16_pv_matches_reference, tokens=tokens, dim=dim, kv_tokens=kv_tokens)


@pytest.mark.parametrize(("tokens", "dim"), [(300, 64), (130, 128)])
def test_sage_kernel_with_fp8_pv_has_the_reference_error(tokens, dim):
    _in_interpreter(_check_sage_fp8_pv_matches_reference, tokens=tokens, dim=dim)


def test_sage_kernel_on_clustered_inputs():
    _in_interpreter(_check_sage_on_clustered_inputs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sage_kernel_keeps_the_input_dtype(dtype):
    _in_interpreter(_check_sage_keeps_the_input_dtype, dtype=dtype)


def test_tma_loads_give_the_pointer_kernels_output():
    _in_interpreter(_check_tma_loads_give_the_pointer_kernels_output)


@pytest.mark.parametrize(("capability", "tma"), [((8, 9), False), ((9, 0), True), ((10, 0), True)])
def test_default_configs_read_through_tma_from_sm90_on(monkeypatch, capability, tma):
    from smartdiff.kernels.triton_sage import CONFIGS, for_device
    from smartdiff.kernels.triton_sparge import sparse_config

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert CONFIGS[128].tma and sparse_config(128, torch.device("cpu")).tma  # the tuned defaults
    for default in (for_device(CONFIGS[128], cuda), sparse_config(128, cuda)):
        assert default.tma == tma
    assert for_device(CONFIGS[128], cuda).block_m == CONFIGS[128].block_m  # same tiles either way


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _in_fresh_python(_check_kernels_compile_for_hopper, env, {})


def test_sage_kernel_rejects_inputs_it_cannot_run():
    _in_interpreter(_check_sage_rejects_what_it_cannot_run)


def test_sparse_kernel_with_every_block_kept_equals_the_dense_kernel():
    _in_interpreter(_check_sparse_with_every_block_equals_dense)


def test_sparse_kernel_at_a_hand_made_mask_matches_the_masked_reference():
    _in_interpreter(_check_sparse_at_a_hand_made_mask)


def test_sparse_kernel_never_reads_dropped_blocks():
    _in_interpreter(_check_dropped_blocks_are_never_read)


def test_sparge_attention_uses_the_reference_block_map():
    _in_interpreter(_check_sparge_uses_the_reference_block_map)


def test_pooling_for_the_block_map_matches_the_reference():
    _in_interpreter(_check_pooling_matches_the_reference)


def test_block_map_at_many_key_blocks_and_ties():
    _in_interpreter(_check_block_map_at_many_key_blocks_and_ties)


def test_kept_block_lists_are_the_kept_indices_in_order():
    _in_interpreter(_check_kept_block_lists)


def test_backends_run_our_kernels_and_record_sparsity():
    _in_interpreter(_check_backends_run_our_kernels)


def test_backends_choose_and_check_pv_precision_by_gpu():
    _in_interpreter(_check_backends_choose_pv_by_gpu)


# --- wiring, in this process (no triton needed) --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "implementation", "package", "says"),
    [
        ("sage", "triton", None, "implementation='triton'"),
        ("sage", "upstream", "sageattention", "pip install sageattention"),
        ("sparge", "triton", None, "implementation='triton'"),
        ("sparge", "upstream", "spas_sage_attn", "SpargeAttn"),
    ],
)
def test_asked_for_implementations_are_unavailable_without_cuda(name, implementation, package, says):
    with pytest.raises(BackendUnavailable) as e:
        get_backend(name, "cpu", implementation=implementation)
    assert "CUDA" in str(e.value)
    # The upstream route names how to install its package only where it is missing (as in CI).
    missing = package is None or importlib.util.find_spec(package) is None
    assert (says in str(e.value)) == missing


def test_default_implementation_without_cuda_names_both_routes():
    for name, package in (("sage", "sageattention"), ("sparge", "spas_sage_attn")):
        with pytest.raises(BackendUnavailable) as e:
            get_backend(name, "cpu")
        assert "CUDA" in str(e.value)
        # Where the package is missing (as in CI), both routes' problems; where it is installed, the
        # default is the upstream route and the missing GPU is the whole story.
        missing = importlib.util.find_spec(package) is None
        assert ("not importable" in str(e.value)) == missing
        assert ("implementation='triton'" in str(e.value)) == missing


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("sage", {"implementation": "cuda"}, "implementation must be one of"),
        ("sage", {"pv": "fp8"}, "needs implementation='triton'"),
        ("sage", {"implementation": "triton", "pv": "int4"}, "pv must be one of"),
        ("sparge", {"implementation": "cuda"}, "implementation must be one of"),
        ("sparge", {"pv_threshold": 20.0}, "needs implementation='upstream'"),
        ("sparge", {"implementation": "triton", "pv_threshold": 20.0}, "needs implementation='upstream'"),
        ("sparge", {"pv": "fp16"}, "needs implementation='triton'"),
        ("sparge", {"stats": SparsityStats()}, "stats need implementation='triton'"),
        ("sparge", {"implementation": "upstream", "stats": SparsityStats()}, "block map"),
    ],
)
def test_implementation_options_are_checked_before_the_machine(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_backend(name, "cpu", **options)


def test_sparsity_stats_sum_calls_until_reset():
    stats = SparsityStats()
    assert stats.summary() == {"calls": 0, "kept_blocks": 0, "total_blocks": 0, "kept_fraction": None}
    stats.record(torch.tensor([[True, False], [True, True]]))
    stats.record(torch.zeros(1, 4, dtype=torch.bool))
    assert stats.summary() == {"calls": 2, "kept_blocks": 3, "total_blocks": 8, "kept_fraction": 0.375}
    stats.reset()
    assert stats.summary()["calls"] == 0 and stats.summary()["kept_fraction"] is None


# --- the compiled kernels, on a CUDA machine only ------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("pv_fp8", [True, False])
def test_compiled_kernels_on_gpu(pv_fp8):
    from smartdiff.kernels.triton_sage import CONFIGS, sage_attention
    from smartdiff.kernels.triton_sparge import block_map, block_sparse_sage_attention, sparse_config

    if pv_fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 P.V needs sm_89+")
    q, k, v = (t.cuda().bfloat16() for t in clustered_qkv(2, 4, 1000, 128, clusters=8, seed=13))
    exact = attention_reference(q, k, v)
    out = sage_attention(q, k, v, pv_fp8=pv_fp8)
    config, pv_dtype = CONFIGS[128], torch.float8_e4m3fn if pv_fp8 else None
    oracle = sage_reference(q, k, v, block_q=config.block_m, block_k=config.block_n, pv_dtype=pv_dtype)
    assert out.isfinite().all()
    assert relative_error(out, exact) < 1.5 * relative_error(oracle, exact) + 5e-3  # + bf16 output rounding
    mask = block_mask(q, k, 128, 64, topk=0.5, sim_threshold=None)
    # Triton pools in another summation order than torch: near-tied blocks may swap, nothing more.
    fused = block_map(q, k, topk=0.5, sim_threshold=None).mask
    assert torch.equal(fused.sum(-1), mask.sum(-1)) and (fused == mask).float().mean() > 0.99
    sparse = block_sparse_sage_attention(q, k, v, mask, pv_fp8=pv_fp8)
    assert relative_error(sparse, sparse_reference(q, k, v, mask)) < 0.05
    everything = torch.ones_like(mask)
    same_tiles = sage_attention(q, k, v, pv_fp8=pv_fp8, config=sparse_config(128, q.device))
    assert torch.equal(block_sparse_sage_attention(q, k, v, everything, pv_fp8=pv_fp8), same_tiles)


def test_gluon_kernel_refuses_what_it_cannot_run():
    from smartdiff.kernels import gluon_sage

    q = torch.randn(1, 200, 2, 128).bfloat16()  # head dim 128, but not on a Hopper GPU
    with pytest.raises(ValueError, match="Hopper"):
        gluon_sage.dense_attention(q, q, q)
    counts = torch.ones(1 * 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="Hopper"):
        gluon_sage.sparse_attention(q, q, q, counts, counts, 128)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="kernels.gluon_sage runs on Hopper",
)
def test_gluon_kernel_gives_the_triton_kernels_output_on_hopper():
    from smartdiff.kernels import gluon_sage
    from smartdiff.kernels.triton_sage import sage_attention
    from smartdiff.kernels.triton_sparge import MAP_BLOCK_Q, block_sparse_sage_attention, kept_block_lists

    g = torch.Generator(device="cuda").manual_seed(21)
    # Partial last tiles, cross-attention with a single key tile, many key tiles for a few queries.
    for n_q, n_k in ((1000, 1000), (300, 77), (200, 4100)):
        q, k, v = (torch.randn(2, n, 3, 128, device="cuda", generator=g).bfloat16() for n in (n_q, n_k, n_k))
        assert relative_error(gluon_sage.dense_attention(q, k, v), sage_attention(q, k, v)) < 1e-3
        mask = torch.rand(2, 3, -(-n_q // MAP_BLOCK_Q), -(-n_k // 64), device="cuda", generator=g) < 0.5
        mask[0, 0, 0] = False  # a query block that keeps nothing outputs zeros
        kept, counts = kept_block_lists(mask)
        sparse = gluon_sage.sparse_attention(q, k, v, kept, counts, MAP_BLOCK_Q)
        assert relative_error(sparse, block_sparse_sage_attention(q, k, v, mask)) < 1e-3
        assert (sparse[0, :MAP_BLOCK_Q, 0] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")
def test_compiled_vae_norm_on_gpu():
    from smartdiff.kernels.triton_norm import residual_sum, rms_norm_channels
    from smartdiff.pipeline.vae import RMSNorm

    x = torch.randn(2, 96, 5, 60, 104, device="cuda")
    norm = RMSNorm(96).cuda()
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
        exact = norm.reference(x, silu=True)  # fp32 throughout
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2**-8)):
            norm.to(dtype)
            fused = norm(x.to(dtype), silu=True)
            assert fused.dtype == dtype and fused.is_contiguous(memory_format=torch.channels_last_3d)
            # The kernel computes in fp32 and rounds once: within one bf16 rounding of the exact
            # result of its (bf16) input.
            assert relative_error(fused.float(), norm.reference(x.to(dtype).float(), silu=True)) < tolerance
        assert relative_error(norm(x.to(torch.bfloat16), silu=True).float(), exact) < 2**-7
        # A causal conv's window: the past frames, then the norm.
        past = torch.randn(2, 96, 2, 60, 104, device="cuda", dtype=torch.bfloat16)
        window = norm(x.to(torch.bfloat16), silu=True, past=past)
        assert torch.equal(window[:, :, :2], past) and torch.equal(window[:, :, 2:], norm(x.bfloat16(), True))
        # A convolution's bias added by the norm and by the residual sum, each in one fp32 pass.
        bias, y, skip = torch.randn(96, device="cuda"), x.bfloat16(), torch.randn_like(x).bfloat16()
        with_bias = norm.reference(y.float() + bias.view(-1, 1, 1, 1), silu=True)
        assert relative_error(norm(y, silu=True, bias=bias).float(), with_bias) < 2**-8
        summed = residual_sum(y, bias, skip)
        assert summed.dtype == torch.bfloat16 and summed.is_contiguous(memory_format=torch.channels_last_3d)
        assert relative_error(summed.float(), y.float() + bias.view(-1, 1, 1, 1) + skip.float()) < 2**-8
        # More than 2^31 elements (a 720p chunk of 20 latent frames has 7 billion): int64 offsets, checked
        # on the last positions.
        wide = torch.randn(1, 2, 1_100_000_000, 1, device="cuda", dtype=torch.bfloat16)
        tail = rms_norm_channels(wide, torch.ones(2, device="cuda"))[:, :, -1_000_000:].float()
        last = wide[:, :, -1_000_000:].float()
        assert relative_error(tail, last / last.norm(dim=1, keepdim=True) * 2**0.5) < 2**-8
