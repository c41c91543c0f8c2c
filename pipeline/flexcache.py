"""FlexCache: reuse of DiT features across denoising steps, one manager per request.

Strategies:
- ``teacache``: per expert and CFG branch, accumulate the polynomial-rescaled relative L1 change of
  the timestep-modulated input; while it stays under the threshold, skip the whole block stack and
  add the residual it produced last time; else compute it and store the new residual.
- ``pab`` (Pyramid Attention Broadcast): inside a timestep window, serve each block's self- and
  cross-attention outputs from the last step that computed them, recomputing every n-th step.
- ``none``: every forward computed.

With any of them, a request may also ask for the CFG cache (``cfg_cache_interval``, FasterCache's
idea of reusing the guidance term; its frequency split is not used): inside a timestep window the
unconditional branch is computed only every n-th step, and in between its velocity is taken as the
step's conditional velocity minus the guidance term (conditional minus unconditional velocity) of
the last step that computed both. A guided step then costs one forward instead of two.

State lives in the manager, keyed by (expert, branch), so cond and uncond never share anything and
a new request starts empty; the model itself is never wrapped or modified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from smartdiff.pipeline.config import ModelConfig, TeaCacheConfig
from smartdiff.pipeline.dit import DiTInputs, WanDiT
from smartdiff.pipeline.params import GenerationParams

COND, UNCOND = 0, 1


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass
class StepRecord:
    """What one forward did, for statistics and tests."""

    step: int
    expert: int
    branch: int
    computed: bool  # the block stack ran (False: TeaCache reused the residual)
    self_reused: int = 0  # blocks whose self-attention output was reused (PAB)
    cross_reused: int = 0


class FlexCache:
    def __init__(self, params: GenerationParams, model: ModelConfig, timesteps: list[int]):
        self.strategy = params.flexcache
        self.timesteps = timesteps
        self.log: list[StepRecord] = []
        self.peak_bytes = 0
        if self.strategy == "teacache":
            self._impl = _TeaCache(params, model)
        elif self.strategy == "pab":
            self._impl = _PAB(params, timesteps)
        else:
            self._impl = None
        window = (params.cfg_cache_start, params.cfg_cache_end, params.cfg_cache_interval)
        self.cfg_window = window if params.cfg_cache_interval is not None else None
        # Per expert: the guidance term (conditional minus unconditional velocity) of its last step
        # that computed both, held while the next step may reuse it.
        self.guidance_terms: dict[int, torch.Tensor] = {}
        self.uncond_reused: list[int] = []  # the steps whose unconditional branch was not computed

    def forward(
        self,
        dit: WanDiT,
        expert: int,
        branch: int,
        step: int,
        latents: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """One DiT evaluation for (expert, branch) at ``step``, with the request's caching."""
        if self._impl is None:
            self.log.append(StepRecord(step, expert, branch, computed=True))
            return dit(latents, t, context)
        inputs = dit.prepare(latents, t, context)
        record = StepRecord(step, expert, branch, computed=True)
        tokens = self._impl.blocks(dit, inputs, expert, branch, step, len(self.timesteps), record)
        self.log.append(record)
        self._note_held_bytes()
        return dit.finish(tokens, inputs)

    def reuses_guidance(self, step: int) -> bool:
        """The CFG cache's schedule (``reuses_at``)."""
        return self.cfg_window is not None and reuses_at(self.timesteps, step, *self.cfg_window)

    def computes_uncond(self, expert: int, step: int) -> bool:
        """Whether a guided ``step`` needs the unconditional branch computed: False where the CFG
        cache holds a guidance term of ``expert`` to stand in for it."""
        return not (self.reuses_guidance(step) and expert in self.guidance_terms)

    def uncond_velocity(
        self, expert: int, step: int, velocity: torch.Tensor, velocity_uncond: torch.Tensor | None
    ) -> torch.Tensor:
        """The unconditional velocity of a guided ``step``: ``velocity_uncond`` if it was computed
        (its guidance term kept if the next step will reuse it), else the conditional ``velocity``
        minus the kept term."""
        if velocity_uncond is None:
            self.uncond_reused.append(step)
            return velocity - self.guidance_terms[expert]
        if self.reuses_guidance(step + 1):
            self.guidance_terms[expert] = velocity - velocity_uncond
            self._note_held_bytes()
        else:
            self.guidance_terms.pop(expert, None)
        return velocity_uncond

    def _note_held_bytes(self) -> None:
        held = sum(_bytes(term) for term in self.guidance_terms.values())
        self.peak_bytes = max(self.peak_bytes, held + (self._impl.held_bytes() if self._impl else 0))

    def forward_both(
        self,
        dit: WanDiT,
        expert: int,
        step: int,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both guidance branches at ``step`` as one batch-2 DiT evaluation; no feature cache (its
        decisions are per branch)."""
        if self._impl is not None:
            raise ValueError(f"feature cache {self.strategy} decides per branch: it cannot batch them")
        self.log += [
            StepRecord(step, expert, COND, computed=True),
            StepRecord(step, expert, UNCOND, computed=True),
        ]
        both = dit(torch.cat([latents, latents]), t.expand(2), torch.cat([cond, uncond]))
        return both[:1], both[1:]

    def stats(self) -> dict:
        computed = sum(r.computed for r in self.log)
        out = {
            "strategy": self.strategy,
            "computed": computed,
            "reused": len(self.log) - computed,
            "peak_cache_bytes": self.peak_bytes,
        }
        if self.cfg_window is not None:  # branches never evaluated, beside the forwards above
            out["uncond_reused"] = len(self.uncond_reused)
        if self.strategy == "pab":
            blocks = self._impl.num_blocks
            out["attention"] = {
                kind: {
                    "reused": sum(getattr(r, f"{kind}_reused") for r in self.log),
                    "computed": blocks * len(self.log) - sum(getattr(r, f"{kind}_reused") for r in self.log),
                }
                for kind in ("self", "cross")
            }
        return out


def reuses_at(timesteps: list[int], step: int, start: int, end: int, interval: int) -> bool:
    """PAB's and the CFG cache's schedule: inside (start, end), reuse except every ``interval``-th step."""
    if step >= len(timesteps):
        return False
    return interval > 1 and start < timesteps[step] < end and step % interval != 0


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """TeaCache's measure of change: mean |new - old| / mean |old|."""
    return ((new - old).abs().mean() / old.abs().mean()).item()


def teacache_input(inputs: DiTInputs, config: TeaCacheConfig) -> torch.Tensor:
    """The timestep-modulated input whose change TeaCache tracks: the projected timestep or its
    embedding, as the model config says."""
    return inputs.time if config.modulated_input == "time_projection" else inputs.time_embedding


@dataclass
class _TeaState:
    previous: torch.Tensor | None = None  # the modulated input of the last call
    residual: torch.Tensor | None = None  # block stack output minus input, last time it ran
    accumulated: float = 0.0


class _TeaCache:
    def __init__(self, params: GenerationParams, model: ModelConfig):
        self.config = config = model.teacache
        self.threshold = params.teacache_threshold
        self.rescale = np.poly1d(config.coefficients)
        self.first_steps = config.first_steps
        self.last_steps = config.last_steps
        self.states: dict[tuple[int, int], _TeaState] = {}

    def should_compute(self, state: _TeaState, modulated: torch.Tensor, step: int, steps: int) -> bool:
        forced = step < self.first_steps or step >= steps - self.last_steps or state.residual is None
        if forced:
            state.accumulated = 0.0
        else:
            state.accumulated += float(self.rescale(relative_l1(modulated, state.previous)))
        state.previous = modulated
        if forced or state.accumulated >= self.threshold:
            state.accumulated = 0.0
            return True
        return False

    def blocks(self, dit, inputs, expert, branch, step, steps, record) -> torch.Tensor:
        state = self.states.setdefault((expert, branch), _TeaState())
        modulated = teacache_input(inputs, self.config)
        if not self.should_compute(state, modulated, step, steps):
            record.computed = False
            return inputs.x + state.residual
        out = dit.run_blocks(inputs)
        state.residual = out - inputs.x
        return out

    def held_bytes(self) -> int:
        return sum(_bytes(s.previous) + _bytes(s.residual) for s in self.states.values())


class _PAB:
    def __init__(self, params: GenerationParams, timesteps: list[int]):
        self.timesteps = timesteps
        self.windows = {
            "self": (params.pab_self_start, params.pab_self_end, params.pab_self_interval),
            "cross": (params.pab_cross_start, params.pab_cross_end, params.pab_cross_interval),
        }
        self.store: dict[tuple[int, int, int, str], torch.Tensor] = {}
        self.num_blocks = 0

    def reuses(self, kind: str, step: int) -> bool:
        """The schedule of ``kind``'s attention (``reuses_at``)."""
        return reuses_at(self.timesteps, step, *self.windows[kind])

    def blocks(self, dit, inputs, expert, branch, step, steps, record) -> torch.Tensor:
        self.num_blocks = len(dit.blocks)
        reuse = [_BlockReuse(self, (expert, branch, i), step, record) for i in range(self.num_blocks)]
        return dit.run_blocks(inputs, reuse)

    def held_bytes(self) -> int:
        return sum(_bytes(t) for t in self.store.values())


class _BlockReuse:
    """AttentionReuse for one block of one forward."""

    def __init__(self, pab: _PAB, key: tuple[int, int, int], step: int, record: StepRecord):
        self.pab, self.key, self.step, self.record = pab, key, step, record

    def _serve(self, kind: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (*self.key, kind)
        if self.pab.reuses(kind, self.step) and key in self.pab.store:
            setattr(self.record, f"{kind}_reused", getattr(self.record, f"{kind}_reused") + 1)
            return self.pab.store[key]
        out = compute()
        # Keep it only if the next step will want it: outside the window nothing is held.
        if self.pab.reuses(kind, self.step + 1):
            self.pab.store[key] = out
        else:
            self.pab.store.pop(key, None)
        return out

    def self_attention(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self._serve("self", compute)

    def cross_attention(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self._serve("cross", compute)
