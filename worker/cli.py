"""``smartdiff worker`` (one process per GPU, model preloaded) and ``smartdiff worker-health``."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time

from smartdiff.cli import python_module_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="profile to serve (configs/profiles/NAME.yaml)")
    parser.add_argument(
        "--gpus",
        default="auto",
        help="auto: claim a free GPU of this host through a Redis lease; 0,1: one worker process per "
        "listed GPU; none: a CPU worker (default: auto)",
    )
    parser.add_argument("--loglevel", default="INFO")


def parse_gpus(value: str) -> list[int] | str:
    if value in ("auto", "none"):
        return value
    try:
        gpus = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --gpus must be auto, none or a list like 0,1 (got {value!r})") from None
    if not gpus or len(set(gpus)) != len(gpus):
        raise SystemExit(f"error: --gpus lists no GPU or one twice: {value!r}")
    return gpus


def run(args: argparse.Namespace) -> int:
    from smartdiff.pipeline.config import load_profile

    gpus = parse_gpus(args.gpus)
    world = load_profile(args.profile).parallel.world_size
    if world > 1:  # one job over several processes: a worker group (worker/group.py)
        from smartdiff.worker.group import launch

        return launch(args.profile, world, gpus, args.loglevel)
    if isinstance(gpus, list) and len(gpus) > 1:
        return supervise(args.profile, gpus, args.loglevel)
    return serve(args.profile, gpus, args.loglevel)


def supervise(profile: str, gpus: list[int], loglevel: str) -> int:
    """One child process per GPU; restarted if it dies, stopped with the signal we receive."""
    command = python_module_command("smartdiff", "worker", "--profile", profile, "--loglevel", loglevel)
    children = {gpu: subprocess.Popen([*command, "--gpus", str(gpu)]) for gpu in gpus}
    stopping = {"signal": 0}

    def forward(signum, _frame):
        stopping["signal"] = signum
        for child in children.values():
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        for gpu, child in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            if stopping["signal"]:
                children.pop(gpu)
            else:
                print(f"worker on GPU {gpu} exited with {code}; restarting in 5 s", file=sys.stderr)
                time.sleep(5)
                children[gpu] = subprocess.Popen([*command, "--gpus", str(gpu)])
        if not children:
            return 0
        time.sleep(0.5)


def claim_gpu(registry, wanted: list[int] | str, worker_id: str):
    """The GPU this process runs on, leased in Redis by UUID so no two workers share one."""
    import torch

    from smartdiff.worker.service import Gpu

    count = torch.cuda.device_count()
    if count == 0:
        raise SystemExit("error: no GPU is visible to this process; use --gpus none for a CPU worker")
    candidates = range(count) if wanted == "auto" else wanted
    for index in candidates:
        if index >= count:
            raise SystemExit(f"error: GPU {index} does not exist here ({count} visible)")
        props = torch.cuda.get_device_properties(index)
        gpu = Gpu(index, str(props.uuid), props.name)
        if registry.claim_gpu(gpu.uuid, worker_id):
            return gpu
        if wanted != "auto":
            raise SystemExit(f"error: GPU {index} ({gpu.uuid}) is leased by another worker")
    raise SystemExit(f"error: all {count} GPUs of this host are leased by other workers")


def serve(profile_name: str, gpus: list[int] | str, loglevel: str) -> int:
    import redis

    from smartdiff.farm.logs import setup_logging
    from smartdiff.farm.settings import FarmSettings
    from smartdiff.farm.workers import WorkerRegistry
    from smartdiff.pipeline.config import load_profile
    from smartdiff.worker.service import WorkerService, worker_identity

    settings = FarmSettings.from_env()
    profile = load_profile(profile_name)
    setup_logging(worker_identity(), loglevel)
    gpu = None
    device = "cpu"
    if gpus != "none":
        registry = WorkerRegistry(
            redis.Redis.from_url(settings.redis_url, decode_responses=True), settings.worker_ttl_seconds
        )
        gpu = claim_gpu(registry, gpus, worker_identity())
        device = f"cuda:{gpu.index}"
    service = WorkerService(settings, profile, worker_app(settings), device=device, gpu=gpu)
    return run_service(service, loglevel)


def worker_app(settings):
    """The Celery app of a worker: our transport and our consumer (both record refused messages)."""
    from smartdiff.farm.celery_app import make_celery

    app = make_celery(settings)
    app.conf.broker_transport = "smartdiff.worker.transport:Transport"
    app.conf.worker_consumer = "smartdiff.worker.consumer:Consumer"
    return app


def run_service(service, loglevel: str) -> int:
    """Load the model, start heartbeats and the reaper, then consume the profile's queue until stopped."""
    from celery.signals import task_revoked, worker_shutting_down
    from celery.worker import state as worker_state

    from smartdiff.worker import metrics
    from smartdiff.worker.consumer import record_refusals
    from smartdiff.worker.tasks import register

    settings, app = service.settings, service.app
    service.video_store.check_bucket()  # a missing bucket or bad credentials fail here, not per job
    service.load()
    metrics.serve(settings.metrics_port)
    service.start_background()
    register(app, service)
    record_refusals(service.record_rejected)
    # `celery control revoke ID`: every worker keeps the id; a queued message is discarded when it
    # arrives (task_revoked), a running job stops at its next step (is_revoked).
    service.is_revoked = lambda job_id: job_id in worker_state.revoked
    task_revoked.connect(lambda request=None, **_: service.revoked(request.id), weak=False)

    def on_shutdown(sig=None, how=None, **_):
        if settings.shutdown == "requeue":
            service.hand_back_requested.set()

    worker_shutting_down.connect(on_shutdown, weak=False)
    # One job at a time in a thread of its own, so the worker answers Celery's remote control
    # (inspect, ping, revoke) and sends heartbeats and events while a job runs.
    worker = app.Worker(
        hostname=f"{service.worker_id}@{socket.gethostname()}",
        queues=[service.profile.name],
        pool="threads",
        concurrency=1,
        prefetch_multiplier=1,
        loglevel=loglevel,
        quiet=True,
    )
    try:
        worker.start()
    finally:
        service.stop()
    return worker.exitcode or 0
