"""``sparge``: SpargeAttn's block-sparse 8-bit attention, from the upstream package or our Triton kernel.

Selection (per query block: mean-pooled block scores, keep the top-k fraction or a CDF mass of key
blocks, never drop a block whose tokens are not alike) and numerics are those of
``kernels.reference.block_mask`` / ``sparge_reference``. Options, from
``get_backend("sparge", device, **options)``:

- ``topk``: fraction of key blocks kept per query block, or ``cdf``: probability mass to keep;
  at most one; neither means ``topk=0.5``.
- ``sim_threshold``: a block whose mean token-pair cosine similarity is at or below it is never
  dropped (upstream ``simthreshd1``); default 0.6, as the reference. A negative value turns the
  rule off.
- ``implementation``: ``"upstream"`` is the ``spas_sage_attn`` package (SpargeAttn's CUDA kernels;
  fp32 inputs run in bf16); ``"triton"`` is this project's ``kernels.triton_sparge`` (the block map
  is ``block_mask``'s rule with the pooling in Triton, then a Triton kernel that visits only the
  kept blocks, with the 8-bit numerics of ``kernels.triton_sage``; needs triton and a CUDA GPU of
  sm_80+); ``None`` (default):
  upstream when importable, else ours.
- ``pv_threshold`` (upstream only, so only with ``implementation="upstream"``): its P.V skip
  ``pvthreshd``; ``None`` means upstream's 50. Our kernel computes every kept block.
- ``pv`` (ours only, so only with ``implementation="triton"``): P.V precision ``"fp8"`` (sm_89+)
  or ``"fp16"``; ``None`` picks fp8 where the GPU has it.
- ``stats`` (ours only, likewise): a ``SparsityStats`` that each call adds its block map to, so a
  job can log the fraction of blocks computed::

      stats = SparsityStats()
      backend = get_backend("sparge", "cuda", implementation="triton", topk=0.5, stats=stats)
      ...  # the job runs
      record["attention_sparsity"] = stats.summary()  # calls, kept and total blocks, kept fraction
      stats.reset()  # before the next job

  (Upstream does not expose its block map.)

The cross-attention to the text stays exact (SDPA): the backend names it as its ``cross``.

An implementation that is asked for and cannot run here raises ``BackendUnavailable``; without a
CUDA device every implementation is unavailable.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from smartdiff.kernels import sage, sdpa
from smartdiff.kernels.registry import (
    AttentionBackend,
    AttentionFn,
    BackendUnavailable,
    in_half_precision,
    needs_cuda,
    package_version,
)

IMPLEMENTATIONS = ("upstream", "triton")
UPSTREAM_PV_THRESHOLD = 50.0

_INSTALL = (
    "build and install SpargeAttn from github.com/thu-ml/SpargeAttn (python setup.py install; "
    "it provides spas_sage_attn)"
)
_OURS = "this project's Triton kernel (implementation='triton') needs triton and a CUDA GPU of sm_80+"


class SparsityStats:
    """Block-map totals of the calls since the last ``reset``: how much of the attention was computed.

    The totals are counted on the device, in place: ``record`` never waits for the GPU, and a CUDA
    graph that captured the calls (``pipeline.cuda_graphs``) counts them again at every replay.
    ``summary`` reads them (and waits).
    """

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # int64 [calls, kept blocks, total blocks]

    def reset(self) -> None:
        if self._counts is not None:
            self._counts.zero_()  # in place: a captured graph adds to this very tensor

    def record(self, mask: torch.Tensor) -> None:
        if self._counts is None:
            self._counts = torch.zeros(3, dtype=torch.int64, device=mask.device)
        self._counts[0].add_(1)
        self._counts[1].add_(mask.sum())
        self._counts[2].add_(mask.numel())

    def summary(self) -> dict[str, int | float | None]:
        """calls, kept_blocks, total_blocks and kept_fraction (None before the first call)."""
        calls, kept, total = self._counts.tolist() if self._counts is not None else (0, 0, 0)
        return {
            "calls": calls,
            "kept_blocks": kept,
            "total_blocks": total,
            "kept_fraction": kept / total if total else None,
        }


def _check_options(topk: float | None, cdf: float | None) -> tuple[str, float]:
    if topk is not None and cdf is not None:
        raise ValueError("sparge takes topk or cdf, not both")
    if topk is None and cdf is None:
        topk = 0.5
    kind, value = ("topk", topk) if topk is not None else ("cdf", cdf)
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"sparge {kind} must be in (0, 1], got {value}")
    return kind, float(value)


def _check_implementation_options(
    implementation: str | None, pv_threshold: float | None, pv: str | None, stats: SparsityStats | None
) -> None:
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"sparge implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    # Options of one implementation need it named, so the machine never decides which is ignored.
    if pv_threshold is not None and implementation != "upstream":
        raise ValueError("sparge pv_threshold is upstream's P.V skip: it needs implementation='upstream'")
    if pv is not None and implementation != "triton":
        raise ValueError("sparge pv selects our kernel's P.V precision: it needs implementation='triton'")
    if pv not in (None, *sage.PV_PRECISIONS):
        raise ValueError(f"sparge pv must be one of {sage.PV_PRECISIONS} or None, got {pv!r}")
    if stats is not None and implementation != "triton":
        raise ValueError("sparge stats need implementation='triton' (upstream does not expose its block map)")


def _load_upstream(kind: str) -> tuple[AttentionFn | None, str]:
    """(the upstream function for ``kind``, "") if importable, else (None, why and how to install)."""
    try:
        import spas_sage_attn
    except Exception as e:  # a broken install (missing .so, wrong CUDA) is unavailable too
        return None, f"the spas_sage_attn package is not importable ({e}): {_INSTALL}"
    fn_name = "spas_sage2_attn_meansim_topk_cuda" if kind == "topk" else "spas_sage2_attn_meansim_cuda"
    upstream = getattr(spas_sage_attn, fn_name, None)
    if upstream is None:
        return None, f"spas_sage_attn has no {fn_name} (too old for {kind}): {_INSTALL}"
    return upstream, ""


def _upstream_backend(
    upstream: AttentionFn, kind: str, value: float, sim_threshold: float, pv_threshold: float
) -> AttentionBackend:
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


def _triton_backend(
    kind: str, value: float, sim_threshold: float, pv: str, stats: SparsityStats | None
) -> AttentionBackend:
    from smartdiff.kernels.triton_sparge import sparge_attention

    selection = {kind: value}
    pv_fp8 = pv == "fp8"

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, mask = sparge_attention(q, k, v, sim_threshold=sim_threshold, pv_fp8=pv_fp8, **selection)
        if stats is not None:
            stats.record(mask)
        return out

    implementation = (
        f"smartdiff-triton block-sparse {kind}={value} sim>{sim_threshold} int8-qk {pv}-pv "
        f"(triton-{package_version('triton')})"
    )
    return AttentionBackend("sparge", implementation, "sparse", attend)


def _with_exact_cross_attention(backend: AttentionBackend, device: torch.device) -> AttentionBackend:
    """Block-sparse self-attention, exact cross-attention: a block of the text is 64 of the prompt's
    tokens, not a patch of video like its neighbours, and dropping it drops words. (SpargeAttn's own
    Wan integration likewise replaces only the self-attention.)"""
    cross = sdpa.build(device)
    implementation = f"{backend.implementation}; cross-attention {cross.implementation}"
    return replace(backend, implementation=implementation, cross=cross)


def _unavailable(problems: list[str]) -> BackendUnavailable:
    return BackendUnavailable("attention backend 'sparge' unavailable: " + "; ".join(problems))


def build(
    device: torch.device,
    topk: float | None = None,
    cdf: float | None = None,
    sim_threshold: float = 0.6,
    pv_threshold: float | None = None,
    implementation: str | None = None,
    pv: str | None = None,
    stats: SparsityStats | None = None,
) -> AttentionBackend:
    # Bad options are a configuration error whatever the machine, so they are checked first.
    kind, value = _check_options(topk, cdf)
    _check_implementation_options(implementation, pv_threshold, pv, stats)

    problems = needs_cuda(device)
    upstream, upstream_problem = (None, "") if implementation == "triton" else _load_upstream(kind)
    if implementation == "upstream" or (implementation is None and upstream is not None):
        if upstream_problem:
            problems.append(upstream_problem)
        if problems:
            raise _unavailable(problems)
        threshold = UPSTREAM_PV_THRESHOLD if pv_threshold is None else pv_threshold
        return _with_exact_cross_attention(
            _upstream_backend(upstream, kind, value, sim_threshold, threshold), device
        )

    if problems:  # no CUDA: say what each implementation would need
        problems += [upstream_problem, _OURS] if implementation is None else [_OURS]
        raise _unavailable(problems)
    chosen_pv, problems = sage.triton_kernel_problems(device, pv)
    if problems:
        if implementation is None:  # neither works: the upstream route is worth saying too
            problems.append(upstream_problem)
        raise _unavailable(problems)
    return _with_exact_cross_attention(_triton_backend(kind, value, sim_threshold, chosen_pv, stats), device)
