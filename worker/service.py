"""One worker process: a preloaded pipeline, one job at a time, leases, a reaper, records, upload.

Exactly-once effect on at-least-once delivery:
- a job runs only after an atomic claim of its record (a duplicate delivery finds it RUNNING with a
  live lease, or finished, and does nothing);
- the running worker refreshes the job's lease; if the worker dies, every other worker's reaper
  sees the lease run out, puts the job back to QUEUED and sends its message again, so the job
  restarts elsewhere within lease_seconds + reaper_seconds;
- a worker that lost its lease stops at its next step and can never write the final state;
- the object key is the job's own (videos/<job id>.mp4) and written once.

Celery's controls map onto the same records: ``revoke`` cancels (a queued job when a worker meets
its message, a running one at its next step), and a job whose message vanished from the queue
(``purge``) is marked PURGED by the reaper.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from smartdiff.farm.codes import ErrorCode, JobState
from smartdiff.farm.logs import current_job
from smartdiff.farm.records import JobStore, OwnershipLost, job_key, record_rejection
from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.storage import StorageError, VideoStore
from smartdiff.farm.wire import REQUEUE_PRIORITY, TASK_NAME, broker_client, drop_unacked, waiting_ids
from smartdiff.farm.workers import WorkerRegistry
from smartdiff.pipeline.config import ProfileConfig
from smartdiff.pipeline.params import ParamError, validate_params
from smartdiff.worker import metrics

log = logging.getLogger(__name__)


PURGE_SWEEP_REAPS = 6  # the reaper looks for purged messages every this many rounds
PARKED_RETRY_REAPS = 6  # parked videos are offered to the storage again every this many reaper rounds


class JobCancelled(Exception):
    """The job was cancelled (the exception's text says how: "cancelled" or "revoked")."""


class HandBack(Exception):
    """The worker is stopping in requeue mode: give the job back to the queue."""


class BadMessage(ValueError):
    """A message whose shape or parameters cannot be used; the job fails with this text."""


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str


def parse_message(args: Any, kwargs: Any, profile: ProfileConfig):
    """Check a task message (never trust the queue): returns validated GenerationParams."""
    if args:
        raise BadMessage(f"positional arguments are not accepted (got {len(args)})")
    if not isinstance(kwargs, dict):
        raise BadMessage("the message body must be a JSON object")
    unknown = sorted(set(kwargs) - {"profile", "params"})
    if unknown:
        raise BadMessage(f"unknown message fields: {', '.join(map(str, unknown))[:200]}")
    if kwargs.get("profile") != profile.name:
        raise BadMessage(
            f"message for profile {str(kwargs.get('profile'))[:100]!r} reached a {profile.name!r} worker"
        )
    if not isinstance(kwargs.get("params"), dict):
        raise BadMessage("params: missing, or not a JSON object")
    try:
        return validate_params(kwargs["params"], profile.model_config, profile)
    except ParamError as error:
        raise BadMessage(str(error)) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def worker_identity() -> str:
    """This process' worker id: host and pid, unique while it lives."""
    return f"{socket.gethostname()}-{os.getpid()}"


def memory_advice(level: int) -> str:
    higher = f"a profile with a higher low_mem_level (this one runs level {level})" if level < 4 else None
    return "try " + " or ".join(o for o in (higher, "a smaller size or fewer frames") if o)


def oom_advice(stage: str, params, level: int) -> str:
    return (
        f"the GPU ran out of memory during {stage} at {params.size}x{params.frames}; {memory_advice(level)}"
    )


class WouldNotFit(Exception):
    """A job whose estimated memory exceeds what the GPU has free: refused before it starts."""


class WorkerService:
    def __init__(
        self,
        settings: FarmSettings,
        profile: ProfileConfig,
        app: Celery,
        device: str = "cpu",
        gpu: Gpu | None = None,
        pipeline=None,
        video_store: VideoStore | None = None,
        run_pipeline: Callable[..., Any] | None = None,
    ):
        self.settings = settings
        self.profile = profile
        self.app = app
        self.device = device
        self.gpu = gpu
        self.pipeline = pipeline
        # run_pipeline(params, progress) -> GenerationResult; None: self.pipeline.generate. A worker
        # group's rank 0 passes its own, which spreads the denoise over the group (worker/group.py).
        self.run_pipeline = run_pipeline
        self.worker_id = worker_identity()
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.store = JobStore(client, settings.record_ttl_seconds)
        self.registry = WorkerRegistry(client, settings.worker_ttl_seconds)
        self.broker = broker_client(settings.broker_url)
        # Uploads retry on the settings' budget, so a storage restart costs no compute.
        self.video_store = video_store or VideoStore(
            settings, upload_budget_seconds=settings.upload_budget_seconds
        )
        self.parked_store = VideoStore(settings, attempts=1) if video_store is None else video_store
        self.current: str | None = None
        self.hand_back_requested = threading.Event()
        self.stopping = threading.Event()
        self.lease_lost = threading.Event()
        self.jobs_done = 0
        self.started_at = time.time()
        self.peak_bytes = 0  # the highest GPU memory any stage of any job reached
        self.is_revoked: Callable[[str], bool] = lambda job_id: False  # Celery's revoke, once serving
        self.purge_suspects: set[str] = set()  # queued jobs whose message was missing at the last sweep
        self.next_purge_sweep = 0.0  # monotonic seconds

    # --- life cycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model before the first job is taken, so no visibility clock runs during load."""
        if self.pipeline is None:
            from smartdiff.pipeline.wan import WanPipeline

            start = time.perf_counter()
            self.pipeline = WanPipeline.from_profile(self.profile, self.device)
            log.info(
                "model %s loaded on %s in %.1f s, attention %s",
                self.profile.model,
                self.device,
                time.perf_counter() - start,
                self.pipeline.attention.implementation,
            )
            if self.pipeline.device.type == "cuda":  # CPU workers have nothing to compile or tune
                seconds = self.pipeline.warm_up()
                log.info("warm-up (one DiT forward per expert, one VAE decode) in %.1f s", seconds)
        Path(self.settings.work_dir).mkdir(parents=True, exist_ok=True)

    def start_background(self) -> None:
        self.heartbeat()
        for target in (self._heartbeat_loop, self._reaper_loop, self._parked_loop):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.registry.remove(self.worker_id, self.profile.name)
            if self.gpu:
                self.registry.release_gpu(self.gpu.uuid, self.worker_id)
        except redis.RedisError:
            log.warning("could not deregister from Redis while stopping")

    def info(self) -> dict[str, Any]:
        info = {
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "gpu": self.gpu.__dict__ if self.gpu else None,
            "job": self.current or "",
            "state": "busy" if self.current else "idle",
            "jobs_done": self.jobs_done,
            "started_at": self.started_at,
            "model": self.profile.model,
            "low_mem_level": self.profile.low_mem_level,
        }
        if self.pipeline is not None:
            info["attention"] = self.pipeline.attention.implementation
        if self.device.startswith("cuda"):
            import torch

            info["gpu_memory_resident"] = torch.cuda.memory_allocated(self.device)
            info["gpu_memory_peak"] = max(self.peak_bytes, info["gpu_memory_resident"])
            metrics.GPU_MEMORY.labels(self.profile.name, "resident").set(info["gpu_memory_resident"])
            metrics.GPU_MEMORY.labels(self.profile.name, "peak").set(info["gpu_memory_peak"])
        return info

    def heartbeat(self) -> None:
        self.registry.heartbeat(self.worker_id, self.profile.name, self.info())
        if self.gpu and not self.registry.refresh_gpu(self.gpu.uuid, self.worker_id):
            log.error("lost the lease on GPU %s", self.gpu.uuid)
        job = self.current
        if job:
            try:
                self.store.progress(job, self.worker_id, self.settings.lease_seconds)
            except OwnershipLost:
                self.lease_lost.set()

    def _heartbeat_loop(self) -> None:
        period = max(0.5, min(self.settings.lease_seconds, self.settings.worker_ttl_seconds) / 3)
        while not self.stopping.wait(period):
            try:
                self.heartbeat()
            except redis.RedisError as error:  # Redis restarting: keep trying, the job goes on
                log.warning("heartbeat failed: %s", error)

    def _reaper_loop(self) -> None:
        while not self.stopping.wait(self.settings.reaper_seconds):
            try:
                self.reap()
            except redis.RedisError as error:
                log.warning("reaper failed: %s", error)

    def reap(self) -> list[str]:
        """Requeue every job whose worker stopped refreshing its lease (or end it, if a cancel was
        pending), and mark the queued jobs whose message is gone; returns the requeued ids."""
        requeued = []
        for job_id in self.store.expired_jobs():
            outcome = self.store.requeue_if_expired(job_id)
            if outcome and self.broker is not None:
                # The dead worker's delivery would come back when kombu's visibility timeout ends.
                drop_unacked(self.broker, job_id)
            if outcome == JobState.QUEUED:
                self.send(job_id)
                requeued.append(job_id)
                log.warning("job %s lost its worker; requeued", job_id, extra={"job_id": job_id})
        if time.monotonic() >= self.next_purge_sweep:  # it reads every queue: now and then
            self.next_purge_sweep = time.monotonic() + PURGE_SWEEP_REAPS * self.settings.reaper_seconds
            self.mark_purged()
        return requeued

    def mark_purged(self) -> list[str]:
        """Jobs QUEUED for a while whose message is in no queue and no worker's hands, at two sweeps
        in a row (``celery purge``, or a queue deleted by hand): their records end PURGED."""
        if self.broker is None:  # the queues are not in Redis: nothing to compare with
            return []
        grace = 2 * self.settings.reaper_seconds + self.settings.lease_seconds
        queued = set(self.store.queued_jobs(time.time() - grace))
        missing = queued - waiting_ids(self.broker, sorted(self._profiles_of(queued))) if queued else set()
        purged = sorted(missing & self.purge_suspects)
        self.purge_suspects = missing - set(purged)
        for job_id in purged:
            message = "its message was purged from the queue before a worker took it"
            if self.store.cancel(job_id, ErrorCode.PURGED, message) == JobState.CANCELLED:
                log.warning("job %s: %s", job_id, message, extra={"job_id": job_id})
        return purged

    def _profiles_of(self, job_ids: set[str]) -> set[str]:
        pipe = self.store.redis.pipeline()
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "profile")
        return {profile for profile in pipe.execute() if profile}

    def revoked(self, job_id: str) -> None:
        """Celery discarded a revoked message of ours before running it: the job is cancelled."""
        self.store.cancel(job_id, ErrorCode.CANCELLED, "revoked before it started")

    def send(self, job_id: str) -> None:
        """(Re)send a job's message from its record, ahead of new work."""
        record = self.store.get(job_id)
        self.app.send_task(
            TASK_NAME,
            kwargs={"profile": record.profile, "params": record.params},
            task_id=job_id,
            queue=record.profile,
            priority=REQUEUE_PRIORITY,
        )

    def record_rejected(self, message: Any, reason: str) -> None:
        """A message Celery refused: fail its job's record (if it names one) and note it."""
        headers = getattr(message, "headers", None)
        job_id = headers.get("id") if isinstance(headers, dict) else None
        if not (isinstance(job_id, str) and 8 <= len(job_id) <= 64 and job_id.replace("-", "").isalnum()):
            job_id = None
        try:
            if job_id:
                self.store.fail_unclaimed(job_id, ErrorCode.INVALID_MESSAGE, reason, self.profile.name)
            record_rejection(self.store.redis, reason, job_id)
        except redis.RedisError:
            log.warning("could not record a refused message")
        log.warning(
            "refused a message: %s", reason, extra={"job_id": job_id or "", "code": ErrorCode.INVALID_MESSAGE}
        )

    # --- one job ----------------------------------------------------------------------------

    def execute(self, job_id: str, args: Any, kwargs: Any, priority: int = 0) -> dict[str, Any]:
        """Run one delivered message to its end. Never raises for a job's own failure.
        ``priority``: the message's, recorded for a job another producer queued without a record."""
        token = current_job.set(job_id)
        try:
            return self._execute(job_id, args, kwargs, priority)
        finally:
            current_job.reset(token)

    def _execute(self, job_id: str, args: Any, kwargs: Any, priority: int) -> dict[str, Any]:
        try:
            params = parse_message(args, kwargs, self.profile)
        except BadMessage as error:
            self.store.fail_unclaimed(job_id, ErrorCode.INVALID_INPUT, str(error), self.profile.name)
            log.warning("rejected: %s", error, extra={"code": ErrorCode.INVALID_INPUT})
            metrics.JOBS.labels(self.profile.name, JobState.FAILED).inc()
            return {"id": job_id, "state": JobState.FAILED}
        except Exception as error:  # a bug of ours: the caller learns of it, the worker serves on
            log.exception("reading the message failed")
            message = f"{type(error).__name__} while reading the message: {error}"[:1000]
            self.store.fail_unclaimed(job_id, ErrorCode.INTERNAL_ERROR, message, self.profile.name)
            metrics.JOBS.labels(self.profile.name, JobState.FAILED).inc()
            return {"id": job_id, "state": JobState.FAILED}

        if self.store.get(job_id) is None:  # a message pushed by another producer, without a record
            self.store.create(job_id, self.profile.name, params.to_dict(), priority)
        status = self.store.claim(
            job_id, self.worker_id, self.settings.lease_seconds, self.settings.max_attempts
        )
        if status != "claimed":
            log.info("not running: %s", status, extra={"state": status})
            return {"id": job_id, "state": status}

        record = self.store.get(job_id)
        metrics.QUEUE_WAIT.labels(self.profile.name).observe(max(0.0, record.started_at - record.queued_at))
        self.current = job_id
        self.lease_lost.clear()
        if self.device == "cpu":
            self.share_cpu()
        metrics.BUSY.labels(self.profile.name).set(1)
        try:
            state = self._run(job_id, params)
        finally:
            self.current = None
            metrics.BUSY.labels(self.profile.name).set(0)
        return {"id": job_id, "state": state}

    def _run(self, job_id: str, params) -> str:
        seconds: dict[str, float] = {}
        stage = {"name": "text_encode"}
        video_path = Path(self.settings.work_dir) / f"{job_id}.mp4"

        def progress(name: str, step: int, total: int) -> None:
            stage["name"] = name
            if self.lease_lost.is_set():
                raise OwnershipLost(job_id)
            # step/steps count denoising steps; the other stages only name themselves.
            fields = {"stage": name, "step": step, "steps": total} if name == "denoise" else {"stage": name}
            try:
                cancel = self.store.progress(job_id, self.worker_id, self.settings.lease_seconds, **fields)
            except redis.RedisError as error:  # a Redis restart must not kill a running job
                log.warning("progress not recorded: %s", error)
                cancel = False
            if cancel:
                raise JobCancelled("cancelled")
            if self.is_revoked(job_id):
                raise JobCancelled("revoked")
            if self.hand_back_requested.is_set() and name == "denoise":
                raise HandBack

        try:
            self.check_fits(params)
            run = self.run_pipeline or self.pipeline.generate
            result = run(params, progress)
            seconds.update(result.seconds)
            self.peak_bytes = max([self.peak_bytes, *result.peak_memory.values()])
            progress("encode", 0, 1)
            start = time.perf_counter()
            from smartdiff.pipeline.video import write_mp4

            write_mp4(result.frames, video_path, fps=result.fps)
            digest = sha256_of(video_path)
            seconds["encode"] = time.perf_counter() - start
            out = {
                "width": params.width,
                "height": params.height,
                "frames": params.frames,
                "fps": result.fps,
                "seed": params.seed,
                "profile": self.profile.name,
                "model": self.profile.model,
                "attention": result.attention,
                "cache": result.cache,
                "attention_sparsity": result.attention_sparsity,
                "gemm": result.gemm,
                "loras": result.loras,
            }
            progress("upload", 0, 1)
            start = time.perf_counter()
            try:  # retried on the upload budget; the heartbeat keeps the lease meanwhile
                stored = self.video_store.upload(video_path, job_id, digest, {"job-id": job_id})
            except StorageError as error:
                if not error.transient:
                    raise
                return self.park(job_id, video_path, digest, out, seconds, error)
            seconds["upload"] = time.perf_counter() - start
            return self._finish(job_id, JobState.SUCCEEDED, seconds, result={**stored.to_dict(), **out})
        except JobCancelled as how:
            return self._finish(
                job_id,
                JobState.CANCELLED,
                seconds,
                error_code=ErrorCode.CANCELLED,
                error_message=f"{how} during {stage['name']}",
            )
        except HandBack:
            if self.store.hand_back(job_id, self.worker_id):
                self.send(job_id)
                log.info("handed back on shutdown")
            return JobState.QUEUED
        except OwnershipLost:
            log.warning("lease lost during %s; another worker owns the job now", stage["name"])
            return "LOST"
        except StorageError as error:
            return self._finish(
                job_id, JobState.FAILED, seconds, error_code=ErrorCode.STORAGE_ERROR, error_message=str(error)
            )
        except WouldNotFit as error:
            return self._finish(
                job_id, JobState.FAILED, seconds, error_code=ErrorCode.WOULD_NOT_FIT, error_message=str(error)
            )
        except Exception as error:
            import torch

            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                return self._finish(
                    job_id,
                    JobState.FAILED,
                    seconds,
                    error_code=ErrorCode.GPU_OUT_OF_MEMORY,
                    error_message=oom_advice(stage["name"], params, self.profile.low_mem_level),
                )
            log.exception("job failed in %s", stage["name"])
            return self._finish(
                job_id,
                JobState.FAILED,
                seconds,
                error_code=ErrorCode.INTERNAL_ERROR,
                error_message=f"{type(error).__name__} during {stage['name']}: {error}"[:1000],
            )
        finally:
            video_path.unlink(missing_ok=True)

    def share_cpu(self) -> None:
        """A CPU worker's threads for the next job: SMARTDIFF_CPU_THREADS, else OMP_NUM_THREADS, else
        the host's cores shared among its live CPU workers (each one using every core made three
        workers on two cores 40x slower)."""
        import torch

        threads = self.settings.cpu_threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
        if not threads:
            peers = [w for w in self.registry.on_node(socket.gethostname()) if w.get("device") == "cpu"]
            threads = max(1, (os.cpu_count() or 1) // max(1, len(peers)))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
            log.info("CPU threads per job: %d", threads)

    # --- videos waiting for the storage ------------------------------------------------------

    @property
    def parked_dir(self) -> Path:
        return Path(self.settings.work_dir) / "upload-pending"

    def park(
        self, job_id: str, video: Path, digest: str, result: dict, seconds: dict, error: StorageError
    ) -> str:
        """The storage stayed unreachable for the whole upload budget: keep the finished video in
        the work dir and upload it later (``retry_parked``), never regenerate it. The job stays
        RUNNING at stage upload; its record says where the video waits."""
        self.parked_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(job_id.encode()).hexdigest()[:32]  # job ids may hold any character
        kept = self.parked_dir / f"{name}.mp4"
        video.replace(kept)
        entry = {"job_id": job_id, "sha256": digest, "result": result, "seconds": seconds}
        kept.with_suffix(".json").write_text(json.dumps(entry))
        budget = self.settings.upload_budget_seconds
        note = (
            f"the storage did not answer for {budget:.0f} s ({str(error)[:200]}); the finished video is "
            f"kept by worker {self.worker_id} and uploaded as soon as the storage answers"
        )
        if not self.store.park_upload(job_id, self.worker_id, note):
            self._drop_parked(kept)
            log.warning("lease lost while uploading; another worker owns the job now")
            return "LOST"
        log.warning("upload postponed: %s", note)
        return "UPLOAD_PENDING"

    def retry_parked(self) -> list[str]:
        """One try at every video parked in this work dir (by this process or an earlier one);
        returns the ids of the jobs that ended."""
        ended = []
        for kept in sorted(self.parked_dir.glob("*.mp4")):
            entry = json.loads(kept.with_suffix(".json").read_text())
            job_id = entry["job_id"]
            record = self.store.get(job_id)
            if record is None or record.state != JobState.RUNNING or not record.upload_pending:
                self._drop_parked(kept)  # ended otherwise (expired, or taken over): nothing to do
                continue
            token = current_job.set(job_id)
            try:
                state = self._upload_parked(job_id, kept, entry, record.cancel_requested)
            finally:
                current_job.reset(token)
            if state:
                ended.append(job_id)
                self._drop_parked(kept)
        return ended

    def _upload_parked(self, job_id: str, kept: Path, entry: dict, cancelled: bool) -> str:
        """The job's final state if it ended now, else "" (the storage is still away)."""
        if cancelled:
            fields = {
                "error_code": ErrorCode.CANCELLED,
                "error_message": "cancelled while its video waited for the storage",
            }
            state = JobState.CANCELLED
        else:
            start = time.perf_counter()
            try:
                stored = self.parked_store.upload(kept, job_id, entry["sha256"], {"job-id": job_id})
            except StorageError as error:
                if error.transient:
                    return ""
                state, fields = (
                    JobState.FAILED,
                    {"error_code": ErrorCode.STORAGE_ERROR, "error_message": str(error)},
                )
            else:
                seconds = {**entry["seconds"], "upload": round(time.perf_counter() - start, 4)}
                state, fields = (
                    JobState.SUCCEEDED,
                    {"seconds": seconds, "result": {**stored.to_dict(), **entry["result"]}},
                )
        if self.store.finish_parked(job_id, state, **fields):
            metrics.JOBS.labels(self.profile.name, state).inc()
            log.info("job %s", state, extra={"state": state})
        return state

    def _drop_parked(self, kept: Path) -> None:
        kept.unlink(missing_ok=True)
        kept.with_suffix(".json").unlink(missing_ok=True)

    def _parked_loop(self) -> None:
        period = PARKED_RETRY_REAPS * self.settings.reaper_seconds
        while not self.stopping.wait(period):
            try:
                self.retry_parked()
            except (redis.RedisError, OSError, ValueError) as error:
                log.warning("retrying parked uploads failed: %s", error)

    def free_device_bytes(self) -> int | None:
        """Device memory this process can still use (free plus its own cached blocks); None on CPU."""
        if not self.device.startswith("cuda"):
            return None
        import torch

        free, _total = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def check_fits(self, params) -> None:
        """Fail a job that cannot fit before it starts, where the memory it needs can be known."""
        free = self.free_device_bytes()
        if free is None or not hasattr(self.pipeline, "estimate_job_bytes"):
            return
        need = self.pipeline.estimate_job_bytes(params)
        if need > free:
            raise WouldNotFit(
                f"{params.size}x{params.frames} needs about {need / 2**30:.1f} GiB of GPU memory beyond the "
                f"model, and {free / 2**30:.1f} GiB are free; {memory_advice(self.profile.low_mem_level)}"
            )

    def _finish(self, job_id: str, state: str, seconds: dict[str, float], **fields: Any) -> str:
        for name, value in seconds.items():
            metrics.STAGE_SECONDS.labels(self.profile.name, name).observe(value)
        seconds = {k: round(v, 4) for k, v in seconds.items()}
        # Redis may be restarting: keep trying for a while, the video is already stored.
        deadline = time.monotonic() + 60
        while True:
            try:
                done = self.store.finish(job_id, self.worker_id, state, stage="", seconds=seconds, **fields)
                break
            except redis.RedisError as error:
                if time.monotonic() > deadline:
                    raise
                log.warning("could not record the final state yet: %s", error)
                time.sleep(1)
        if not done:
            log.warning("finished as %s but the job is no longer ours; result dropped", state)
            return "LOST"
        self.jobs_done += 1
        metrics.JOBS.labels(self.profile.name, state).inc()
        log.info("job %s", state, extra={"state": state, "seconds": seconds})
        return state
