"""Attention kernels on one CUDA GPU: are they right, and how fast are they at Wan's shapes.

(a) Checks. Every implementation that builds here (SDPA pinned to cuDNN and to flash, flash_attn,
    sage: upstream sageattn and ours with fp8 and with fp16 P.V, on Hopper also kernels.gluon_sage,
    sparge: upstream and ours) runs on fresh Gaussian bf16 inputs at mid shapes against float64
    attention: relative error ||out - ref|| / ||ref||, NaN presence. Each run's output memory is
    poisoned with NaN first (the caching allocator hands a freed block of the output's size back to
    the next allocation of that size; the report says whether the output did land there), so an
    unwritten tile shows as NaN. Sparse implementations run on clustered (video-like) inputs at kept
    fractions 0.5 and 0.25 (top-k, the unlike-block guard off) against float64 attention over the
    kept blocks.
(b) Timings at the Wan 2.1 self-attention shapes, 1.3B 480p (B=1, 12 heads x 32,760 tokens, head
    dim 128) and 14B 720p (B=1, 40 heads x 75,600 tokens, head dim 128): ms (triton.testing.do_bench,
    median), TFLOP/s-equivalent 4*B*H*N*N*D / time (dense-equivalent for the sparse kernels, so
    speed-ups read directly), relative error against fp32 attention computed in chunks (over the
    kept blocks for the sparse ones), plus the block-map time of our sparse path on its own and our
    8-bit path's quantisation of Q, K and V on its own (part of each of its rows). --configs also
    times our 8-bit kernel at the tile configs it names, at every shape.

A package that is not installed is reported as "not installed". Anything else that goes wrong (a
build, a run, an error bound, NaN, a poisoning that did not land) is reported as FAILED and makes the
exit status 1. Prints JSON, then the tables. About 3 minutes on an H200; --quick (1.3B shape only)
about 1.5; --sweep (other tile configs of our kernels at the first shape) adds about 3 (58 configs,
TMA loads among them).

    python bench/attention_gpu.py --json-out attention_gpu.json
    python bench/attention_gpu.py --quick --sweep
    python bench/attention_gpu.py --quick --shapes 1.3b-480p 14b-720p --configs "m64 n128 w4 s1 tma"
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from common import emit
from torch.nn.attention import SDPBackend, sdpa_kernel

from smartdiff.kernels import get_backend
from smartdiff.kernels.reference import (
    _token_mask,
    attention_reference,
    block_mask,
    clustered_qkv,
    relative_error,
    sparse_reference,
)
from smartdiff.kernels.registry import AttentionBackend, AttentionFn, package_version
from smartdiff.kernels.sparge import SparsityStats

if TYPE_CHECKING:  # our kernels import triton: only when they run, so a missing triton is reported
    from smartdiff.kernels.triton_sage import KernelConfig

DEVICE = torch.device("cuda")
ERROR_BOUND = {"exact": 0.01, "8bit": 0.1, "sparse": 0.1}  # relative error above which a check fails
KEPT_FRACTIONS = (0.5, 0.25)
POISON_BLOCKS = 16  # NaN blocks of the output's size freed before each checked run
REF_CHUNK = 4096  # query rows per step of the chunked fp32 reference (a multiple of the 128 map rows)
GUARD_OFF = -1.0  # sim_threshold below any similarity: the top-k fraction is exact


@dataclass(frozen=True)
class Shape:
    label: str
    batch: int
    q_tokens: int
    kv_tokens: int
    heads: int
    dim: int

    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.q_tokens * self.kv_tokens * self.dim


CHECK_SHAPES = [
    Shape("mid-d128", 1, 8190, 8190, 8, 128),  # 8190: partial last blocks of 128 and of 64
    Shape("mid-d64-b2", 2, 3000, 3000, 4, 64),
    Shape("cross-512", 1, 4096, 512, 8, 128),  # video queries on Wan's 512 text tokens
]
WAN_SHAPES = {
    "1.3b-480p": Shape("1.3B-480p", 1, 32760, 32760, 12, 128),
    "14b-720p": Shape("14B-720p", 1, 75600, 75600, 40, 128),
}


@dataclass(frozen=True)
class Impl:
    name: str
    error_class: str  # "exact", "8bit" or "sparse": which ERROR_BOUND applies
    packages: tuple[str, ...]  # modules of which any one means "installed"; () for torch itself
    build: Callable[[], AttentionBackend]  # raises if it cannot run here
    head_dims: tuple[int, ...] | None = None  # the head dims it runs, if not all

    def runs(self, head_dim: int) -> bool:
        return self.head_dims is None or head_dim in self.head_dims


@dataclass(frozen=True)
class Built:
    backend: AttentionBackend | None
    status: str  # "ok", "not installed" or "FAILED to build: ..."


def pinned_sdpa(kernel: SDPBackend) -> AttentionBackend:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return AttentionBackend("sdpa", f"torch-sdpa pinned to {kernel.name}", "exact", attend)


def ours_pv() -> str:
    """fp8 P.V where the GPU has it (sm_89+), as the backends choose."""
    return "fp8" if torch.cuda.get_device_capability() >= (8, 9) else "fp16"


def gluon_kernel() -> AttentionBackend:
    """``kernels.gluon_sage``: our fp8 P.V numerics with the products overlapping the softmax
    (Hopper, head dim 128), beside the Triton kernel the sage backend runs."""
    from smartdiff.kernels import gluon_sage

    return AttentionBackend("sage", "kernels.gluon_sage, fp8 P.V", "8bit", gluon_sage.dense_attention)


def dense_impls() -> list[Impl]:
    def sage(implementation: str, **options: str) -> Callable[[], AttentionBackend]:
        return lambda: get_backend("sage", DEVICE, implementation=implementation, **options)

    gluon = []  # kernels.gluon_sage imports triton: a missing triton shows in our other rows
    if importlib.util.find_spec("triton"):
        from smartdiff.kernels import gluon_sage

        if gluon_sage.on_hopper(DEVICE):
            gluon = [Impl("sage-ours-gluon", "8bit", ("triton",), gluon_kernel, (gluon_sage.HEAD_DIM,))]
    return [
        Impl("sdpa-cudnn", "exact", (), lambda: pinned_sdpa(SDPBackend.CUDNN_ATTENTION)),
        Impl("sdpa-flash", "exact", (), lambda: pinned_sdpa(SDPBackend.FLASH_ATTENTION)),
        Impl(
            "flash_attn",
            "exact",
            ("flash_attn_interface", "flash_attn"),
            lambda: get_backend("flash_attn", DEVICE),
        ),
        Impl("sage-upstream", "8bit", ("sageattention",), sage("upstream")),
        Impl("sage-ours-fp8", "8bit", ("triton",), sage("triton", pv="fp8")),
        *gluon,
        Impl("sage-ours-fp16", "8bit", ("triton",), sage("triton", pv="fp16")),
    ]


def sparge_impls(fraction: float, stats: SparsityStats) -> list[Impl]:
    """Both sparge implementations at top-k ``fraction``, guard off; ours records into ``stats``."""
    options = {"topk": fraction, "sim_threshold": GUARD_OFF}
    ours = {"implementation": "triton", "pv": ours_pv(), "stats": stats}
    return [
        Impl(
            "sparge-upstream",
            "sparse",
            ("spas_sage_attn",),
            lambda: get_backend("sparge", DEVICE, implementation="upstream", **options),
        ),
        Impl("sparge-ours", "sparse", ("triton",), lambda: get_backend("sparge", DEVICE, **options, **ours)),
    ]


def build(impl: Impl, failures: list[str]) -> Built:
    if impl.packages and not any(importlib.util.find_spec(p) for p in impl.packages):
        return Built(None, "not installed")
    try:
        return Built(impl.build(), "ok")
    except Exception as e:
        failures.append(f"{impl.name}: failed to build: {e}")
        return Built(None, f"FAILED to build: {e}")


def gaussian(shape: Shape, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(tokens: int) -> torch.Tensor:
        size = (shape.batch, tokens, shape.heads, shape.dim)
        return torch.randn(size, generator=g, device=DEVICE, dtype=torch.bfloat16)

    return randn(shape.q_tokens), randn(shape.kv_tokens), randn(shape.kv_tokens)


def run_poisoned(
    fn: AttentionFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """Run fn with freed NaN blocks of its output's size in the allocator; (out, whether out is in one)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # so the only cached blocks of that size are the poisoned ones
    poison = [torch.full_like(q, float("nan")) for _ in range(POISON_BLOCKS)]
    spans = [(p.data_ptr(), p.data_ptr() + p.nbytes) for p in poison]
    del poison
    out = fn(q, k, v)
    torch.cuda.synchronize()
    return out, any(start <= out.data_ptr() < end for start, end in spans)


def error_problems(row: dict, error_class: str) -> list[str]:
    problems = []
    if row.get("nan"):
        problems.append("NaN in output")
    if "rel_error" in row and not row["rel_error"] <= ERROR_BOUND[error_class]:
        problems.append(f"error {row['rel_error']:.3g} > {ERROR_BOUND[error_class]}")
    return problems


def check(
    impl: Impl,
    built: Built,
    shape: Shape,
    inputs: str,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ref: torch.Tensor,
    failures: list[str],
    extra_check: Callable[[dict], list[str]] | None = None,
) -> dict:
    """One correctness row: poisoned run, NaN, error against ``ref`` (float64), status."""
    row: dict = {"impl": impl.name, "shape": shape.label, "inputs": inputs, "status": built.status}
    if built.backend is None:
        return row
    if not impl.runs(shape.dim):
        row["status"] = f"not for head dim {shape.dim}"
        return row
    row["implementation"] = built.backend.implementation
    try:
        out, landed = run_poisoned(built.backend, *qkv)
        row["nan"] = bool(out.isnan().any())
        row["poisoned"] = landed
        row["rel_error"] = relative_error(out.float().nan_to_num(0.0), ref)
        problems = error_problems(row, impl.error_class)
        if not landed:
            problems.append("output not in poisoned memory: unwritten tiles went unchecked")
        problems += extra_check(row) if extra_check else []
    except Exception as e:
        problems = [f"{type(e).__name__}: {e}"]
    row["status"] = "FAILED: " + "; ".join(problems) if problems else "ok"
    if problems:
        failures.append(f"{impl.name} on {shape.label} {inputs}: {row['status']}")
    print(row, flush=True)
    return row


def dense_checks(failures: list[str]) -> list[dict]:
    rows = []
    built = [(impl, build(impl, failures)) for impl in dense_impls()]
    for index, shape in enumerate(CHECK_SHAPES):
        qkv = gaussian(shape, seed=100 + index)
        ref = attention_reference(*qkv)  # float64
        rows += [check(impl, b, shape, "gaussian", qkv, ref, failures) for impl, b in built]
        del qkv, ref
        gc.collect()
    return rows


def sparse_checks(failures: list[str]) -> list[dict]:
    rows = []
    shape = CHECK_SHAPES[0]
    cpu = clustered_qkv(1, shape.heads, shape.q_tokens, shape.dim, clusters=32, seed=7)
    qkv = tuple(t.to(DEVICE, torch.bfloat16) for t in cpu)
    for fraction in KEPT_FRACTIONS:
        mask = block_mask(qkv[0], qkv[1], 128, 64, topk=fraction, sim_threshold=None)
        ref = sparse_reference(*(t.double() for t in qkv), mask)  # float64, kept blocks only
        stats = SparsityStats()
        expected = int(mask.sum()) / mask.numel()  # the asked fraction where the block counts allow

        def kept_as_the_map(row: dict, stats: SparsityStats = stats, expected: float = expected) -> list[str]:
            row["kept_fraction"] = stats.summary()["kept_fraction"]
            return (
                [] if row["kept_fraction"] == expected else [f"kept {row['kept_fraction']}, not {expected}"]
            )

        for impl in sparge_impls(fraction, stats):
            extra = kept_as_the_map if impl.name == "sparge-ours" else None
            inputs = f"clustered topk={fraction}"
            rows.append(check(impl, build(impl, failures), shape, inputs, qkv, ref, failures, extra))
    return rows


def fp32_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 attention (no TF32), one head and REF_CHUNK query rows at a time; over mask's kept blocks."""
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for bi in range(b):
            for hi in range(h):
                kt, vh = k[bi, :, hi].float().T, v[bi, :, hi].float()
                for start in range(0, n_q, REF_CHUNK):
                    stop = min(start + REF_CHUNK, n_q)
                    s = (q[bi, start:stop, hi].float() @ kt) * d**-0.5
                    if mask is not None:
                        blocks = mask[bi, hi, start // 128 : (stop + 127) // 128][None, None]
                        kept = _token_mask(blocks, 128, 64, stop - start, n_k)[0, 0]
                        s.masked_fill_(~kept, float("-inf"))
                    out[bi, start:stop, hi] = torch.softmax(s, dim=-1).nan_to_num_(0.0) @ vh
    finally:
        torch.set_float32_matmul_precision(previous)
    return out


def timing(
    name: str,
    implementation: str,
    shape: Shape,
    fn: Callable[[], torch.Tensor],
    ref: torch.Tensor | None,
    error_class: str,
    rep_ms: int,
    failures: list[str],
) -> dict:
    """One timing row: a first call (compiles; its error against ``ref`` if given), then do_bench."""
    import triton.testing

    row: dict = {"shape": shape.label, "impl": name, "implementation": implementation}
    try:
        out = fn()
        torch.cuda.synchronize()
        if ref is not None:
            row["nan"] = bool(out.isnan().any())
            row["rel_error"] = relative_error(out.float().nan_to_num(0.0), ref)
        del out
        row["ms"] = round(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"), 3)
        row["tflops"] = round(shape.flops() / row["ms"] / 1e9, 1)
        problems = error_problems(row, error_class)
    except Exception as e:
        problems = [f"{type(e).__name__}: {e}"]
    row["status"] = "FAILED: " + "; ".join(problems) if problems else "ok"
    if problems:
        failures.append(f"{name} on {shape.label}: {row['status']}")
    print(row, flush=True)
    return row


def dense_timings(
    shape: Shape, qkv, ref: torch.Tensor | None, rep_ms: int, failures: list[str]
) -> list[dict]:
    rows = []
    for impl in dense_impls():
        if not impl.runs(shape.dim):
            continue  # every timing shape is Wan's head dim 128
        built = build(impl, failures)
        if built.backend is None:
            rows.append({"shape": shape.label, "impl": impl.name, "status": built.status})
            continue
        fn = built.backend
        rows.append(
            timing(
                impl.name,
                fn.implementation,
                shape,
                lambda fn=fn: fn(*qkv),
                ref,
                impl.error_class,
                rep_ms,
                failures,
            )
        )
    return rows


def sparse_timings(
    shape: Shape, qkv, rep_ms: int, failures: list[str], with_error: bool = True
) -> list[dict]:
    """Block map alone; then per kept fraction our kernel alone at a fixed map, and both backends
    end to end (map + kernel). Upstream's own map is not known here, so its error is not measured
    on these Gaussian inputs (see the checks on clustered inputs)."""
    from smartdiff.kernels import gluon_sage
    from smartdiff.kernels.triton_sparge import (
        MAP_BLOCK_Q,
        block_map,
        block_sparse_sage_attention,
        kept_block_lists,
    )

    q, k, v = qkv
    pv_fp8 = ours_pv() == "fp8"
    rows = [
        timing(
            "block-map topk=0.5",
            "kernels.triton_sparge.block_map, sim_threshold 0.6",
            shape,
            lambda: block_map(q, k, topk=0.5, sim_threshold=0.6).mask,
            None,
            "sparse",
            rep_ms,
            failures,
        )
    ]
    for fraction in KEPT_FRACTIONS:
        mask = block_mask(q, k, 128, 64, topk=fraction, sim_threshold=None)
        ref = fp32_reference(q, k, v, mask) if with_error else None
        row = timing(
            f"sparse-kernel-ours@{fraction}",
            f"block_sparse_sage_attention pv_fp8={pv_fp8}, kernel only",
            shape,
            lambda mask=mask: block_sparse_sage_attention(q, k, v, mask, pv_fp8=pv_fp8),
            ref,
            "sparse",
            rep_ms,
            failures,
        )
        rows.append({**row, "kept_fraction": round(mask.float().mean().item(), 4)})
        if gluon_sage.on_hopper(q.device):  # the Hopper kernel, beside ours
            kept, counts = kept_block_lists(mask)
            gluon = partial(gluon_sage.sparse_attention, q, k, v, kept, counts, MAP_BLOCK_Q)
            rows.append(
                timing(
                    f"sparse-kernel-gluon@{fraction}",
                    "kernels.gluon_sage.sparse_attention, kernel only",
                    shape,
                    gluon,
                    ref,
                    "sparse",
                    rep_ms,
                    failures,
                )
            )
        stats = SparsityStats()
        for impl in sparge_impls(fraction, stats):
            built = build(impl, failures)
            name = f"{impl.name}@{fraction}"
            if built.backend is None:
                rows.append({"shape": shape.label, "impl": name, "status": built.status})
                continue
            fn = built.backend
            ours = impl.name == "sparge-ours"
            row = timing(
                name,
                fn.implementation,
                shape,
                lambda fn=fn: fn(q, k, v),
                ref if ours else None,
                "sparse",
                rep_ms,
                failures,
            )
            rows.append({**row, "kept_fraction": stats.summary()["kept_fraction"]} if ours else row)
        del mask, ref
    return rows


def label(config: KernelConfig) -> str:
    loads = " tma" if config.tma else ""
    cap = f" r{config.max_registers}" if config.max_registers else ""
    return f"m{config.block_m} n{config.block_n} w{config.num_warps} s{config.num_stages}{loads}{cap}"


def parse_label(text: str) -> KernelConfig:
    """The config a label names ("m64 n128 w4 s1 tma r168"), so --configs takes what the tables print."""
    from smartdiff.kernels.triton_sage import KernelConfig

    fields = {"tma": False, "max_registers": None}
    names = {"m": "block_m", "n": "block_n", "w": "num_warps", "s": "num_stages", "r": "max_registers"}
    for word in text.split():
        if word == "tma":
            fields["tma"] = True
        elif word[:1] in names and word[1:].isdigit():
            fields[names[word[0]]] = int(word[1:])
        else:
            raise argparse.ArgumentTypeError(
                f"{word!r} in config {text!r}: expected m<int> n<int> w<int> s<int> [tma] [r<int>]"
            )
    missing = {"block_m", "block_n", "num_warps", "num_stages"} - fields.keys()
    if missing:
        raise argparse.ArgumentTypeError(f"config {text!r} lacks {sorted(missing)}")
    return KernelConfig(**fields)


def ours_dense_timings(
    shape: Shape, qkv, ref: torch.Tensor | None, configs: list[KernelConfig], rep_ms: int, failures: list[str]
) -> list[dict]:
    """Our dense 8-bit path's quantisation alone (part of every sage-ours row), then our kernel at
    the configs named on the command line (--configs)."""
    from smartdiff.kernels.triton_sage import CONFIGS, for_device, quantize_qkv, sage_attention

    q, k, v = qkv
    pv_fp8 = ours_pv() == "fp8"
    default = for_device(CONFIGS[shape.dim], q.device)
    quantise = partial(quantize_qkv, q, k, v, default, pv_fp8)
    row = timing(
        "sage-ours quantisation", "triton_sage.quantize_qkv", shape, quantise, None, "8bit", rep_ms, failures
    )
    row.pop("tflops", None)  # not attention
    return [row] + [
        timing(
            f"sage {label(c)}",
            str(c),
            shape,
            partial(sage_attention, q, k, v, pv_fp8, c),
            ref,
            "8bit",
            rep_ms,
            failures,
        )
        for c in configs
    ]


def sweep(shape: Shape, qkv, ref: torch.Tensor | None) -> tuple[list[dict], list[str]]:
    """Our kernels at other tile and launch configs, each with its error. A config that does not fit
    (e.g. out of shared memory) is a finding, not a failure of the run: its problems are returned apart."""
    from smartdiff.kernels.triton_sage import KernelConfig, sage_attention
    from smartdiff.kernels.triton_sparge import block_sparse_sage_attention, sparse_config

    q, k, v = qkv
    pv_fp8 = ours_pv() == "fp8"
    ref = fp32_reference(q, k, v) if ref is None else ref  # every config's error, also with --quick
    problems: list[str] = []

    def sage_row(config: KernelConfig) -> dict:
        run = partial(sage_attention, q, k, v, pv_fp8, config)
        return timing(f"sage {label(config)}", str(config), shape, run, ref, "8bit", 50, problems)

    rows = [
        sage_row(KernelConfig(block_m, block_n, num_warps, num_stages))
        for block_m, block_n in ((128, 128), (128, 64), (64, 128), (64, 64))
        for num_warps in (4, 8)
        for num_stages in (2, 3, 4)
    ]
    # TMA loads at the tiles that did best with pointers.
    rows += [
        sage_row(KernelConfig(block_m, block_n, num_warps, num_stages, tma=True))
        for block_m, block_n, num_warps in ((64, 128, 4), (128, 128, 8), (64, 64, 4))
        for num_stages in (2, 3, 4)
    ]
    # One K and one V buffer, as SageAttention2's Hopper kernel holds them.
    rows.append(sage_row(KernelConfig(64, 128, 4, 1, tma=True)))
    mask = block_mask(q, k, 128, 64, topk=0.5, sim_threshold=None)
    sparse_ref = fp32_reference(q, k, v, mask)
    sparse_configs = [
        replace(
            sparse_config(shape.dim, q.device),
            block_m=block_m,
            num_warps=num_warps,
            num_stages=num_stages,
            tma=tma,
        )
        for block_m in (128, 64)  # the map's query blocks, or halves of them
        for num_warps in (4, 8)
        for num_stages in (2, 3, 4)
        for tma in (False, True)
    ]
    for config in sparse_configs:
        run = partial(block_sparse_sage_attention, q, k, v, mask, pv_fp8, config)
        name = f"sparse@0.5 {label(config)}"
        rows.append(timing(name, str(config), shape, run, sparse_ref, "sparse", 50, problems))
    return rows, problems


def header() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {
            dist: package_version(dist)
            for dist in ("triton", "flash_attn", "flash_attn_3", "sageattention", "spas_sage_attn")
        },
    }


def print_tables(report: dict) -> None:
    print(f"\n{'check':<16} {'shape':<11} {'inputs':<22} {'rel err':>9} {'NaN':>5} {'poisoned':>8}  status")
    for r in report["checks"]:
        err = f"{r['rel_error']:.2e}" if "rel_error" in r else "-"
        print(
            f"{r['impl']:<16} {r['shape']:<11} {r['inputs']:<22} {err:>9} {str(r.get('nan', '-')):>5} "
            f"{str(r.get('poisoned', '-')):>8}  {r['status']}"
        )
    print(f"\n{'shape':<10} {'kernel':<28} {'ms':>9} {'TFLOP/s':>8} {'rel err':>9}  status")
    for r in report["timings"] + report.get("sweep", []):
        err = f"{r['rel_error']:.2e}" if "rel_error" in r else "-"
        print(
            f"{r['shape']:<10} {r['impl'][:28]:<28} {r.get('ms', '-'):>9} {r.get('tflops', '-'):>8} "
            f"{err:>9}  {r['status']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(WAN_SHAPES), help="default: all, or the 1.3B shape with --quick"
    )
    parser.add_argument("--quick", action="store_true", help="shorter timings; errors at the mid shapes only")
    parser.add_argument("--sweep", action="store_true", help="time other configs of ours at the first shape")
    parser.add_argument(
        "--configs",
        nargs="+",
        type=parse_label,
        default=[],
        help='configs of our dense 8-bit kernel to time at every shape, e.g. "m64 n128 w4 s1 tma"',
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention_gpu.py needs a CUDA GPU")
    names = args.shapes or (["1.3b-480p"] if args.quick else list(WAN_SHAPES))
    shapes = [WAN_SHAPES[name] for name in names]
    rep_ms = 50 if args.quick else 100

    failures: list[str] = []
    report = header()
    report["checks"] = dense_checks(failures) + sparse_checks(failures)
    report["timings"] = []
    for index, shape in enumerate(shapes):
        gc.collect()
        torch.cuda.empty_cache()
        qkv = gaussian(shape, seed=200 + index)
        # The fp32 reference at a Wan shape takes about a minute per kernel class: --quick skips it
        # (errors then come from the checks at the mid shapes only).
        ref = None if args.quick else fp32_reference(*qkv)
        report["timings"] += dense_timings(shape, qkv, ref, rep_ms, failures)
        report["timings"] += sparse_timings(shape, qkv, rep_ms, failures, with_error=not args.quick)
        report["timings"] += ours_dense_timings(shape, qkv, ref, args.configs, rep_ms, failures)
        if args.sweep and index == 0:
            report["sweep"], report["sweep_problems"] = sweep(shape, qkv, ref)
        del qkv, ref
    report["failures"] = failures
    emit(report, args.json_out)
    print_tables(report)
    if failures:
        raise SystemExit(f"{len(failures)} failure(s):\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
