"""Errors of the reference 8-bit and block-sparse attention numerics against float64 attention,
on Gaussian and on clustered (video-like) inputs. CPU only; prints JSON.

    python bench/attention_reference.py
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from smartdiff.kernels.reference import (
    attention_reference,
    block_mask,
    clustered_qkv,
    relative_error,
    sage_reference,
    sparse_reference,
)

BATCH, TOKENS, HEADS, DIM = 1, 1024, 2, 64


def inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    gaussian = tuple(torch.randn(BATCH, TOKENS, HEADS, DIM, generator=g) for _ in range(3))
    return {"gaussian": gaussian, "clustered": clustered_qkv(BATCH, HEADS, TOKENS, DIM, clusters=16, seed=1)}


def main() -> None:
    report = {"shape": f"batch {BATCH}, {TOKENS} tokens, {HEADS} heads, head dim {DIM}", "inputs": {}}
    for name, (q, k, v) in inputs().items():
        ref = attention_reference(q, k, v)
        half = F.scaled_dot_product_attention(*(t.half().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        mask = block_mask(q, k, 128, 64, topk=0.5, sim_threshold=None)
        report["inputs"][name] = {
            "sage_int8_qk_fp8_pv": relative_error(sage_reference(q, k, v), ref),
            "sage_int8_qk_fp16_pv": relative_error(sage_reference(q, k, v, pv_dtype=None), ref),
            "sdpa_fp16": relative_error(half, ref),
            "sparse_half_of_blocks": relative_error(sparse_reference(q, k, v, mask, 128, 64), ref),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
