"""``auto``: the fastest registered backend that builds here and whose error class is allowed.

``allow`` is the loosest error class the profile accepts, and each class admits the tighter ones:
"exact" -> exact only; "8bit" -> exact and 8bit; "sparse" -> all three. Candidates are built with
their default options. On CUDA each candidate is timed on ``shape`` (batch, tokens, heads, head_dim;
default the Wan 1.3B 480p self-attention) in bf16 and the fastest wins. On any other device timing
says nothing about the GPU we will run on, so ``sdpa`` is taken. The choice is recorded in the
implementation string, e.g. "auto -> torch-sdpa-cpu".
"""

from __future__ import annotations

from dataclasses import replace

import torch

from smartdiff.kernels import registry
from smartdiff.kernels.registry import AttentionBackend, BackendUnavailable

_ADMITS = {"exact": ("exact",), "8bit": ("exact", "8bit"), "sparse": ("exact", "8bit", "sparse")}
# Wan2.1-1.3B at 832x480x81: 12 heads x 32,760 tokens, head dim 128 (PERFORMANCE.md).
WAN_1_3B_480P = (1, 32760, 12, 128)


def _time_ms(backend: AttentionBackend, shape: tuple[int, int, int, int], device: torch.device) -> float:
    """Median of 5 timed calls after 2 warm-up calls, in milliseconds."""
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3))
    for _ in range(2):
        backend(q, k, v)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        backend(q, k, v)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def build(
    device: torch.device, allow: str = "exact", shape: tuple[int, int, int, int] | None = None
) -> AttentionBackend:
    if allow not in _ADMITS:
        raise ValueError(f"auto: allow must be one of {sorted(_ADMITS)}, got {allow!r}")
    built: dict[str, AttentionBackend] = {}
    failed: dict[str, str] = {}
    for name in registry.available_backends():
        if name == "auto":
            continue
        try:
            backend = registry.get_backend(name, device)
        except Exception as e:  # one broken backend must not stop the choice among the others
            failed[name] = str(e)
            continue
        if backend.error_class in _ADMITS[allow]:
            built[name] = backend
        else:
            failed[name] = f"error class {backend.error_class!r} not allowed by allow={allow!r}"
    if not built:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        raise BackendUnavailable(
            f"auto: no attention backend builds on {device} with allow={allow!r} ({reasons})"
        )

    if device.type != "cuda":
        choice = built.get("sdpa") or built[sorted(built)[0]]
        return replace(choice, name="auto", implementation=f"auto -> {choice.implementation}")

    timings: dict[str, float] = {}
    for name, backend in built.items():
        try:
            timings[name] = _time_ms(backend, shape or WAN_1_3B_480P, device)
        except Exception as e:  # e.g. a head dim the kernel does not support
            failed[name] = f"failed on shape {shape or WAN_1_3B_480P}: {e}"
    if not timings:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        raise BackendUnavailable(f"auto: every candidate failed on {device} ({reasons})")
    best = min(timings, key=timings.__getitem__)
    choice = built[best]
    timed = f"{timings[best]:.2f} ms at {tuple(shape or WAN_1_3B_480P)}"
    # replace keeps what the choice names for the cross-attention
    return replace(choice, name="auto", implementation=f"auto -> {choice.implementation} ({timed})")
