"""SpargeAttn's block-sparse 8-bit attention from the upstream ``spas_sage_attn`` package.

Selection (per query block: mean-pooled block scores, keep the top-k fraction or a CDF mass of key
blocks, never drop a block whose tokens are not alike) and numerics are those of
``kernels.reference.block_mask`` / ``sparge_reference``; upstream's P.V skip (``pv_threshold``,
its ``pvthreshd``) is passed through. Options, from ``get_backend("sparge", device, **options)``:

- ``topk``: fraction of key blocks kept per query block, or ``cdf``: probability mass to keep;
  at most one; neither means ``topk=0.5``.
- ``sim_threshold``: a block whose mean token-pair cosine similarity is at or below it is never
  dropped (upstream ``simthreshd1``); default 0.6, as the reference.
- ``pv_threshold``: upstream ``pvthreshd``; default 50.

This project has no kernel of its own for it yet. Without the package or a CUDA device this
backend is unavailable.
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
    "build and install SpargeAttn from github.com/thu-ml/SpargeAttn (python setup.py install; "
    "it provides spas_sage_attn). This project's own block-sparse kernel is not written yet"
)


def _check_options(topk: float | None, cdf: float | None) -> tuple[str, float]:
    if topk is not None and cdf is not None:
        raise ValueError("sparge takes topk or cdf, not both")
    if topk is None and cdf is None:
        topk = 0.5
    kind, value = ("topk", topk) if topk is not None else ("cdf", cdf)
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"sparge {kind} must be in (0, 1], got {value}")
    return kind, float(value)


def build(
    device: torch.device,
    topk: float | None = None,
    cdf: float | None = None,
    sim_threshold: float = 0.6,
    pv_threshold: float = 50.0,
) -> AttentionBackend:
    # Bad options are a configuration error whatever the machine, so they are checked first.
    kind, value = _check_options(topk, cdf)
    problems = needs_cuda(device)
    try:
        import spas_sage_attn
    except Exception as e:  # a broken install (missing .so, wrong CUDA) is unavailable too
        problems.append(f"the spas_sage_attn package is not importable ({e}): {_INSTALL}")
    else:
        fn_name = "spas_sage2_attn_meansim_topk_cuda" if kind == "topk" else "spas_sage2_attn_meansim_cuda"
        upstream = getattr(spas_sage_attn, fn_name, None)
        if upstream is None:
            problems.append(f"spas_sage_attn has no {fn_name} (too old for {kind}): {_INSTALL}")
    if problems:
        raise BackendUnavailable("attention backend 'sparge' unavailable: " + "; ".join(problems))

    selection = {"topk": value, "cdfthreshd": None} if kind == "topk" else {"cdfthreshd": value}

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = upstream(
            q,
            k,
            v,
            is_causal=False,
            smooth_k=True,
            simthreshd1=sim_threshold,
            pvthreshd=pv_threshold,
            tensor_layout="NHD",
            **selection,
        )
        return out.to(q.dtype)  # some releases return fp16 whatever the input dtype

    implementation = (
        f"spas_sage_attn-{package_version('spas_sage_attn')} {kind}={value} sim>{sim_threshold} "
        f"pv<{pv_threshold} (fp32 inputs run in bf16)"
    )
    return AttentionBackend("sparge", implementation, "sparse", in_half_precision(attend))
