"""fp8 (e4m3) weights and matrix products for the DiT's linear layers.

Quantisation is symmetric and per output channel for weights, per token for activations:

    weight:      scale_w[o] = max_i |W[o, i]| / 448      W8 = e4m3(W * (1 / scale_w))
    activation:  scale_x[t] = max_i |x[t, i]| / 448      x8 = e4m3(x * (1 / scale_x))
    product:     y = (x8 @ W8^T) * scale_x[t] * scale_w[o] + bias      (fp32 accumulate, bf16 out)

448 is e4m3's largest finite value. Rounding to e4m3 (3 mantissa bits, round to nearest even) puts
every element within half a unit in the last place: a relative error of at most 2^-4 = 6.25% for
elements at or above e4m3's smallest normal times the scale (2^-6 * scale), and an absolute error of
at most 2^-10 * scale below it (the subnormal spacing 2^-9, halved). ``FP8Linear`` runs the product
as one ``torch._scaled_mm`` with row-wise scales (Hopper's fp8 tensor cores on CUDA; torch's
reference kernel on the CPU, for tests). The inputs a block normalises first (q, k and v of the
self-attention, the cross-attention's q, the feed-forward's first layer) are quantised inside the
norm itself (``pipeline.fused.modulated_norm_fp8``, one Triton kernel on CUDA), so their bf16 copy
is never written; the others (the attention outputs, the feed-forward's hidden, the text) by
one Triton pass on CUDA (kernels/triton_fp8.py), which also applies the feed-forward's GELU.

fp8 checkpoints users share, read by ``split_fp8_state``:

- LightX2V (``*_scaled_fp8_e4m3_lightx2v*.safetensors``): the linear weights of the blocks in
  ``float8_e4m3fn`` with a per-output-channel ``<name>.weight_scale`` [out, 1] in fp32; everything
  else in bf16;
- ComfyUI's ``scaled_fp8`` (``*_fp8_scaled.safetensors``): an empty ``scaled_fp8`` marker tensor,
  fp8 weights with one per-tensor ``<module>.scale_weight``, maybe a static ``<module>.scale_input``
  (not used: activations get dynamic per-token scales here);
- plain ``float8_e4m3fn`` weights with no scale (scale 1).

Keys may carry ComfyUI's ``model.diffusion_model.`` or ``diffusion_model.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Relative error bound of one rounding to e4m3 at or above its smallest normal (2^-6): half of the
# spacing 2^-3 of its 3-bit mantissa. Below it, the absolute bound is SUBNORMAL_ERROR * scale.
RELATIVE_ERROR = 2.0**-4
SUBNORMAL_ERROR = 2.0**-10
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scales [rows, 1]) of a 2-D tensor, one scale per row (module docstring)."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    # A multiply by the reciprocal, as the GPU's quantiser does it (cheaper than a division per element).
    return (x32 * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values back from ``quantize_rows``' output (scale [rows] or [rows, 1]); the first axis is
    the row axis whatever the tensor's rank."""
    return values.float() * scale.float().reshape(-1, *([1] * (values.dim() - 1)))


@dataclass(frozen=True)
class QuantizedRows:
    """A linear layer's input, quantised per token: e4m3 rows [tokens, in], fp32 scales [tokens, 1],
    and the input's leading shape and dtype (for the product's output)."""

    values: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, quantized: tuple[torch.Tensor, torch.Tensor], like: torch.Tensor) -> QuantizedRows:
        """``quantize_rows``' (values, scales) of ``like``'s rows, with its shape and dtype."""
        return cls(*quantized, tuple(like.shape[:-1]), like.dtype)


def quantize_activations(x: torch.Tensor, gelu: bool = False) -> QuantizedRows:
    """x [..., in] per token to e4m3, through the tanh GELU first if ``gelu``. On CUDA one Triton
    pass (kernels/triton_fp8.py: one read of x, one write of the e4m3 copy); elsewhere PyTorch's."""
    rows = x.reshape(-1, x.shape[-1])
    with torch.profiler.record_function("fp8.quantize_activations"):  # named in profiles
        if x.is_cuda:
            from smartdiff.kernels.triton_fp8 import quantize_rows_fused

            values, scale = quantize_rows_fused(rows, gelu)
        else:
            values, scale = quantize_rows(F.gelu(rows, approximate="tanh") if gelu else rows)
    return QuantizedRows.of((values, scale), x)


class FP8Linear(nn.Module):
    """``nn.Linear``'s product with e4m3 weights (per-channel scales) and per-token e4m3 activations.

    State: ``weight`` [out, in] e4m3, ``weight_scale`` [out] fp32, ``bias`` [out] in the model dtype,
    so a block streams and moves like any other module. ``gelu=True`` applies the tanh GELU to the
    input first, inside the quantisation (the feed-forward's second layer).
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor | QuantizedRows, gelu: bool = False) -> torch.Tensor:
        """x [..., in], or already quantised where it was computed (the blocks' input norms:
        ``pipeline.fused.modulated_norm_fp8``); ``gelu`` only for a tensor."""
        if isinstance(x, QuantizedRows):
            if gelu:
                raise ValueError("the GELU is applied while quantising: pass the tensor, not its e4m3 rows")
            return self.product(x)
        return self.product(quantize_activations(x, gelu))

    def product(self, x: QuantizedRows) -> torch.Tensor:
        """The layer's output for an input already quantised (shared by layers that read one input).

        Fast accumulation: Hopper's fp8 tensor cores keep each tile's partial sums at their own
        reduced precision before they reach the fp32 accumulator (the inference kernels' usual
        setting; bench/distill_fp8_gpu.py reports the whole forward's difference to bf16)."""
        out = torch._scaled_mm(
            x.values,
            self.weight.t(),  # column-major [in, out], as the fp8 kernels want their second operand
            scale_a=x.scale,
            scale_b=self.weight_scale.view(1, -1),
            bias=self.bias.to(x.dtype),
            out_dtype=x.dtype,
            use_fast_accum=True,
        )
        return out.view(*x.shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3"


def linear_outputs(layers: tuple[nn.Module, ...], x: torch.Tensor | QuantizedRows) -> list[torch.Tensor]:
    """``layer(x)`` for each layer; fp8 layers quantise their shared input once (the self-attention's
    q, k and v read the same tokens), unless it comes quantised."""
    if all(isinstance(layer, FP8Linear) for layer in layers):
        shared = x if isinstance(x, QuantizedRows) else quantize_activations(x)
        return [layer.product(shared) for layer in layers]
    return [layer(x) for layer in layers]


def block_linear_names(dit: nn.Module) -> list[str]:
    """Module names of the linear layers inside the DiT's blocks: the ones that run in fp8 (attention
    projections and the feed-forward; the embeddings and the head stay in the model dtype)."""
    linears = (name for name, module in dit.named_modules() if isinstance(module, nn.Linear))
    return [name for name in linears if name.startswith("blocks.")]


def gemm_of(dit: nn.Module) -> str:
    """What a DiT's block linears run in, as results report it: "fp8", or their dtype ("bfloat16")."""
    layer = dit.get_submodule("blocks.0.ffn.0")  # every block's first feed-forward layer
    return "fp8" if isinstance(layer, FP8Linear) else str(layer.weight.dtype).removeprefix("torch.")


def use_fp8_linears(dit: nn.Module) -> list[str]:
    """Replace the blocks' ``nn.Linear`` layers of a DiT built on the meta device by ``FP8Linear``
    ones (still on meta, to be assigned). Returns their names."""
    names = block_linear_names(dit)
    for name in names:
        linear = dit.get_submodule(name)
        dit.set_submodule(name, FP8Linear(linear.in_features, linear.out_features, device="meta"))
    return names


def split_fp8_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise an fp8 checkpoint's state in place (module docstring) and return the scales it holds:
    ``{weight name: fp32 scale per output row}`` for every e4m3 weight. Prefixes are dropped, the
    ``scaled_fp8`` marker and static input scales removed, per-tensor scales expanded to rows."""
    for key in list(state):
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                state[key.removeprefix(prefix)] = state.pop(key)
                break
    state.pop("scaled_fp8", None)
    scales: dict[str, torch.Tensor] = {}
    for key in [k for k in state if k.endswith((".weight_scale", ".scale_weight", ".scale_input"))]:
        scale = state.pop(key).float()
        if key.endswith(".scale_input"):
            continue
        lightx2v = key.endswith(".weight_scale")
        weight = key.removesuffix("_scale") if lightx2v else key.removesuffix("scale_weight") + "weight"
        if weight not in state:
            raise ValueError(f"{key}: a scale for {weight}, which the file does not hold")
        rows = state[weight].shape[0]
        if scale.numel() not in (1, rows):
            raise ValueError(f"{key} {list(scale.shape)} fits neither one scale nor {rows} rows of {weight}")
        scales[weight] = scale.reshape(-1).expand(rows).clone()
    for key, tensor in state.items():
        if tensor.dtype == FP8 and key not in scales:
            scales[key] = torch.ones(tensor.shape[0])  # plain e4m3 weights: scale 1
        elif tensor.dtype in (torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
            raise ValueError(f"{key}: {tensor.dtype} weights are not supported (e4m3fn only)")
    return scales


def require_fp8_gemm(device: torch.device) -> None:
    """ValueError unless ``device`` runs e4m3 matrix products: CUDA sm_89+ (Ada, Hopper, later), or
    the CPU (torch's reference kernel: correct and slow, for tests)."""
    if device.type == "cpu":
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return
    what = (
        "sm_{}{}".format(*torch.cuda.get_device_capability(device)) if device.type == "cuda" else device.type
    )
    raise ValueError(f"gemm fp8 needs fp8 tensor cores (sm_89+: Ada, Hopper); {device} is {what}")
