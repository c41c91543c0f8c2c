"""PyTorch scaled-dot-product attention.

On Hopper the cuDNN kernel is much faster than SDPA's flash kernel at Wan shapes (630 against 362
TFLOP/s measured at the 1.3B 480p shape), so on CUDA we pin the backend order cuDNN, flash,
memory-efficient instead of leaving the choice to PyTorch's heuristics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smartdiff.kernels.registry import AttentionBackend

_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (B, L, H, D) -> (B, H, L, D) for SDPA and back.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(_CUDA_ORDER, set_priority=True):
        return _sdpa(q, k, v)


def build(device: torch.device) -> AttentionBackend:
    if device.type == "cuda":
        return AttentionBackend("sdpa", "torch-sdpa(cudnn>flash>efficient)", "exact", _sdpa_cuda)
    return AttentionBackend("sdpa", f"torch-sdpa-{device.type}", "exact", _sdpa)
