"""The Wan2.1 video VAE: a causal 3D convolutional autoencoder (4x in time, 8x in space, 16 channels).

Module and parameter names follow the official ``Wan2.1_VAE.pth`` exactly, so that file loads with a
plain strict ``load_state_dict``; ``diffusers_vae_key_to_official`` renames the Diffusers layout.

Video runs through the model causally, in chunks, as in the official implementation: the encoder sees
the first frame alone and then groups of four frames; the decoder sees the first latent frame alone
and then groups of ``decode_chunk`` latent frames (the official implementation decodes one at a time;
the result is the same, since every layer is causal in time or works frame by frame, and larger
chunks give the GPU larger convolutions). Each causal convolution keeps the trailing frames of its
input from one chunk to the next in a cache that belongs to a single ``encode``/``decode`` call, so
calls share no state and the module stays reentrant.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartdiff.pipeline.config import VAEConfig
from smartdiff.pipeline.loading import CheckpointError

# Per-channel statistics of the Wan2.1 latents (official values, also diffusers' defaults): the
# diffusion model works on (mu - mean) / std.
LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# What each causal layer keeps of the previous chunk, for one encode or decode call.
FeatureCache = dict[nn.Module, Tensor]


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value, value, value) if isinstance(value, int) else tuple(value)


class CausalConv3d(nn.Conv3d):
    """A Conv3d that is causal in time: the time axis is padded on the past side only.

    ``padding`` has the meaning of the official model: a time padding of ``p`` becomes ``2p`` frames
    in the past. Given a cache, the conv continues a stream of chunks: the trailing input frames of the
    previous chunk take the place of (some of) that zero padding.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pad_t, pad_h, pad_w = _triple(padding)
        # Space is padded symmetrically by the convolution itself; time by hand in forward.
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.past_frames = 2 * pad_t

    def forward(
        self,
        x: Tensor,
        cache: FeatureCache | None = None,
        norm: RMSNorm | None = None,
        x_bias: Tensor | None = None,
        add_bias: bool = True,
    ) -> Tensor:
        """The convolution of ``x``, or with ``norm`` of ``silu(norm(x + x_bias))``: the norm then writes
        its output straight after the cached frames, so the input window is not concatenated.
        ``x_bias`` is the bias the convolution that made ``x`` left out; without ``add_bias`` this one
        leaves out its own, for the pass that reads the output to add."""
        if norm is None and x_bias is not None:
            raise ValueError("x_bias is added by the norm, and no norm was given")
        bias = self.bias if add_bias else None
        if self.past_frames == 0:
            return self._convolve(x if norm is None else norm(x, silu=True, bias=x_bias), bias)
        past = self._past(x, cache)
        window = torch.cat([past, x], dim=2) if norm is None else norm(x, silu=True, past=past, bias=x_bias)
        if cache is not None:
            # A copy, so the cache does not keep the whole window alive.
            cache[self] = window[:, :, -self.past_frames :].clone()
        return self._convolve(window, bias)

    def _convolve(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv3d(x, self.weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _past(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        """The ``past_frames`` frames before ``x``: the previous chunk's last ones, zeros where there
        are none (the causal padding)."""
        past = cache.get(self) if cache is not None else None
        past = x[:, :, :0] if past is None else past
        missing = self.past_frames - past.shape[2]
        return F.pad(past, (0, 0, 0, 0, missing, 0)) if missing > 0 else past


class RMSNorm(nn.Module):
    """RMS norm over the channel axis (dim 1) with a learned per-channel ``gamma``."""

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(
        self, x: Tensor, silu: bool = False, past: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """The norm of ``x + bias`` (a per-channel bias, if given), then the SiLU if ``silu``. With
        ``past`` [B, C, P, H, W] the result starts with those P frames: a causal convolution's input
        window (``CausalConv3d``). Inference on CUDA runs in one Triton pass, channels-last
        (kernels/triton_norm.py); training and the CPU take PyTorch's path."""
        if _fused(x):
            from smartdiff.kernels.triton_norm import rms_norm_channels

            return rms_norm_channels(x, self.gamma, silu, past, bias)
        out = self.reference(x if bias is None else x + _per_channel(bias, x), silu)
        return out if past is None else torch.cat([past, out], dim=2)

    def reference(self, x: Tensor, silu: bool = False) -> Tensor:
        """The norm (and SiLU) in PyTorch: differentiable, any device."""
        # The sum of squares over hundreds of channels is taken in fp32 (a no-op for fp32 input).
        normalized = F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma
        return F.silu(normalized) if silu else normalized


class ResidualBlock(nn.Module):
    """norm, SiLU, conv, norm, SiLU, conv; plus a 1x1x1 conv shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Sequential indices 0..6 are the official parameter names (residual.0.gamma, residual.2, ...);
        # index 5 is the official model's dropout, which has rate 0.
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual  # the SiLUs run inside the norms
        # Each convolution's bias is added by the pass that reads its output: conv1's by the second
        # norm, conv2's and the shortcut's by the residual sum (kernels/triton_norm.py says why).
        h = conv1(x, cache, norm=norm1, add_bias=False)
        y = conv2(h, cache, norm=norm2, x_bias=conv1.bias, add_bias=False)
        if isinstance(self.shortcut, CausalConv3d):
            return residual_sum(y, conv2.bias + self.shortcut.bias, self.shortcut(x, add_bias=False))
        return residual_sum(y, conv2.bias, x)


def residual_sum(y: Tensor, bias: Tensor, skip: Tensor) -> Tensor:
    """``y + bias + skip``, ``bias`` per channel: one Triton pass for inference on CUDA."""
    if _fused(y):
        from smartdiff.kernels.triton_norm import residual_sum as fused_sum

        return fused_sum(y, bias, skip)
    return y + _per_channel(bias, y) + skip


def _fused(x: Tensor) -> bool:
    """Whether ``x``'s elementwise passes run in the Triton kernels: inference on CUDA."""
    return x.is_cuda and not torch.is_grad_enabled()


def _per_channel(bias: Tensor, x: Tensor) -> Tensor:
    """``bias`` (C values) shaped to broadcast over ``x`` [B, C, *spatial]."""
    return bias.view(-1, *[1] * (x.dim() - 2))


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame; frames do not see each other."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames))
        # (b*t, 3c, h, w) -> one head of h*w tokens: (b*t, 1, h*w, 3c), then q | k | v along channels.
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally with 2x in time (``upsample3d`` / ``downsample3d``)."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r} (known: {', '.join(self.MODES)})")
        self.mode = mode
        if mode.startswith("upsample"):
            # The channel count halves as the pixel count quadruples.
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
            if mode == "upsample3d":
                # Twice the channels: each input frame yields two output frames.
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            # Pad right and bottom only, so the stride-2 3x3 conv maps an even size to exactly half.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        b, c, t, h, w = x.shape
        frames = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = frames.reshape(b, t, *frames.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        if self.time_conv not in cache:
            # The first chunk is not doubled (latent frame 0 decodes to video frame 0 alone), and the
            # temporal conv's history starts empty -- zeros -- with the next chunk.
            b, c, _, h, w = x.shape
            cache[self.time_conv] = x.new_zeros((b, c, 0, h, w))
            return x
        x = self.time_conv(x, cache)
        b, c2, t, h, w = x.shape
        # The two channel halves are the earlier and the later output frame of each input frame.
        out = torch.empty((b, c2 // 2, 2 * t, h, w), dtype=x.dtype, device=x.device, memory_format=_layout(x))
        out[:, :, 0::2], out[:, :, 1::2] = x[:, : c2 // 2], x[:, c2 // 2 :]
        return out

    def _downsample_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        past = cache.get(self.time_conv)
        cache[self.time_conv] = x[:, :, -1:].clone()
        if past is None:
            # The first chunk (one frame) passes through: video frame 0 becomes latent frame 0 alone.
            return x
        # Stride 2 over [last frame of the previous chunk, this chunk]: 4 frames -> 2, 2 -> 1.
        return self.time_conv(torch.cat([past, x], dim=2))


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(config.dim_mult) - 1:
                mode = "downsample3d" if config.temporal_downsample[stage] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        # Mean and log-variance of the posterior.
        self.head = nn.Sequential(
            RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], config.z_dim * 2, 3, padding=1)
        )

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(x, cache, norm=norm)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:
                in_dim //= 2  # the upsample that ended the previous stage halved the channels
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(config.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[stage] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(x, cache, norm=norm)


class WanVAE(nn.Module):
    """The Wan2.1 VAE. ``encode`` and ``decode`` speak normalised latents, the diffusion model's space.

    Runs in the dtype and on the device of its parameters; build it on the meta device and assign the
    official state dict to load it.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        self.decode_chunk = self.DECODE_CHUNK

    # Latent frames per decoder pass after the first: 2 takes most of the speed of larger chunks for
    # 2 GB more than 1 at 480p (bench/vae_gpu.py; the table is in docs/PERFORMANCE.md).
    DECODE_CHUNK = 2

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def to_channels_last(self) -> WanVAE:
        """Convolution weights in the channels-last layouts of the GPU path (``_in_device_layout``)."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.Conv2d):
                layout = torch.channels_last_3d if module.weight.dim() == 5 else torch.channels_last
                module.weight.data = module.weight.data.contiguous(memory_format=layout)
        return self

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Normalised posterior means of a video in [-1, 1].

        ``video``: [B, 3, F, H, W] with H, W multiples of 8. Returns float32 [B, z, 1 + (F-1)//4, H/8,
        W/8]. As in the official model, trailing frames that do not fill a chunk of 4 are ignored.
        """
        return self.posterior(video)[0]

    def posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised posterior mean and log-variance (float32), differentiable: ``encode`` for training."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video [B, 3, F, H, W], got shape {list(video.shape)}")
        frames, height, width = video.shape[2:]
        chunk, down_h, down_w = self.config.stride
        if frames < 1 or height % down_h or width % down_w:
            raise ValueError(
                f"video of {frames} frames of {height}x{width}: needs at least one frame and a height "
                f"and width that are multiples of {down_h} and {down_w}"
            )
        video = _in_device_layout(video.to(device=self.device, dtype=self.dtype))
        cache: FeatureCache = {}
        # Frame 0 alone, then whole chunks: [0, 1), [1, 1 + chunk), [1 + chunk, 1 + 2 chunk), ...
        bounds = [(0, 1)] + [(1 + i * chunk, 1 + (i + 1) * chunk) for i in range((frames - 1) // chunk)]
        with _autotuned_convolutions():
            out = torch.cat([self.encoder(video[:, :, s:e], cache) for s, e in bounds], dim=2)
            mu, log_var = self.conv1(out).float().contiguous().chunk(2, dim=1)
        mean, std = _latent_stats(mu.device)
        return (mu - mean) / std, log_var - 2 * torch.log(std)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Video in [-1, 1] from normalised latents [B, z, T, h, w]: [B, 3, 1 + 4(T-1), 8h, 8w].

        The result has the parameters' dtype.
        """
        return self.reconstruct(latents).clamp_(-1.0, 1.0).contiguous()

    def reconstruct(self, latents: Tensor) -> Tensor:
        """``decode`` without the clamp, differentiable: the decoder for training."""
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim or latents.shape[2] < 1:
            raise ValueError(
                f"expected latents [B, {self.config.z_dim}, T>=1, h, w], got shape {list(latents.shape)}"
            )
        mean, std = _latent_stats(self.device)
        z = (latents.to(device=self.device, dtype=torch.float32) * std + mean).to(self.dtype)
        cache: FeatureCache = {}
        with _autotuned_convolutions():
            x = self.conv2(_in_device_layout(z))
            # Latent frame 0 alone (it decodes to one video frame, the others to four), then chunks.
            bounds = [(0, 1)] + [(s, s + self.decode_chunk) for s in range(1, x.shape[2], self.decode_chunk)]
            return torch.cat([self.decoder(x[:, :, s:e], cache) for s, e in bounds], dim=2)

    # Strips at most 32 latent rows (256 pixels) tall and the frame's full width, overlapping by at
    # least 4 rows (32 pixels). Square tiles (diffusers' 256-pixel tiles overlapping by 64) covered a
    # 720p frame about twice and cost 2.2x the untiled decode; strips spread evenly over the height
    # cover it 1.16x and cost 1.15-1.16x (bench/vae_gpu.py, docs/PERFORMANCE.md).
    STRIP_LATENTS = 32
    OVERLAP_LATENTS = 4

    @torch.no_grad()
    def tiled_decode(self, latents: Tensor) -> Tensor:
        """``decode`` in overlapping full-width strips: the peak memory of one strip, seams blended."""
        video = run_in_strips(
            self.decode, latents, self.STRIP_LATENTS, self.OVERLAP_LATENTS, self.config.stride[1], 1
        )
        return video.to(self.dtype)

    @torch.no_grad()
    def tiled_encode(self, video: Tensor) -> Tensor:
        """``encode`` in the same strips (8x the latent rows of pixels each)."""
        down = self.config.stride[1]
        return run_in_strips(self.encode, video, self.STRIP_LATENTS, self.OVERLAP_LATENTS, 1, down)


def _in_device_layout(x: Tensor) -> Tensor:
    """``x`` [B, C, T, H, W] as the VAE runs it on its device: channels-last on CUDA (NDHWC, where
    cuDNN's Hopper convolutions read and write without transposing and the norm reads each position's
    channels contiguously: bench/vae_gpu.py), as it is elsewhere. Every layer keeps the
    layout it is given."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.is_cuda else x


def _layout(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is in: channels-last (the CUDA path's) or the default."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@contextmanager
def _autotuned_convolutions() -> Iterator[None]:
    """cuDNN's autotuner on: each new convolution shape is timed once and its fastest algorithm kept
    (a video size repeats from job to job); the setting is restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def strip_layout(rows: int, most: int, overlap: int) -> tuple[int, list[int]]:
    """Equal strips covering ``rows``: (strip height, first rows), as few as fit ``most`` rows each with
    at least ``overlap`` rows shared between neighbours, spread evenly so none is wasted on the last."""
    if rows <= most:
        return rows, [0]
    count = math.ceil((rows - overlap) / (most - overlap))
    height = math.ceil((rows + (count - 1) * overlap) / count)
    return height, [i * (rows - height) // (count - 1) for i in range(count)]


def _ramp(length: int, fade_in: int, fade_out: int, device: torch.device) -> Tensor:
    """Blend weights of one strip's rows: linear over the rows it shares with each neighbour.

    Two neighbours' ramps over the same shared rows sum to one."""
    weights = torch.ones(length, device=device)
    if fade_in:
        weights[:fade_in] = torch.linspace(0, 1, fade_in + 2, device=device)[1:-1]
    if fade_out:
        weights[length - fade_out :] = torch.linspace(1, 0, fade_out + 2, device=device)[1:-1]
    return weights


def run_in_strips(fn, x: Tensor, most: int, overlap: int, up: int, down: int) -> Tensor:
    """Apply ``fn`` (decode or encode) to overlapping full-width row strips of ``x`` [B, C, T, H, W]
    and blend them.

    Strips are laid out in latent rows (``most`` and ``overlap``); ``x`` has ``down`` rows per latent
    row and the output ``up`` (decode: 1 and 8, encode: 8 and 1). Each strip runs the whole chunked
    pass with its own causal cache; the blend weights of every output row sum to one.
    """
    height, starts = strip_layout(x.shape[-2] // down, most, overlap)
    out = None
    for i, start in enumerate(starts):
        end = start + height
        part = fn(x[..., start * down : end * down, :]).float()
        if out is None:
            out = part.new_zeros(*part.shape[:-2], x.shape[-2] // down * up, part.shape[-1])
        fade_in = (starts[i - 1] + height - start) * up if i > 0 else 0
        fade_out = (end - starts[i + 1]) * up if i + 1 < len(starts) else 0
        out[..., start * up : end * up, :] += (
            part * _ramp(part.shape[-2], fade_in, fade_out, part.device)[:, None]
        )
    return out


def _check_config(config: VAEConfig) -> None:
    if config.z_dim != len(LATENTS_MEAN):
        raise ValueError(
            f"VAE z_dim {config.z_dim} is not supported: the latent statistics exist for "
            f"z_dim {len(LATENTS_MEAN)} only"
        )
    if len(config.temporal_downsample) != len(config.dim_mult) - 1:
        raise ValueError(
            f"VAE temporal_downsample has {len(config.temporal_downsample)} entries, "
            f"dim_mult {len(config.dim_mult)}: expected one fewer"
        )
    expected = (2 ** sum(config.temporal_downsample), *(2 ** (len(config.dim_mult) - 1),) * 2)
    if tuple(config.stride) != expected:
        raise ValueError(f"VAE stride {tuple(config.stride)} does not match the architecture ({expected})")


def _latent_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENTS_STD, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    return mean, std


# --- Diffusers checkpoint layout ------------------------------------------------------------------
#
# Every diffusers tensor has the same shape as its official counterpart (the attention's to_qkv and
# proj are Conv2d in both, the norms' gammas have the same broadcast shapes), so only names change.

_RESNET_LEAVES = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_ATTENTION_LEAVES = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_RESAMPLE_LEAVES = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
_CONV_LEAVES = ("weight", "bias")


def diffusers_vae_arguments(config: VAEConfig) -> dict:
    """The keyword arguments of diffusers' ``AutoencoderKLWan`` for the same architecture."""
    return {
        "base_dim": config.base_dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "temperal_downsample": list(config.temporal_downsample),  # diffusers' spelling
    }


def diffusers_vae_key_to_official(key: str, config: VAEConfig | None = None) -> str:
    """The official ``Wan2.1_VAE.pth`` name of a key of diffusers' ``AutoencoderKLWan`` state dict.

    ``config`` (default: the Wan2.1 VAE) fixes the decoder's index mapping: diffusers groups the
    decoder into stages of ``num_res_blocks + 1`` resnets and one upsampler, the official model keeps
    one flat list. Raises ``CheckpointError`` for a key that has no official counterpart.
    """
    config = config or VAEConfig()
    try:
        return _map_diffusers_key(key, config)
    except KeyError as err:
        raise CheckpointError(
            f"diffusers VAE key {key!r} has no counterpart in the official Wan2.1 VAE layout ({err.args[0]})"
        ) from None


def _map_diffusers_key(key: str, config: VAEConfig) -> str:
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    if m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(\w+)", key):
        return f"{top[m[1]]}.{_leaf(m[2], _CONV_LEAVES)}"

    if not (m := re.fullmatch(r"(encoder|decoder)\.(\w+)\.(.+)", key)):
        raise KeyError("unknown top-level module")
    side, part, rest = m[1], m[2], m[3]
    if part == "conv_in":
        return f"{side}.conv1.{_leaf(rest, _CONV_LEAVES)}"
    if part == "norm_out":
        return f"{side}.head.0.{_leaf(rest, ('gamma',))}"
    if part == "conv_out":
        return f"{side}.head.2.{_leaf(rest, _CONV_LEAVES)}"
    if part == "mid_block":
        # Official middle: resnet, attention, resnet.
        if m := re.fullmatch(r"resnets\.([01])\.(.+)", rest):
            return f"{side}.middle.{2 * int(m[1])}.{_resnet_leaf(m[2])}"
        if m := re.fullmatch(r"attentions\.0\.(.+)", rest):
            return f"{side}.middle.1.{_leaf(m[1], _ATTENTION_LEAVES)}"
        raise KeyError("unknown mid_block entry")

    stages = len(config.dim_mult)
    if side == "encoder" and part == "down_blocks":
        # Same flat list in both layouts: num_res_blocks resnets per stage, a downsample between stages.
        count = stages * config.num_res_blocks + stages - 1
        if not (m := re.fullmatch(r"(\d+)\.(.+)", rest)) or int(m[1]) >= count:
            raise KeyError(f"down_blocks index out of range for {count} blocks")
        leaf = _RESNET_LEAVES.get(m[2]) or _leaf(m[2], _RESAMPLE_LEAVES)
        return f"encoder.downsamples.{int(m[1])}.{leaf}"
    if side == "decoder" and part == "up_blocks":
        # Each stage is num_res_blocks + 1 resnets then one upsample (none after the last stage).
        per_stage = config.num_res_blocks + 2
        if m := re.fullmatch(r"(\d+)\.resnets\.(\d+)\.(.+)", rest):
            stage, index = int(m[1]), int(m[2])
            if stage >= stages or index > config.num_res_blocks:
                raise KeyError("up_blocks resnet index out of range")
            return f"decoder.upsamples.{stage * per_stage + index}.{_resnet_leaf(m[3])}"
        if m := re.fullmatch(r"(\d+)\.upsamplers\.0\.(.+)", rest):
            stage = int(m[1])
            if stage >= stages - 1:
                raise KeyError("no upsampler after the last decoder stage")
            leaf = _leaf(m[2], _RESAMPLE_LEAVES)
            return f"decoder.upsamples.{stage * per_stage + config.num_res_blocks + 1}.{leaf}"
        raise KeyError("unknown up_blocks entry")
    raise KeyError(f"unknown {side} module {part!r}")


def _resnet_leaf(name: str) -> str:
    if name not in _RESNET_LEAVES:
        raise KeyError(f"unknown resnet parameter {name!r}")
    return _RESNET_LEAVES[name]


def _leaf(name: str, allowed: tuple[str, ...]) -> str:
    if name not in allowed:
        raise KeyError(f"unknown parameter {name!r}")
    return name


__all__ = [
    "LATENTS_MEAN",
    "LATENTS_STD",
    "WanVAE",
    "diffusers_vae_key_to_official",
]
