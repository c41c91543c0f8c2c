"""Memory levels: what lives on the GPU, and block streaming for what does not.

0  everything resident on the GPU.
1  + the VAE decodes (and encodes) in overlapping full-width strips with blended seams.
2  + the T5 encoder's weights stay in CPU memory; its 24 blocks are streamed to the GPU one by one
     for each encode (GPU speed, about two blocks of GPU memory; CPU compute of a 5.7B encoder would
     take seconds per prompt). Its output is cached per prompt text in every level.
3  + the DiT's blocks stay in pinned CPU memory and are streamed: block i+1 is copied on a side
     CUDA stream while block i computes, at most two blocks resident. For Wan2.2 the inactive
     expert holds no GPU memory at all.
4  + the DiT's token-local work (modulation, RoPE, the whole feed-forward half of each block) runs
     on chunks of tokens, so its fp32 temporaries and the 4.7x-wide FFN hidden are never whole:
     a lower activation peak for a little speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from smartdiff.pipeline.vae import WanVAE

LEVELS = (0, 1, 2, 3, 4)
TOKEN_CHUNKS_AT_LEVEL_4 = 8


@dataclass(frozen=True)
class MemoryPlan:
    level: int

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"low_mem_level must be one of {LEVELS}, got {self.level}")

    @property
    def tiled_vae(self) -> bool:
        return self.level >= 1

    @property
    def stream_text_encoder(self) -> bool:
        return self.level >= 2

    @property
    def stream_dit(self) -> bool:
        return self.level >= 3

    @property
    def token_chunks(self) -> int:
        return TOKEN_CHUNKS_AT_LEVEL_4 if self.level >= 4 else 1


# Peak activation bytes per (token x model width) element of the DiT forward, measured on the H200
# with bench/memory_gpu.py (2026-11-29): 34 (1.3B) and 26 (14B) at levels 0-3, 23.5 and 22.5 at
# level 4. Rounded up so the estimate errs on the side of refusing.
DIT_BYTES_PER_ELEMENT = {0: 40, 1: 40, 2: 40, 3: 40, 4: 30}
# VAE decode working memory per output pixel-frame at its decode chunk of 2 latent frames: 6.5 GB for
# 832x480x81 untiled (201 bytes, bench/vae_gpu.py on an H100); the tiled decode's full-width strips
# of at most 256 rows bound it by the strip, not the frame.
VAE_BYTES_PER_PIXEL_FRAME = 220
VAE_STRIP_ROWS = WanVAE.STRIP_LATENTS * 8  # the Wan VAEs' spatial stride


def estimate_job_bytes(
    level: int, tokens: int, model_width: int, frame_height: int, frame_width: int, frames: int
) -> int:
    """GPU memory a job needs beyond the resident weights: the larger of its DiT and VAE peaks."""
    dit = DIT_BYTES_PER_ELEMENT[level] * tokens * model_width
    rows = min(frame_height, VAE_STRIP_ROWS) if level >= 1 else frame_height
    vae = VAE_BYTES_PER_PIXEL_FRAME * rows * frame_width * frames
    return max(dit, vae)


@dataclass
class StreamLog:
    """Device-agnostic bookkeeping of a BlockStreamer, for tests and reports."""

    events: list[tuple[str, int]] = field(default_factory=list)  # ("load" | "compute" | "release", block)
    resident: set[int] = field(default_factory=set)
    max_resident: int = 0

    def note(self, event: str, block: int) -> None:
        self.events.append((event, block))
        if event == "load":
            self.resident.add(block)
        elif event == "release":
            self.resident.discard(block)
        self.max_resident = max(self.max_resident, len(self.resident))


class BlockStreamer:
    """Runs a ModuleList's blocks on ``device`` while their weights live in (pinned) CPU memory.

    Forward hooks do the work: entering block i waits for its copy, then starts copying block i+1
    on a side stream; leaving block i drops its GPU weights. So at most two blocks are resident,
    and the copy of the next block overlaps the compute of this one. After the last block, block 0
    is prefetched for the next forward.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, keep_log: bool = False):
        self.blocks = blocks
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.log = StreamLog() if keep_log else None
        # Per block: [(parameter or buffer owner, name, CPU tensor)], the CPU copy kept for good.
        self.host: list[list[tuple[nn.Module, str, torch.Tensor]]] = []
        for i, block in enumerate(blocks):
            entries = []
            for module in block.modules():
                for name, tensor in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)
                ):
                    cpu = tensor.detach().to("cpu")
                    if self.cuda and not cpu.is_pinned():
                        cpu = cpu.pin_memory()  # pinned: the copy can run asynchronously
                    entries.append((module, name, cpu))
            self.host.append(entries)
            # Block by block, so the unpinned originals go as their pinned copies come: the host
            # holds the model plus one block, not the model twice.
            self._point_at_host(i)
        self.loaded: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i)))
            self.handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._leave(i)))

    def _set(self, module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor

    def _point_at_host(self, i: int) -> None:
        for module, name, cpu in self.host[i]:
            self._set(module, name, cpu)

    def _load(self, i: int) -> None:
        """Start copying block i to the device (on the side stream when on CUDA)."""
        if i in self.loaded or i >= len(self.blocks):
            return
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                copies = [cpu.to(self.device, non_blocking=True) for _, _, cpu in self.host[i]]
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            copies = [cpu.to(self.device) for _, _, cpu in self.host[i]]
            event = None
        self.loaded[i] = (copies, event)
        if self.log:
            self.log.note("load", i)

    def _enter(self, i: int) -> None:
        self._load(i)
        copies, event = self.loaded[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor in copies:
                # The tensors were made on the copy stream; tell the allocator they are used here.
                tensor.record_stream(compute)
        for (module, name, _), tensor in zip(self.host[i], copies):
            self._set(module, name, tensor)
        if self.log:
            self.log.note("compute", i)
        self._load(i + 1)

    def _leave(self, i: int) -> None:
        self._point_at_host(i)
        del self.loaded[i]
        if self.log:
            self.log.note("release", i)
        if i == len(self.blocks) - 1:
            self._load(0)  # ready for the next forward

    def release_all(self) -> None:
        """Drop every block's device copy (e.g. when a Wan2.2 expert goes idle)."""
        for i in list(self.loaded):
            del self.loaded[i]
            if self.log:
                self.log.note("release", i)
