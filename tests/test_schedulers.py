"""pipeline.schedulers against the official Wan schedule and diffusers' reference schedulers (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from smartdiff.pipeline.schedulers import SIGMA_MAX, SOLVERS, make_scheduler, shifted_sigmas

# diffusers' DPM++ builds an unused VP table with np.array(tensor), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (1, 16, 2, 6, 8)  # a tiny video latent: batch, channels, frames, height, width
# Largest |ours - diffusers| over a run, relative to the largest |value|; observed <= 8e-7 (float32
# coefficients in diffusers vs float64 here). A wrong coefficient or a skipped corrector gives >1e-3.
REL_TOL = 2e-6


def official_timesteps(steps: int, shift: float) -> np.ndarray:
    """Wan's FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift), written out.

    sigma_max is the first entry of its float32 table 1 - linspace(1, 1/1000, 1000)[::-1], i.e. 0.999
    read back from float32; sigma_min is 0.
    """
    sigma_max = float(np.float32(1 - np.linspace(1, 1 / 1000, 1000)[::-1][0]))
    sigmas = np.linspace(sigma_max, 0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * 1000).astype(np.int64)


def official_sampling_sigmas(steps: int, shift: float) -> np.ndarray:
    """The official Wan ``get_sampling_sigmas(steps, shift)``, which its ``dpm++`` path feeds to
    ``FlowDPMSolverMultistepScheduler`` (built with shift 1, so it shifts nothing again)."""
    sigma = np.linspace(1, 0, steps + 1)[:steps]
    return shift * sigma / (1 + (shift - 1) * sigma)


def velocity_field(seed: int):
    """A fixed, nonlinear stand-in for the DiT: v = tanh(x) * a / 2 + c with random a, c."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(SHAPE, generator=g)
    c = torch.randn(SHAPE, generator=g)
    return lambda x: 0.5 * torch.tanh(x) * a + c


def initial_noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run(scheduler, field, x: torch.Tensor) -> list[torch.Tensor]:
    trajectory = []
    for _ in scheduler.timesteps:
        x = scheduler.step(field(x), x)
        trajectory.append(x)
    return trajectory


def max_rel_diff_along(ours, reference, reference_timesteps) -> float:
    """Steps both schedulers, each on its own trajectory, and returns the worst relative difference."""
    field = velocity_field(0)
    xa = xb = initial_noise()
    worst = 0.0
    assert len(ours.timesteps) == len(reference_timesteps)
    for t in reference_timesteps:
        xa = ours.step(field(xa), xa)
        xb = reference.step(field(xb), t, xb).prev_sample
        worst = max(worst, ((xa - xb).abs().max() / xb.abs().max()).item())
    return worst


# --- schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["unipc", "euler"])
@pytest.mark.parametrize(("steps", "shift", "first", "last"), [(50, 5.0, 999, 92), (40, 12.0, 999, 235)])
def test_timesteps_match_official_formula(solver, steps, shift, first, last):
    scheduler = make_scheduler(solver, steps, shift)
    expected = official_timesteps(steps, shift)
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.timesteps.tolist() == expected.tolist()
    assert (scheduler.timesteps[0].item(), scheduler.timesteps[-1].item()) == (first, last)
    # The plain-float 0.999 formula agrees at these (Wan) shifts.
    plain = np.linspace(0.999, 0, steps + 1)[:-1]
    plain = shift * plain / (1 + (shift - 1) * plain)
    assert (plain * 1000).astype(np.int64).tolist() == expected.tolist()


@pytest.mark.parametrize(("steps", "shift"), [(4, 5.0), (50, 5.0), (40, 12.0), (3, 1.0), (1, 5.0)])
def test_dpmpp_runs_the_official_sampling_sigmas(steps, shift):
    scheduler = make_scheduler("dpm++", steps, shift)
    official = official_sampling_sigmas(steps, shift)
    # The official scheduler stores float32 sigmas with a final 0 and truncates sigma * 1000 from float64.
    assert torch.equal(scheduler.sigmas, torch.from_numpy(np.append(official, 0.0).astype(np.float32)))
    assert scheduler.timesteps.tolist() == (official * 1000).astype(np.int64).tolist()
    assert scheduler.timesteps[0].item() == 1000 and scheduler.sigmas[0].item() == 1.0


def test_shift_one_follows_official_float32_sigma_max():
    # 0.999 * 2/3 * 1000 is 665.999... in float64 but 666.000... from float32's 0.99900001.
    assert official_timesteps(3, 1.0).tolist() == [999, 666, 333]
    assert make_scheduler("unipc", 3, 1.0).timesteps.tolist() == [999, 666, 333]


def test_wan22_boundary_split_at_40_steps_shift_12():
    timesteps = make_scheduler("unipc", 40, 12.0).timesteps
    assert int((timesteps >= 875).sum()) == 26
    assert int((timesteps < 875).sum()) == 14


MULTISTEP = ("unipc", "dpm++", "euler")  # the solvers of the official schedule


@pytest.mark.parametrize("solver", MULTISTEP)
def test_sigmas_shape_and_values(solver):
    scheduler = make_scheduler(solver, 50, 5.0)
    sigmas = scheduler.sigmas
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    sigma_max = 1.0 if solver == "dpm++" else SIGMA_MAX
    assert torch.equal(sigmas, shifted_sigmas(50, 5.0, sigma_max).to(torch.float32))
    expected_first = 5 * sigma_max / (1 + 4 * sigma_max)
    assert sigmas[0].item() == pytest.approx(expected_first, rel=1e-7)


# --- solvers against diffusers ------------------------------------------------------------------

CASES = [(1, 5.0), (2, 5.0), (3, 5.0), (10, 5.0), (50, 5.0), (10, 12.0), (40, 12.0)]


@pytest.mark.parametrize(("steps", "shift"), CASES)
def test_unipc_matches_diffusers(steps, shift):
    reference = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
    )
    # diffusers' own flow default is linspace(1, 1/1000); hand it the official unshifted sigmas instead
    # (it applies flow_shift to them), which makes it Wan's FlowUniPCMultistepScheduler.
    reference.set_timesteps(sigmas=np.linspace(SIGMA_MAX, 0, steps + 1)[:-1])
    reference.set_begin_index(0)
    ours = make_scheduler("unipc", steps, shift)
    assert torch.equal(reference.timesteps, ours.timesteps)
    assert torch.equal(reference.sigmas, ours.sigmas)
    assert max_rel_diff_along(ours, reference, reference.timesteps) < REL_TOL


@pytest.mark.parametrize(("steps", "shift"), CASES)
def test_dpmpp_matches_diffusers(steps, shift):
    reference = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    # diffusers' DPM++ steps as Wan's FlowDPMSolverMultistepScheduler does; hand it the official
    # dpm++ schedule (get_sampling_sigmas, from sigma 1), as the official code hands its own.
    reference.set_timesteps(steps)
    official = official_sampling_sigmas(steps, shift)
    reference.sigmas = torch.from_numpy(np.append(official, 0.0).astype(np.float32))
    reference.timesteps = torch.from_numpy((official * 1000).astype(np.int64))
    reference.set_begin_index(0)
    ours = make_scheduler("dpm++", steps, shift)
    assert torch.equal(reference.timesteps, ours.timesteps)
    assert torch.equal(reference.sigmas, ours.sigmas)
    assert max_rel_diff_along(ours, reference, reference.timesteps) < REL_TOL


@pytest.mark.parametrize(("steps", "shift"), CASES)
def test_euler_matches_diffusers_and_hand_loop(steps, shift):
    ours = make_scheduler("euler", steps, shift)
    # shift=1 leaves our (already shifted) sigmas untouched; diffusers appends the final 0 itself.
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    reference.set_timesteps(sigmas=ours.sigmas[:-1].tolist())
    reference.set_begin_index(0)
    assert torch.equal(reference.sigmas, ours.sigmas)
    assert max_rel_diff_along(ours, reference, reference.timesteps) == 0.0

    field = velocity_field(0)
    x = initial_noise()
    sigmas = ours.sigmas.tolist()
    for i, got in enumerate(run(make_scheduler("euler", steps, shift), field, x)):
        x = x + (sigmas[i + 1] - sigmas[i]) * field(x)
        assert torch.equal(got, x)


@pytest.mark.parametrize("solver", [*MULTISTEP, "distill-ode"])  # distill leaves the path: fresh noise
@pytest.mark.parametrize(("steps", "shift"), [(1, 5.0), (2, 5.0), (10, 5.0), (40, 12.0)])
def test_straight_path_is_followed_exactly(solver, steps, shift):
    # With the true velocity of one noise/data pair, x0 = x - sigma * v is exact at every step, so each
    # solver must stay on x_t = (1 - sigma) * x0 + sigma * noise and end on x0 (checks the convention).
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    data = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    scheduler = make_scheduler(solver, steps, shift)
    sigmas = scheduler.sigmas.tolist()
    x = (1 - sigmas[0]) * data + sigmas[0] * noise
    for i in range(steps):
        x = scheduler.step(noise - data, x)
        on_path = (1 - sigmas[i + 1]) * data + sigmas[i + 1] * noise
        torch.testing.assert_close(x, on_path, rtol=0, atol=2e-5)
    torch.testing.assert_close(x, data, rtol=0, atol=2e-5)


# --- state, dtypes, errors ----------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_deterministic_and_fresh_per_run(solver):
    field = velocity_field(5)
    x = initial_noise(6)
    first = run(make_scheduler(solver, 12, 5.0), field, x)
    second = run(make_scheduler(solver, 12, 5.0), field, x)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))

    used = make_scheduler(solver, 12, 5.0)
    run(used, velocity_field(7), initial_noise(8))  # a different run first
    with pytest.raises(RuntimeError, match="steps are done"):
        used.step(field(x), x)
    again = run(make_scheduler(solver, 12, 5.0), field, x)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("solver", SOLVERS)
def test_inputs_untouched_and_dtype_kept(solver):
    field = velocity_field(0)
    scheduler = make_scheduler(solver, 4, 5.0)
    x = initial_noise()
    for _ in range(4):
        x_before = x.clone()
        v = field(x)
        v_before = v.clone()
        out = scheduler.step(v, x)
        assert torch.equal(x, x_before) and torch.equal(v, v_before)
        assert out.dtype == torch.float32
        x.mul_(0)  # a caller reusing its buffer must not disturb the scheduler's history
        x = out

    bf16 = make_scheduler(solver, 4, 5.0)
    y = initial_noise().to(torch.bfloat16)
    out = bf16.step(field(y.float()).to(torch.bfloat16), y)
    assert out.dtype == torch.bfloat16


def test_buffer_reuse_does_not_change_unipc():
    # UniPC keeps the step-0 sample for its corrector; zeroing the caller's tensor must not matter.
    field = velocity_field(0)
    expected = run(make_scheduler("unipc", 6, 5.0), field, initial_noise())
    scheduler = make_scheduler("unipc", 6, 5.0)
    x = initial_noise()
    got = []
    for _ in range(6):
        out = scheduler.step(field(x), x)
        x.zero_()
        got.append(out)
        x = out.clone()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


# --- the distill solvers -------------------------------------------------------------------------


def test_distill_schedule_is_lightx2vs_four_step_table():
    # Timestep t is entry 1000 - t of the shifted linspace(1, 0, 1001)[:-1]: sigma = 5s / (1 + 4s),
    # s = t / 1000, so 750 -> 3.75 / 4 = 0.9375, 500 -> 2.5 / 3, 250 -> 1.25 / 2.
    scheduler = make_scheduler("distill", 4, 5.0)
    expected = [1.0, 0.9375, 2.5 / 3, 0.625, 0.0]
    torch.testing.assert_close(scheduler.sigmas, torch.tensor(expected), rtol=0, atol=1e-7)
    assert scheduler.timesteps.dtype == torch.float32  # sigma * 1000, unrounded, as LightX2V feeds it
    torch.testing.assert_close(scheduler.timesteps, torch.tensor(expected[:-1]) * 1000, rtol=1e-7, atol=0)
    listed = make_scheduler("distill-ode", 3, 1.0, timesteps=[1000, 600, 100])
    torch.testing.assert_close(listed.sigmas, torch.tensor([1.0, 0.6, 0.1, 0.0]), rtol=0, atol=1e-7)


def test_distill_ode_two_steps_by_hand():
    # Timesteps [1000, 500] at shift 1: sigmas 1, 0.5, 0. Step 0: x0 = x - v, then
    # 0.5 * x0 + 0.5 * (x0 + v) = x0 + 0.5 v. Step 1: x0 = x1 - 0.5 v1, the result.
    field = velocity_field(2)
    x = initial_noise(3)
    scheduler = make_scheduler("distill-ode", 2, 1.0, timesteps=[1000, 500])
    v0 = field(x)
    x1 = scheduler.step(v0, x)
    torch.testing.assert_close(x1, (x - v0) + 0.5 * v0, rtol=0, atol=1e-6)
    v1 = field(x1)
    torch.testing.assert_close(scheduler.step(v1, x1), x1 - 0.5 * v1, rtol=0, atol=1e-6)


def test_distill_renoises_with_fresh_noise_from_the_seed():
    # Same two steps; step 0 is 0.5 * x0 + 0.5 * n with n fresh standard noise (not the initial
    # noise, not the predicted one), the same for the same seed and another for another seed.
    x = torch.randn(1, 16, 8, 32, 32, generator=torch.Generator().manual_seed(4))

    def big_field(y: torch.Tensor) -> torch.Tensor:  # a linear stand-in, at a shape big enough for statistics
        return 0.3 * y + 0.1

    fresh = []
    for seed in (7, 7, 8):
        scheduler = make_scheduler("distill", 2, 1.0, seed=seed, timesteps=[1000, 500])
        v0 = big_field(x)
        x1 = scheduler.step(v0, x)
        fresh.append((x1 - 0.5 * (x - v0)) / 0.5)
        v1 = big_field(x1)
        torch.testing.assert_close(scheduler.step(v1, x1), x1 - 0.5 * v1, rtol=0, atol=1e-6)
    noise = fresh[0]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1.0) < 0.02
    assert torch.equal(fresh[0], fresh[1]) and not torch.allclose(fresh[0], fresh[2])
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), x.flatten()]))[0, 1].item()) < 0.02


@pytest.mark.parametrize(
    ("solver", "steps", "timesteps", "message"),
    [
        ("distill", 2, [500, 1000], "decrease strictly"),
        ("distill", 2, [1000, 0], "within 1..1000"),
        ("distill", 3, [1000, 500], "2 timesteps"),
        ("unipc", 2, [1000, 500], "for the distill solvers"),
    ],
)
def test_bad_distill_timesteps_rejected(solver, steps, timesteps, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(solver, steps, 5.0, timesteps=timesteps)


def test_unknown_solver_names_the_known_ones():
    with pytest.raises(ValueError) as excinfo:
        make_scheduler("ddim", 50, 5.0)
    message = str(excinfo.value)
    assert "ddim" in message
    assert all(name in message for name in SOLVERS)


@pytest.mark.parametrize(
    ("steps", "shift"), [(0, 5.0), (-3, 5.0), (2.0, 5.0), (True, 5.0), (10, 0.0), (10, -1.0)]
)
def test_bad_steps_or_shift_rejected(steps, shift):
    with pytest.raises(ValueError):
        make_scheduler("unipc", steps, shift)


def test_shape_mismatch_rejected():
    scheduler = make_scheduler("euler", 4, 5.0)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(torch.zeros(1, 2), torch.zeros(1, 3))
