"""CUDA graphs of the DiT forward: a pinned profile's static shapes, replayed without the CPU.

A DiT forward launches about forty kernels per block (norms, modulation, products, attention, the
fused token-wise work); eagerly, each launch costs CPU time and leaves the GPU idle wherever the CPU
falls behind. A CUDA graph records the forward's kernels once for one input shape and replays them
in one launch. ``GraphedForward`` keeps one graph per input shape (a worker serves a few sizes):

- first call at a shape: one eager warm-up call (Triton compiles and autotunes, torch.compile
  traces, lazy buffers such as the RoPE tables are made), then the capture, then a replay;
- later calls: copy the inputs into the graph's static input tensors, replay, return a copy of the
  static output (the next replay overwrites it; a guided step calls the forward twice).

What a graph cannot hold, and so what a profile with ``cuda_graphs`` refuses (``config.check_cuda_graphs``):
Python decisions per call (TeaCache and PAB choose per step what to compute), weights that move
during the forward (memory levels 3 and 4 stream the DiT's blocks) and the process-group paths.
Everything inside the forward must stay on the device: a host sync there fails the capture. What
the forward reads besides its inputs and parameters must outlive the graph (the DiT keeps the RoPE
tables of every grid it has seen), and counters it updates must be updated in place
(``kernels.sparge.SparsityStats``).

The graphs of one pipeline share one memory pool: they never run at the same time, and each
output is copied out before the next replay. The pool stays reserved after the first capture, so
the DiT's activations are not given back to the VAE decode between jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Forward = Callable[..., torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static: each call copies its inputs here
    output: torch.Tensor  # static: each replay writes here


def _shape_key(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)


class GraphedForward:
    """``forward(*inputs)`` (CUDA tensors in, one tensor out) replayed from a CUDA graph per input
    shape. ``pool``: a ``torch.cuda.graph_pool_handle()`` to share with other ``GraphedForward``s
    that never run at the same time (the experts of one pipeline)."""

    def __init__(self, forward: Forward, pool: tuple | None = None):
        self.forward = forward
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}

    @torch.no_grad()  # an inference graph: nothing is kept for a backward pass
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = _shape_key(inputs)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(inputs)
        for static, x in zip(captured.inputs, inputs, strict=True):
            static.copy_(x)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        if any(x.device.type != "cuda" for x in inputs):
            raise ValueError("CUDA graphs need the inputs on a CUDA device")
        static = tuple(x.clone() for x in inputs)
        # Warm up and capture on one side stream, so whatever the warm-up sets up per stream
        # (cuBLAS workspaces) is there for the capture.
        stream = torch.cuda.Stream(static[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(*static)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a worker's heartbeat thread may touch CUDA while this thread captures.
        with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            output = self.forward(*static)
        torch.cuda.current_stream().wait_stream(stream)
        return _Captured(graph, static, output)
