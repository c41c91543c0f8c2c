"""SageAttention's 8-bit attention from the upstream ``sageattention`` package (``sageattn``, which
picks its kernel for the GPU: int8 Q.K with K smoothing, fp8 P.V on Hopper, fp32 accumulation).

This project has no kernel of its own for it yet; ``kernels.reference.sage_reference`` holds the
numerics one must match. Without the package or a CUDA device this backend is unavailable.
sageattn takes bf16/fp16: fp32 inputs are cast to bf16 and back (said in the implementation string).
"""

from __future__ import annotations

import torch

from kernels.registry import (
    AttentionBackend,
    BackendUnavailable,
    in_half_precision,
    needs_cuda,
    package_version,
)

_INSTALL = (
    "pip install sageattention (SageAttention 1, Triton); for the SageAttention2 CUDA kernels "
    "(fp8 P.V on Hopper) build github.com/thu-ml/SageAttention from source. "
    "This project's own 8-bit kernel is not written yet"
)


def build(device: torch.device) -> AttentionBackend:
    problems = needs_cuda(device)
    try:
        from sageattention import sageattn
    except Exception as e:  # a broken install (missing .so, wrong CUDA) is unavailable too
        problems.append(f"the sageattention package is not importable ({e}): {_INSTALL}")
    if problems:
        raise BackendUnavailable("attention backend 'sage' unavailable: " + "; ".join(problems))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    implementation = f"sageattention-{package_version('sageattention')} sageattn (fp32 inputs run in bf16)"
    return AttentionBackend("sage", implementation, "8bit", in_half_precision(attend))
