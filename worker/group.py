"""A worker group: one job over several processes (pipeline/parallel.py), one per GPU or CPU rank.

``smartdiff worker`` starts a group when the profile's ``parallel`` world size is above 1:

- the launcher (``launch``) starts ``python -P -m smartdiff.worker.group`` once per rank with a
  fresh rendezvous port; each process initialises torch.distributed (NCCL on GPUs, gloo with
  ``--gpus none``), loads the model and builds the parallel layout;
- rank 0 is an ordinary farm worker (``WorkerService`` under Celery: claim, lease, progress, cancel,
  decode, upload) whose pipeline call is ``Leader.generate``: after its text encode it broadcasts
  the job (validated parameters, initial noise, text states) and every rank denoises with its
  pipeline's ``ParallelGuidance``; rank 0 alone decodes and uploads while the others wait for the
  next job;
- after every denoising step rank 0 broadcasts a stop flag (cancelled, lease lost, handed back on
  shutdown), so all ranks leave the loop at the same step and none is left in a collective;
- shutdown: when rank 0's Celery worker stops, rank 0 broadcasts ``None`` instead of a job.

Failures: every collective of a job has a timeout (``COLLECTIVE_TIMEOUT``). A rank whose collective
or computation fails (a partner died or hung) exits at once without touching the job's record: the
job's lease runs out and a reaper requeues it (the farm's crash rule: a new attempt, at most
max_attempts, never finished twice). The launcher, seeing any rank exit, kills the rest of the
group and starts a new one; the new rank 0 is a new worker (its own pid in its worker id).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from smartdiff.cli import python_module_command

if TYPE_CHECKING:  # the launcher process stays free of torch
    import torch
    import torch.distributed as dist

    from smartdiff.farm.settings import FarmSettings
    from smartdiff.pipeline.config import ProfileConfig
    from smartdiff.pipeline.params import GenerationParams
    from smartdiff.pipeline.wan import GenerationResult, ProgressFn, WanPipeline

log = logging.getLogger(__name__)

# Bounds each collective of a job (denoise, stop flags): a partner that died or hangs fails it.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
# Ranks > 0 wait for the next job on the control group for as long as the farm is idle; a rank that
# dies meanwhile is noticed by the launcher, not by this wait.
IDLE_TIMEOUT = timedelta(days=365)
RESTART_DELAY_SECONDS = 2.0
STOP_GRACE_SECONDS = 30.0  # after rank 0 stopped, the time the other ranks get to follow
EXIT_GROUP_BROKEN = 3
PR_SET_PDEATHSIG = 1  # linux/prctl.h


# ---------------------------------------------------------------------------------------------
# The launcher


def launch(profile: str, world: int, gpus: list[int] | str, loglevel: str) -> int:
    """Run a group of ``world`` ranks until SIGTERM or SIGINT, restarting the whole group whenever a
    rank exits. The signal goes to rank 0 alone: it drains or hands back its job as a single worker
    does, then releases the other ranks."""
    if gpus == "auto" or (isinstance(gpus, list) and len(gpus) != world):
        raise SystemExit(
            f"error: profile {profile!r} runs one job on {world} processes: give --gpus none (CPU, gloo) "
            f"or {world} GPUs, one per rank (e.g. --gpus {','.join(map(str, range(world)))})"
        )
    devices = "none" if gpus == "none" else ",".join(map(str, gpus))
    ranks: list[subprocess.Popen] = []
    stopping = {"signal": 0}

    def forward(signum, _frame):
        stopping["signal"] = signum
        if ranks:
            ranks[0].send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        port = _free_port()
        command = python_module_command("smartdiff.worker.group", "--profile", profile, "--world", str(world))
        command += ["--port", str(port), "--gpus", devices, "--loglevel", loglevel]
        ranks[:] = [
            subprocess.Popen([*command, "--rank", str(rank)], preexec_fn=_die_with_parent)
            for rank in range(world)
        ]
        print(f"worker group started: pids {[r.pid for r in ranks]} (rank order)", file=sys.stderr)
        _watch(ranks, stopping)
        if stopping["signal"]:
            return ranks[0].returncode or 0
        codes = {rank: process.returncode for rank, process in enumerate(ranks)}
        print(f"the group ended (exit codes by rank: {codes}); restarting it", file=sys.stderr)
        time.sleep(RESTART_DELAY_SECONDS)  # a rank failing at start-up must not spin the launcher


def _watch(ranks: list[subprocess.Popen], stopping: dict) -> None:
    """Wait until a rank exits; then end the others (killed, or given time when stopping)."""
    while all(process.poll() is None for process in ranks):
        time.sleep(0.2)
    deadline = time.monotonic() + (STOP_GRACE_SECONDS if stopping["signal"] else 0)
    for process in ranks:
        if process.poll() is None:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()  # a broken group cannot run a job: no rank of it is worth waiting for
                process.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In each rank before it starts: the kernel kills it if the launcher dies (Linux
    PR_SET_PDEATHSIG), so no rank outlives its launcher."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


# ---------------------------------------------------------------------------------------------
# One rank


class Stopped(Exception):
    """Rank 0 stopped the job at a step; ``reason`` is its exception (None on the other ranks)."""

    def __init__(self, reason: BaseException | None):
        super().__init__(str(reason))
        self.reason = reason


@dataclass
class Job:
    """What rank 0 broadcasts: everything every rank needs to run the same denoise."""

    params: GenerationParams
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor


class Group:
    """This rank's model and process groups."""

    def __init__(self, rank: int, pipeline: WanPipeline, control: dist.ProcessGroup):
        self.rank = rank
        self.pipeline = pipeline  # built with velocity_model=ParallelGuidance(layout)
        self.control = control  # gloo, long timeout: job announcements

    def announce(self, job: Job | None) -> Job | None:
        """Rank 0 sends the next job (None: shut down); every rank returns it."""
        import torch.distributed as dist

        box = [job]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def agree_to_stop(self, stop: bool) -> bool:
        """Rank 0's decision after a step, the same on every rank (the others' ``stop`` is ignored)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(stop)], device=self.pipeline.device)
        dist.broadcast(flag, src=0)  # the default group: COLLECTIVE_TIMEOUT
        return bool(flag.item())

    def denoise(self, job: Job, progress: ProgressFn, result: GenerationResult | None = None) -> torch.Tensor:
        device = self.pipeline.device
        latents, cond, uncond = (t.to(device) for t in (job.latents, job.cond, job.uncond))
        return self.pipeline.denoise(latents, cond, uncond, job.params, progress, result)


class Leader:
    """Rank 0's ``WorkerService.run_pipeline``: ``WanPipeline.generate`` with the denoise on the group."""

    def __init__(self, group: Group):
        self.group = group

    def generate(self, params: GenerationParams, progress: ProgressFn) -> GenerationResult:
        return self.group.pipeline.generate(params, progress, denoise=self.denoise)

    def denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        result: GenerationResult | None = None,
    ) -> torch.Tensor:
        """``WanPipeline.denoise`` on every rank of the group: announce the job, then run it."""
        try:
            self.group.announce(Job(params, latents.cpu(), cond.cpu(), uncond.cpu()))
            return self.group.denoise(Job(params, latents, cond, uncond), self._on_step(progress), result)
        except Stopped as stop:
            raise stop.reason from None  # the service records it as a single worker would
        except Exception:
            # The other ranks' state is unknown: leave the job to its lease and restart the group.
            log.exception("the group failed during the denoise; exiting so the launcher restarts it")
            logging.shutdown()
            os._exit(EXIT_GROUP_BROKEN)

    def _on_step(self, progress: ProgressFn | None) -> ProgressFn:
        def on_step(stage: str, step: int, total: int) -> None:
            try:
                if progress is not None:
                    progress(stage, step, total)
            except Exception as reason:
                self.group.agree_to_stop(True)  # the other ranks leave the loop at this same step
                raise Stopped(reason) from reason
            self.group.agree_to_stop(False)

        return on_step


def follow(group: Group) -> None:
    """Ranks > 0: run each job rank 0 announces, until it announces None."""

    def on_step(stage: str, step: int, total: int) -> None:
        if group.agree_to_stop(False):
            raise Stopped(None)

    while (job := group.announce(None)) is not None:
        try:
            group.denoise(job, on_step)
        except Stopped:
            log.info("rank 0 stopped the job")


def join_group(profile: ProfileConfig, rank: int, world: int, port: int, device: str) -> Group:
    """Initialise torch.distributed, load the model and build the layout (every rank, same order)."""
    import torch
    import torch.distributed as dist

    from smartdiff.pipeline.parallel import ParallelGuidance, build_layout
    from smartdiff.pipeline.wan import WanPipeline

    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo" if device == "cpu" else "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    layout = build_layout(profile.parallel, profile.model_config, timeout=COLLECTIVE_TIMEOUT)
    pipeline = WanPipeline.from_profile(profile, device, velocity_model=ParallelGuidance(layout))
    log.info("rank %d of %d ready on %s", rank, world, device)
    return Group(rank, pipeline, control)


def lead(
    group: Group, settings: FarmSettings, profile: ProfileConfig, gpus: list[int] | str, loglevel: str
) -> int:
    """Rank 0: a farm worker whose jobs run on the group; releases the other ranks when it stops."""
    import redis

    from smartdiff.farm.workers import WorkerRegistry
    from smartdiff.worker.cli import claim_gpu, run_service, worker_app
    from smartdiff.worker.service import WorkerService, worker_identity

    gpu = None
    if gpus != "none":  # rank 0 leases its own GPU, as a single worker does
        registry = WorkerRegistry(
            redis.Redis.from_url(settings.redis_url, decode_responses=True), settings.worker_ttl_seconds
        )
        gpu = claim_gpu(registry, gpus[:1], worker_identity())
    service = WorkerService(
        settings,
        profile,
        worker_app(settings),
        device=str(group.pipeline.device),
        gpu=gpu,
        pipeline=group.pipeline,
        run_pipeline=Leader(group).generate,
    )
    try:
        return run_service(service, loglevel)
    finally:
        group.announce(None)


def main(argv: list[str] | None = None) -> int:
    from smartdiff.farm.logs import setup_logging
    from smartdiff.farm.settings import FarmSettings
    from smartdiff.pipeline.config import load_profile
    from smartdiff.worker.cli import parse_gpus
    from smartdiff.worker.service import worker_identity

    parser = argparse.ArgumentParser(
        prog="python -P -m smartdiff.worker.group", description="one rank of a worker group"
    )
    parser.add_argument("--profile", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gpus", required=True, help="none, or one GPU per rank: 0,1")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    gpus = parse_gpus(args.gpus)
    device = "cpu" if gpus == "none" else f"cuda:{gpus[args.rank]}"
    name = worker_identity() if args.rank == 0 else f"{worker_identity()}-rank{args.rank}"
    setup_logging(name, args.loglevel)
    if args.rank > 0:
        # The launcher stops ranks > 0 through rank 0 (the None job), or kills them.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    profile = load_profile(args.profile)
    settings = FarmSettings.from_env()
    try:
        group = join_group(profile, args.rank, args.world, args.port, device)
        if args.rank == 0:
            return lead(group, settings, profile, gpus, args.loglevel)
        follow(group)
        return 0
    except Exception:
        log.exception("rank %d failed; exiting so the launcher restarts the group", args.rank)
        return EXIT_GROUP_BROKEN


if __name__ == "__main__":
    sys.exit(main())
