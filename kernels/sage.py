"""``sage``: SageAttention's 8-bit attention, from the upstream package or from our Triton kernel.

Options, from ``get_backend("sage", device, **options)``:

- ``implementation``: ``"upstream"`` is ``sageattn`` from the ``sageattention`` package, which picks
  its kernel for the GPU (int8 Q.K with K smoothing; fp8 P.V on Hopper in SageAttention2 builds).
  It takes bf16/fp16: fp32 inputs are cast to bf16 and back (said in the implementation string).
  ``"triton"`` is this project's kernel, ``kernels.triton_sage`` (SageAttention2 numerics, see its
  docstring); it needs triton and a CUDA GPU of sm_80 or newer, and takes fp32 as it is.
  ``None`` (default): upstream when the package is importable, else ours.
- ``pv`` (ours only, so only with ``implementation="triton"``): the P.V precision, ``"fp8"``
  (e4m3, needs sm_89+: Ada, Hopper) or ``"fp16"`` (SageAttention1, for older GPUs); ``None`` picks
  fp8 where the GPU has it.

The implementation string says which runs, e.g. "smartdiff-triton int8-qk fp8-pv (triton-3.4.0)".
An implementation that is asked for and cannot run here raises ``BackendUnavailable``; without a
CUDA device every implementation is unavailable.
"""

from __future__ import annotations

import torch

from smartdiff.kernels.registry import (
    AttentionBackend,
    AttentionFn,
    BackendUnavailable,
    in_half_precision,
    needs_cuda,
    package_version,
)

IMPLEMENTATIONS = ("upstream", "triton")
PV_PRECISIONS = ("fp8", "fp16")

_INSTALL = (
    "pip install sageattention (SageAttention 1, Triton); for the SageAttention2 CUDA kernels "
    "(fp8 P.V on Hopper) build github.com/thu-ml/SageAttention from source"
)
_OURS = "this project's Triton kernel (implementation='triton') needs triton and a CUDA GPU of sm_80+"


def _gpu_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def triton_kernel_problems(device: torch.device, pv: str | None) -> tuple[str, list[str]]:
    """The P.V precision our Triton kernels use on CUDA ``device`` (``pv``, or fp8 where the GPU has
    it), and what stops them running there (empty if nothing). Shared with ``kernels.sparge``."""
    problems = []
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install is unavailable too
        problems.append(f"triton is not importable ({e}): pip install triton")
    capability = _gpu_capability(device)
    arch = f"sm_{capability[0]}{capability[1]}"
    if capability < (8, 0):
        problems.append(f"our Triton kernels need int8 tensor cores (sm_80+), this GPU is {arch}")
    has_fp8 = capability >= (8, 9)
    chosen = pv or ("fp8" if has_fp8 else "fp16")
    if chosen == "fp8" and not has_fp8:
        problems.append(f"fp8 P.V needs sm_89+ (Ada, Hopper), this GPU is {arch}: use pv='fp16'")
    return chosen, problems


def _load_upstream() -> tuple[AttentionFn | None, str]:
    """(sageattn, "") if the package imports, else (None, why and how to install)."""
    try:
        from sageattention import sageattn
    except Exception as e:  # a broken install (missing .so, wrong CUDA) is unavailable too
        return None, f"the sageattention package is not importable ({e}): {_INSTALL}"
    return sageattn, ""


def _upstream_backend(sageattn: AttentionFn) -> AttentionBackend:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    implementation = f"sageattention-{package_version('sageattention')} sageattn (fp32 inputs run in bf16)"
    return AttentionBackend("sage", implementation, "8bit", in_half_precision(attend))


def _triton_backend(pv: str) -> AttentionBackend:
    from smartdiff.kernels.triton_sage import sage_attention

    pv_fp8 = pv == "fp8"

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sage_attention(q, k, v, pv_fp8=pv_fp8)

    implementation = f"smartdiff-triton int8-qk {pv}-pv (triton-{package_version('triton')})"
    return AttentionBackend("sage", implementation, "8bit", attend)


def _unavailable(problems: list[str]) -> BackendUnavailable:
    return BackendUnavailable("attention backend 'sage' unavailable: " + "; ".join(problems))


def build(device: torch.device, implementation: str | None = None, pv: str | None = None) -> AttentionBackend:
    # Bad options are a configuration error whatever the machine, so they are checked first.
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"sage implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if pv is not None and implementation != "triton":
        raise ValueError("sage pv selects our kernel's P.V precision: it needs implementation='triton'")
    if pv not in (None, *PV_PRECISIONS):
        raise ValueError(f"sage pv must be one of {PV_PRECISIONS} or None, got {pv!r}")

    problems = needs_cuda(device)
    sageattn, upstream_problem = (None, "") if implementation == "triton" else _load_upstream()
    if implementation == "upstream" or (implementation is None and sageattn is not None):
        if upstream_problem:
            problems.append(upstream_problem)
        if problems:
            raise _unavailable(problems)
        return _upstream_backend(sageattn)

    if problems:  # no CUDA: say what each implementation would need
        problems += [upstream_problem, _OURS] if implementation is None else [_OURS]
        raise _unavailable(problems)
    chosen_pv, problems = triton_kernel_problems(device, pv)
    if problems:
        if implementation is None:  # neither works: the upstream route is worth saying too
            problems.append(upstream_problem)
        raise _unavailable(problems)
    return _triton_backend(chosen_pv)
