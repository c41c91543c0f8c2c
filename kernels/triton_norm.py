"""The VAE's elementwise passes on the GPU (pipeline/vae.py): the RMS norm over channels with the SiLU
that follows it, and the residual sum, each in one pass.

On the GPU the VAE runs channels-last (NDHWC, NHWC for its per-frame layers): the channels of each
position are contiguous, so one program normalises ROWS neighbouring positions as a [ROWS, C] tile
held in registers. The input is read once and the output written once, with
``silu(x / max(||x||, 1e-12) * sqrt(C) * gamma)`` (``F.normalize``'s epsilon) computed in fp32 and
rounded once to the output dtype.

The output may start with frames that are not the input's: a norm that feeds a causal convolution
writes its frames after the ones the convolution keeps from the previous chunk (``past``), so the
convolution's input window is built without copying the chunk a second time to concatenate it.

Both passes also add the bias of the convolution whose output they read: PyTorch adds a
convolution's bias in a broadcast pass of its own after cuDNN's kernel, and those passes cost 113 of
the 480p decode's 850 ms of kernels on an H100 (docs/PERFORMANCE.md). The residual blocks run their
convolutions without bias and leave it to the next norm or to the residual sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_EPS = tl.constexpr(1e-12)
TILE = 4096  # elements of one program's tile: ROWS = TILE // (C rounded up to a power of two)
SUM_BLOCK, SUM_WARPS = 4096, 8  # the residual sum's elements and warps per program


@triton.jit
def _rms_norm_rows_kernel(
    x_ptr, gamma_ptr, bias_ptr, out_ptr, rows, x_batch_stride, out_batch_stride, out_offset, scale,
    C: tl.constexpr, C_BLOCK: tl.constexpr, ROWS: tl.constexpr, SILU: tl.constexpr, BIAS: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(1).to(tl.int64)
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    channel = tl.arange(0, C_BLOCK)[None, :]
    mask = (row < rows) & (channel < C)
    offsets = row * C + channel  # int64: a 720p chunk passes 2^31 elements
    x = tl.load(x_ptr + batch * x_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    if BIAS:
        x += tl.load(bias_ptr + channel, mask=channel < C, other=0.0).to(tl.float32)
    inverse = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), _EPS)
    gamma = tl.load(gamma_ptr + channel, mask=channel < C, other=0.0).to(tl.float32)
    y = x * inverse[:, None] * gamma
    if SILU:
        y = y * tl.sigmoid(y)
    out = out_ptr + batch * out_batch_stride + out_offset + offsets
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_shape(channels: int) -> tuple[int, int]:
    """(C_BLOCK, ROWS) for ``channels``: the channels padded to a power of two, rows filling a tile."""
    c_block = triton.next_power_of_2(channels)
    return c_block, max(1, TILE // c_block)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, C, *spatial] (2 or 3 spatial axes) in the channels-last layout, copied only if needed."""
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def rms_norm_channels(
    x: torch.Tensor,
    gamma: torch.Tensor,
    silu: bool = False,
    past: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMS norm of ``x + bias`` [B, C, *spatial] over dim 1 times ``sqrt(C) * gamma`` (C values each),
    then SiLU if ``silu``; channels-last out, in ``x``'s dtype. With ``past`` [B, C, P, H, W] (5-D
    ``x`` only) the output is [B, C, P + T, H, W]: ``past``'s frames, then the norm of ``x``'s."""
    x = channels_last(x)
    batch, channels, frames = x.shape[:3]
    if past is None:
        out = torch.empty_like(x)
        out_offset = 0
    else:
        shape = (batch, channels, past.shape[2] + frames, *x.shape[3:])
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
        out[:, :, : past.shape[2]] = past
        out_offset = out[:, :, past.shape[2] :].storage_offset()
    rows = x[0, 0].numel()
    c_block, block_rows = launch_shape(channels)
    # Position blocks on grid axis 0 (up to 2^31 - 1): a 720p chunk has millions of positions.
    grid = (triton.cdiv(rows, block_rows), batch)
    _rms_norm_rows_kernel[grid](
        x, gamma.reshape(-1), gamma if bias is None else bias, out, rows, x.stride(0), out.stride(0),
        out_offset, channels**0.5,
        C=channels, C_BLOCK=c_block, ROWS=block_rows, SILU=silu, BIAS=bias is not None, num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _residual_sum_kernel(y_ptr, bias_ptr, skip_ptr, out_ptr, numel, C: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    channel = offsets % C  # channels-last: the channel varies fastest
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    skip = tl.load(skip_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (y + bias + skip).to(out_ptr.dtype.element_ty), mask=mask)


def residual_sum(y: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``y + bias + skip`` for ``y`` and ``skip`` [B, C, *spatial] of one shape and ``bias`` (C values),
    in fp32, rounded once to ``y``'s dtype; channels-last out."""
    y, skip = channels_last(y), channels_last(skip)  # the kernel reads either dtype into fp32
    out = torch.empty_like(y)
    _residual_sum_kernel[(triton.cdiv(y.numel(), SUM_BLOCK),)](
        y, bias, skip, out, y.numel(), C=y.shape[1], BLOCK=SUM_BLOCK, num_warps=SUM_WARPS
    )
    return out
