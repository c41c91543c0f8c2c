"""Flow-matching samplers for Wan: UniPC (the default), DPM++ 2M, Euler, and the few-step samplers of
step-distilled models.

Schedules, as the official code has them: UniPC and Euler run the shifted ``linspace(0.999, 0)``
(``FlowUniPCMultistepScheduler``'s; the official code has no Euler), DPM++ the shifted
``linspace(1, 0)`` (``get_sampling_sigmas``). Timesteps are the sigmas times 1000, truncated.

Wan's DiT predicts the flow velocity ``v = noise - x0`` of the straight path
``x_t = (1 - sigma) * x0 + sigma * noise``, so every solver starts from ``x0 = x_t - sigma * v``.
The multistep solvers work in log-SNR time ``lambda = log((1 - sigma) / sigma)``.

A scheduler is made fresh for every request and stepped once per entry of ``timesteps``::

    scheduler = make_scheduler("unipc", steps=50, shift=5.0)
    for t in scheduler.timesteps:
        latents = scheduler.step(dit(latents, t), latents)

Only what Wan uses is implemented (order 2, data prediction, final sigma 0). The numbers follow the
official Wan schedulers and diffusers' equivalents; tests/test_schedulers.py checks them step by step.

Step-distilled models (LightX2V's 4-step Wan LoRAs and models, our own students) are sampled on an
explicit list of training timesteps, LightX2V's ``[1000, 750, 500, 250]`` for 4 steps. Timestep
``t`` of the list has the sigma of entry ``1000 - t`` of the shifted 1000-entry training table (in
float32, as LightX2V builds it), ``sigma = shift * s / (1 + (shift - 1) * s)`` with ``s = t / 1000``,
and the DiT receives ``sigma * 1000`` unrounded (937.5 for t = 750 at shift 5). Each step predicts
``x0 = x - sigma * v`` and moves to the next listed sigma ``s'`` as ``(1 - s') * x0 + s' * noise``:

- ``distill``: ``noise`` is fresh Gaussian noise (LightX2V's Wan2.1 step-distill rule, the way
  DMD-style students are trained to be sampled), drawn on the CPU from a generator seeded from the
  request's seed, so a seed gives the same video everywhere;
- ``distill-ode``: ``noise`` is the one the model predicts, ``x0 + v``, which makes the step
  ``x + (s' - sigma) * v``: Euler on the listed sigmas (LightX2V's Wan2.2 step-distill rule).

After the last listed timestep the sample is ``x0``.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from smartdiff.pipeline.config import check_timesteps
from smartdiff.pipeline.params import DISTILL_SOLVERS, SOLVERS, distill_timesteps

NUM_TRAIN_TIMESTEPS = 1000
# 1 - 1/1000 as the official schedulers see it: they read sigma_max back from their float32 training
# table (0.9990000128746033). With the plain float 0.999, sigma * 1000 lands just below an integer for
# a few shift-1 schedules and truncates one lower (3 steps: 665 instead of the official 666).
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


class FlowScheduler(Protocol):
    steps: int
    sigmas: torch.Tensor  # float32, steps + 1 values on the CPU, decreasing, last one 0
    # What the DiT receives, ``steps`` values: int64 (truncated, as the official code does) for the
    # multistep solvers, float32 ``sigma * 1000`` for the distill ones (as LightX2V passes them).
    timesteps: torch.Tensor

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor: ...


def shifted_sigmas(steps: int, shift: float, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """The official Wan schedule in float64: ``steps + 1`` sigmas, the last one 0.

    ``linspace(sigma_max, 0, steps + 1)[:-1]`` shifted by ``shift * s / (1 + (shift - 1) * s)``, then 0.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    if not 0 < sigma_max <= 1:
        raise ValueError(f"sigma_max must be in (0, 1], got {sigma_max!r}")
    # numpy's linspace, as in the official code: torch.linspace rounds differently in the last bit,
    # which can flip the integer truncation of a timestep.
    sigmas = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.from_numpy(np.append(sigmas, 0.0))


def _log_snr(sigma: float) -> float:
    """``log((1 - sigma) / sigma)``. Sigma 1 (pure noise: DPM++'s first sigma) is -inf, and the updates
    take their exact limits there: ``expm1(-inf) = -1`` and a history weight ``1 / r0 = 0``. Callers
    never pass the final sigma 0 (+inf); that step has a closed form instead."""
    if sigma >= 1.0:
        return -math.inf
    return math.log((1.0 - sigma) / sigma)


class _FlowSolver(ABC):
    """Schedule, step counter and dtype handling shared by the solvers."""

    # The unshifted schedule starts here: UniPC's (and Euler's) official 0.999 unless a solver says.
    sigma_max = SIGMA_MAX

    def __init__(self, steps: int, shift: float) -> None:
        sigmas = shifted_sigmas(steps, shift, self.sigma_max)
        self.steps = steps
        self.shift = float(shift)
        # Truncated from the float64 sigmas, as the official code does; Wan2.2 compares these integers
        # with its expert boundary (875), so rounding instead would move the switch.
        self.timesteps = (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.int64)
        # The solvers run on the float32 schedule, as the official and diffusers schedulers store it.
        self.sigmas = sigmas.to(torch.float32)
        self._sig: list[float] = self.sigmas.tolist()  # Python floats: no device syncs while stepping
        self.step_index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The sample at the next sigma, given the (guided) velocity at the current one.

        Computes in float32 and returns the sample's dtype; the inputs are left unchanged.
        """
        i = self.step_index
        if i >= self.steps:
            raise RuntimeError(f"all {self.steps} steps are done; make a new scheduler for a new run")
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
        out = self._step(i, velocity.to(torch.float32), sample.to(torch.float32))
        self.step_index = i + 1
        return out.to(sample.dtype)

    @abstractmethod
    def _step(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The next sample from step ``i``'s velocity and sample, both float32."""


class EulerScheduler(_FlowSolver):
    """First-order flow Euler: ``x_next = x + (sigma_next - sigma) * v``."""

    def _step(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + (self._sig[i + 1] - self._sig[i]) * v


class DPMSolverPlusPlusScheduler(_FlowSolver):
    """Multistep DPM-Solver++(2M), midpoint variant, first order on the first and the last step.

    Schedule: the official Wan ``dpm++`` path's, ``get_sampling_sigmas(steps, shift)``: the shifted
    ``linspace(1, 0)``, whose first sigma is exactly 1 (timestep 1000). From pure noise the first
    update is ``x0`` mixed with the noise, and the second step's history weight is 0 (its log-SNR
    gap to sigma 1 is infinite), as in the official solver.
    """

    sigma_max = 1.0

    def __init__(self, steps: int, shift: float) -> None:
        super().__init__(steps, shift)
        self._prev_x0: torch.Tensor | None = None

    def _step(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s0, t = self._sig[i], self._sig[i + 1]
        x0 = x - s0 * v
        prev_x0, self._prev_x0 = self._prev_x0, x0
        if t == 0.0:
            # The first-order update's limit at sigma_next = 0 (lower_order_final): x0 itself.
            return x0
        h = _log_snr(t) - _log_snr(s0)
        phi = math.expm1(-h)  # e^{-h} - 1
        d = x0
        if prev_x0 is not None:
            r0 = (_log_snr(s0) - _log_snr(self._sig[i - 1])) / h
            d = x0 + (0.5 / r0) * (x0 - prev_x0)  # midpoint: x0 + D1 / 2 with D1 = (x0 - prev) / r0
        return (t / s0) * x - ((1.0 - t) * phi) * d


class UniPCScheduler(_FlowSolver):
    """UniPC-2 (bh2, data prediction) with the UniC corrector on every step, lower order on the last.

    Each step first corrects the incoming sample with UniC, using the x0 predicted from it (the
    corrector costs no model call), then predicts the next sample with UniP. Order 1 on the first
    step (no history) and on the last one; the corrector uses the previous predictor's order.
    """

    def __init__(self, steps: int, shift: float) -> None:
        super().__init__(steps, shift)
        self._x0s: list[torch.Tensor] = []  # the last two x0 predictions, newest last
        self._last_sample: torch.Tensor | None = None  # sample the last predictor started from
        self._last_order = 0

    def _step(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sig = self._sig
        # x0 comes from the sample as the model saw it, before the correction.
        x0 = x - sig[i] * v
        final = sig[i + 1] == 0.0
        if i == 0:
            x = x.clone()  # x may be the caller's tensor and is kept for the next step's corrector
        elif not final:
            # On the last step the predictor returns x0 exactly, so the corrected sample is unused.
            x = self._correct(i, x0)
        order = 1 if i == 0 or final else 2
        self._x0s = [*self._x0s[-1:], x0]
        self._last_sample, self._last_order = x, order
        if final:
            # UniP-1's limit at sigma_next = 0: sigma_t / sigma_s -> 0, alpha_t -> 1, e^{-h} -> 0.
            return x0
        return self._predict(i, x, order)

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        sig = self._sig
        s0, t = sig[i], sig[i + 1]
        m0 = self._x0s[-1]
        h = _log_snr(t) - _log_snr(s0)
        phi = math.expm1(-h)  # e^{-h} - 1; bh2 also uses it as B(h)
        out = (t / s0) * x - ((1.0 - t) * phi) * m0
        if order == 2:
            rk = (_log_snr(sig[i - 1]) - _log_snr(s0)) / h
            d1 = (self._x0s[-2] - m0) / rk
            out = out - ((1.0 - t) * phi * 0.5) * d1  # UniP-2's weight is fixed at 1/2
        return out

    def _correct(self, i: int, x0: torch.Tensor) -> torch.Tensor:
        """UniC: redo the last step from ``sigma[i-1]`` to ``sigma[i]`` including the new ``x0``."""
        sig = self._sig
        s0, t = sig[i - 1], sig[i]
        m0 = self._x0s[-1]  # x0 at sigma[i-1]
        h = _log_snr(t) - _log_snr(s0)
        hh = -h
        phi = math.expm1(hh)  # e^{-h} - 1 = B(h) for bh2
        base = (t / s0) * self._last_sample - ((1.0 - t) * phi) * m0
        if self._last_order == 1:
            correction = 0.5 * (x0 - m0)  # UniC-1's weight is fixed at 1/2
        else:
            rk = (_log_snr(sig[i - 2]) - _log_snr(s0)) / h
            d1 = (self._x0s[-2] - m0) / rk
            # Weights (rho_0, rho_1) solve [[1, 1], [rk, 1]] @ rho = (b1, b2), with b_k built from the
            # phi-functions: g1 = h*phi_2-type term, g2 the next one; written out for order 2.
            g1 = phi / hh - 1.0
            g2 = g1 / hh - 0.5
            b1 = g1 / phi
            b2 = 2.0 * g2 / phi
            rho0 = (b1 - b2) / (1.0 - rk)
            rho1 = b1 - rho0
            correction = rho0 * d1 + rho1 * (x0 - m0)
        return base - ((1.0 - t) * phi) * correction


def _renoise_seed(seed: int) -> int:
    """The seed of the distill solver's fresh noise: derived from the request's seed, so it is a
    stream of its own (not the initial noise again) and the same on every machine and rank."""
    digest = hashlib.sha256(f"smartdiff-distill-renoise:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DistillScheduler(_FlowSolver):
    """Few-step sampling of a step-distilled model on a list of training timesteps (module docstring)."""

    def __init__(self, timesteps: Sequence[int], shift: float, seed: int, fresh_noise: bool) -> None:
        check_timesteps(timesteps)
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        # LightX2V's table: linspace(1, 0, 1001)[:-1], shifted, in float32; entry 1000 - t is timestep t.
        table = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32)[:-1]
        table = shift * table / (1 + (shift - 1) * table)
        picked = table[[NUM_TRAIN_TIMESTEPS - t for t in timesteps]]
        self.steps = len(timesteps)
        self.shift = float(shift)
        self.timesteps = picked * NUM_TRAIN_TIMESTEPS
        self.sigmas = torch.cat([picked, torch.zeros(1)])
        self._sig = self.sigmas.tolist()
        self.step_index = 0
        self.fresh_noise = fresh_noise
        self._generator = torch.Generator("cpu").manual_seed(_renoise_seed(seed)) if fresh_noise else None

    def _step(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma, following = self._sig[i], self._sig[i + 1]
        x0 = x - sigma * v
        if following == 0.0:
            return x0
        if self._generator is None:
            noise = x0 + v  # the noise the model predicts: an Euler step on the listed sigmas
        else:
            noise = torch.randn(x.shape, generator=self._generator, dtype=torch.float32).to(x.device)
        return (1.0 - following) * x0 + following * noise


_SCHEDULERS: dict[str, type[_FlowSolver]] = {
    "unipc": UniPCScheduler,
    "dpm++": DPMSolverPlusPlusScheduler,
    "euler": EulerScheduler,
}


def make_scheduler(
    solver: str, steps: int, shift: float, seed: int = 0, timesteps: Sequence[int] | None = None
) -> FlowScheduler:
    """A fresh scheduler (one per request: it holds the step counter and past model outputs).

    The distill solvers run ``timesteps`` (default ``distill_timesteps(steps)``; its length must be
    ``steps``) and ``distill`` draws its fresh noise from ``seed``; the others take neither."""
    if solver in DISTILL_SOLVERS:
        listed = distill_timesteps(steps) if timesteps is None else tuple(timesteps)
        if len(listed) != steps:
            raise ValueError(f"{solver}: {len(listed)} timesteps {list(listed)} for {steps} steps")
        return DistillScheduler(listed, shift, seed, fresh_noise=solver == "distill")
    if timesteps is not None:
        raise ValueError(f"an explicit timestep list is for the distill solvers, not {solver!r}")
    cls = _SCHEDULERS.get(solver)
    if cls is None:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(SOLVERS)}")
    return cls(steps, shift)
