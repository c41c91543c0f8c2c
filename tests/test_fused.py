"""The DiT's token-wise functions (pipeline/fused.py): the official math, and traceable whole."""

from __future__ import annotations

import pytest
import torch

from smartdiff.pipeline import fused
from smartdiff.pipeline.fp8 import FP8, quantize_rows

B, L, H, D = 2, 12, 3, 8
# The CPU, and CUDA where there is one (its own paths: the GELU epilogue, the Triton fp8 norms).
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]


def _inputs(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, H * D, generator=g).to(dtype)
    y = torch.randn(B, L, H * D, generator=g).to(dtype)
    shift, scale, gate = (torch.randn(B, H * D, generator=g) for _ in range(3))
    weight, bias = torch.randn(H * D, generator=g), torch.randn(H * D, generator=g)
    angles = torch.rand(L, 1, D // 2, generator=g) * 6.3
    return x, y, shift, scale, gate, weight, bias, angles.cos(), angles.sin()


def test_modulated_norm_and_gated_residual_follow_the_formulas() -> None:
    x, y, shift, scale, gate, *_ = _inputs()
    x64 = x.double()
    normed = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = normed * (1 + scale.double()[:, None]) + shift.double()[:, None]
    assert torch.allclose(fused.modulated_norm(x, shift, scale, 1e-6).double(), expected, atol=1e-5)
    residual = x64 + y.double() * gate.double()[:, None]
    assert torch.allclose(fused.gated_residual(x, y, gate).double(), residual, atol=1e-5)


def test_rms_norm_and_rope() -> None:
    x, _, _, _, _, weight, _, cos, sin = _inputs()
    x64 = x.double()
    rms = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert torch.allclose(fused.rms_norm(x, weight, 1e-6).double(), rms, atol=1e-5)
    # RoPE rotates each interleaved pair: the same as multiplying by e^{i angle} as complex numbers.
    heads = x.unflatten(2, (H, D))
    as_complex = torch.view_as_complex(heads.double().unflatten(-1, (-1, 2)).contiguous())
    rotated = torch.view_as_real(
        as_complex * torch.polar(torch.ones_like(cos.double()), torch.atan2(sin, cos).double())
    )
    assert torch.allclose(fused.rope(heads, cos, sin).double(), rotated.flatten(-2), atol=1e-5)
    together = fused.rms_norm_rope(x, weight, 1e-6, H, cos, sin)
    assert torch.equal(together, fused.rope(fused.rms_norm(x, weight, 1e-6).unflatten(2, (H, D)), cos, sin))


def test_bf16_in_bf16_out_with_fp32_math() -> None:
    x, y, shift, scale, gate, *_ = _inputs(torch.bfloat16)
    out = fused.modulated_norm(x, shift, scale, 1e-6)
    assert out.dtype == torch.bfloat16
    reference = fused.modulated_norm(x.float(), shift, scale, 1e-6)
    assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.01)
    assert fused.gated_residual(x, y, gate).dtype == torch.bfloat16


def _comparable(out: torch.Tensor | tuple[torch.Tensor, ...]) -> list[list[float]]:
    """An output (or the fp8 norms' (e4m3 values, scales)) as nested lists; e4m3 as its bytes."""
    parts = out if isinstance(out, tuple) else (out,)
    return [(t.view(torch.uint8) if t.dtype == FP8 else t).tolist() for t in parts]


@pytest.mark.parametrize(
    "name",
    [
        "modulated_norm",
        "affine_norm",
        "gated_residual",
        "residual",
        "rms_norm",
        "rope",
        "rms_norm_rope",
    ],
)
def test_every_function_traces_as_one_graph(name: str) -> None:
    """fullgraph tracing (the eager backend: no code generation) finds no graph break, and the traced
    function gives the eager result."""
    torch._dynamo.reset()
    x, y, shift, scale, gate, weight, bias, cos, sin = _inputs()
    heads = x.unflatten(2, (H, D))
    args = {
        "modulated_norm": (x, shift, scale, 1e-6),
        "affine_norm": (x, weight, bias, 1e-6),
        "gated_residual": (x, y, gate),
        "residual": (x, y),
        "rms_norm": (x, weight, 1e-6),
        "rope": (heads, cos, sin),
        "rms_norm_rope": (x, weight, 1e-6, H, cos, sin),
    }[name]
    traced = getattr(fused.compiled(backend="eager"), name)(*args)
    eager = getattr(fused.EAGER, name)(*args)
    assert _comparable(traced) == _comparable(eager)


def test_compiled_functions_compile_twice_for_any_number_of_video_sizes() -> None:
    """Static for the first token count, dynamic from the second: five sizes, two compilations
    (static shapes would compile five times, and fall back to eager past torch's recompile limit)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    norm = fused.compiled(backend=counter).rms_norm
    weight = torch.randn(D * H)
    for tokens in (5, 7, 9, 11, 13):
        x = torch.randn(1, tokens, D * H)
        assert torch.equal(norm(x, weight, 1e-6), fused.EAGER.rms_norm(x, weight, 1e-6))
    assert counter.frame_count == 2


def _tanh_gelu64(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_gelu_is_the_tanh_gelu_of_the_product(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    x, weight, bias = (
        torch.randn(2, 40, 64, generator=g),
        torch.randn(96, 64, generator=g) / 8,
        torch.randn(96, generator=g),
    )
    expected = _tanh_gelu64(x.double() @ weight.double().T + bias.double())
    erf_gelu = torch.nn.functional.gelu(x.double() @ weight.double().T + bias.double())
    # In fp32 (torch's default: no TF32 products) the two GELUs can be told apart.
    assert torch.get_float32_matmul_precision() == "highest"
    with torch.no_grad():  # inference: on CUDA the GELU runs in the matrix product's epilogue
        out = fused.linear_gelu(*(t.to(device) for t in (x, weight, bias))).cpu().double()
    assert out.shape == (2, 40, 96)
    assert (out - expected).abs().max() < 1e-5 < (erf_gelu - expected).abs().max()
    # With gradients on (training) the same function, differentiable.
    x.requires_grad_(True)
    fused.linear_gelu(x.to(device), weight.to(device), bias.to(device)).sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_the_fp8_norms_quantise_the_fp32_norm(device: str) -> None:
    """The e4m3 rows an fp8 linear reads: ``quantize_rows`` of the fp32 norm, on the CPU exactly; on
    CUDA (kernels/triton_fp8.py) scales within fp32 reduction order and values within one e4m3 step.
    Either way not the rows of the norm rounded to bf16 first (that rounding shows)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 300, 64, generator=g).to(torch.bfloat16)
    shift, scale = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    weight, bias = torch.randn(64, generator=g), torch.randn(64, generator=g)
    cases = [
        (fused.modulated_norm_fp8, (shift, scale), fused.modulated_norm(x.float(), shift, scale, 1e-6)),
        (fused.affine_norm_fp8, (weight, bias), fused.affine_norm(x.float(), weight, bias, 1e-6)),
    ]
    for norm_fp8, args, norm32 in cases:
        values, scales = (t.cpu() for t in norm_fp8(x.to(device), *(t.to(device) for t in args), 1e-6))
        expected_values, expected_scales = quantize_rows(norm32.flatten(0, 1))
        assert values.dtype == FP8 and scales.shape == (600, 1)
        if device == "cpu":
            assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
        torch.testing.assert_close(scales, expected_scales, rtol=1e-5, atol=0)
        a, b = values.float(), expected_values.float()
        # One e4m3 step of a value v is 2^(floor(log2 |v|) - 3) above the subnormals (2^-9 below).
        step = torch.exp2(torch.floor(torch.log2(b.abs().clamp(min=2**-6))) - 3)
        assert bool(((a - b).abs() <= step + 1e-12).all())
        bf16_rows = quantize_rows(norm32.to(torch.bfloat16).flatten(0, 1))[0]
        assert not torch.equal(values.view(torch.uint8), bf16_rows.view(torch.uint8))
