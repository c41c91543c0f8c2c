"""Farm settings, read from the environment once per process. Credentials are never stored here:
boto3 reads the usual AWS_* variables itself, so no setting object can leak them."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in os.environ.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class FarmSettings:
    # Redis: the Celery broker and the job records (the same server unless told otherwise).
    broker_url: str = "redis://127.0.0.1:6379/0"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # S3-compatible storage. endpoint None means AWS itself; public_endpoint is what presigned
    # links point at (e.g. the address clients reach, when workers use an internal one).
    s3_endpoint: str | None = None
    s3_public_endpoint: str | None = None
    s3_bucket: str = "smartdiff-videos"
    s3_region: str = "us-east-1"
    object_key_template: str = "videos/{job_id}.mp4"
    presign_seconds: int = 3600
    # A request to the storage that makes no progress for this long is given up and retried.
    s3_timeout_seconds: float = 10.0
    # A worker retries a finished video's upload this long (a storage restart costs no compute);
    # past it the video is kept on the worker and its upload retried in the background.
    upload_budget_seconds: float = 600.0
    # A running job holds a lease refreshed every lease_seconds / 3; a reaper on every worker
    # requeues jobs whose lease ran out. A killed worker's job restarts within
    # lease_seconds + reaper_seconds.
    lease_seconds: int = 30
    reaper_seconds: int = 5
    max_attempts: int = 3
    # SIGTERM: "drain" finishes the running job first; "requeue" stops it at the next step and
    # puts it back on the queue at once.
    shutdown: str = "drain"
    # Job records outlive Celery's results: kept this long after they finish.
    record_ttl_seconds: int = 7 * 24 * 3600
    # A worker counts as alive while its heartbeat is younger than this.
    worker_ttl_seconds: int = 15
    work_dir: str = "/tmp/smartdiff"
    # CPU workers (--gpus none): threads per job; 0 shares the host's cores among its CPU workers.
    cpu_threads: int = 0
    metrics_port: int = 0  # 0: no metrics server
    # HTTP gateway (producer/gateway.py): request bodies above this are refused before parsing.
    gateway_max_body_bytes: int = 64 * 1024
    # Webhooks: callback URLs may only name these hosts ("hooks.example.com", or "*.example.com" for
    # its subdomains); empty: no callbacks. The signing secret is SMARTDIFF_WEBHOOK_SECRET, read by
    # the gateway itself (no credential lives in this object).
    webhook_allowed_hosts: tuple[str, ...] = ()
    # A failed delivery is retried after backoff, 2 * backoff, 4 * backoff, ... (at most
    # backoff_max), max_attempts deliveries in all, then given up (noted on the job's webhook state).
    webhook_max_attempts: int = 8
    webhook_backoff_seconds: float = 2.0
    webhook_backoff_max_seconds: float = 300.0
    webhook_timeout_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> FarmSettings:
        broker = _env("SMARTDIFF_BROKER_URL", cls.broker_url)
        shutdown = _env("SMARTDIFF_SHUTDOWN", cls.shutdown)
        if shutdown not in ("drain", "requeue"):
            raise ValueError(f"SMARTDIFF_SHUTDOWN must be 'drain' or 'requeue', got {shutdown!r}")
        endpoint = os.environ.get("SMARTDIFF_S3_ENDPOINT") or None
        settings = cls(
            broker_url=broker,
            redis_url=_env("SMARTDIFF_REDIS_URL", broker),
            s3_endpoint=endpoint,
            s3_public_endpoint=os.environ.get("SMARTDIFF_S3_PUBLIC_ENDPOINT") or endpoint,
            s3_bucket=_env("SMARTDIFF_S3_BUCKET", cls.s3_bucket),
            s3_region=_env("SMARTDIFF_S3_REGION", os.environ.get("AWS_DEFAULT_REGION", cls.s3_region)),
            object_key_template=_env("SMARTDIFF_OBJECT_KEY_TEMPLATE", cls.object_key_template),
            presign_seconds=_env_int("SMARTDIFF_PRESIGN_SECONDS", cls.presign_seconds),
            s3_timeout_seconds=_env_float("SMARTDIFF_S3_TIMEOUT_SECONDS", cls.s3_timeout_seconds),
            upload_budget_seconds=_env_float("SMARTDIFF_UPLOAD_BUDGET_SECONDS", cls.upload_budget_seconds),
            lease_seconds=_env_int("SMARTDIFF_LEASE_SECONDS", cls.lease_seconds),
            reaper_seconds=_env_int("SMARTDIFF_REAPER_SECONDS", cls.reaper_seconds),
            max_attempts=_env_int("SMARTDIFF_MAX_ATTEMPTS", cls.max_attempts),
            shutdown=shutdown,
            record_ttl_seconds=_env_int("SMARTDIFF_RECORD_TTL_SECONDS", cls.record_ttl_seconds),
            worker_ttl_seconds=_env_int("SMARTDIFF_WORKER_TTL_SECONDS", cls.worker_ttl_seconds),
            work_dir=_env("SMARTDIFF_WORK_DIR", cls.work_dir),
            cpu_threads=_env_int("SMARTDIFF_CPU_THREADS", cls.cpu_threads),
            metrics_port=_env_int("SMARTDIFF_METRICS_PORT", cls.metrics_port),
            gateway_max_body_bytes=_env_int("SMARTDIFF_GATEWAY_MAX_BODY_BYTES", cls.gateway_max_body_bytes),
            webhook_allowed_hosts=_env_list("SMARTDIFF_WEBHOOK_ALLOWED_HOSTS"),
            webhook_max_attempts=_env_int("SMARTDIFF_WEBHOOK_MAX_ATTEMPTS", cls.webhook_max_attempts),
            webhook_backoff_seconds=_env_float(
                "SMARTDIFF_WEBHOOK_BACKOFF_SECONDS", cls.webhook_backoff_seconds
            ),
            webhook_backoff_max_seconds=_env_float(
                "SMARTDIFF_WEBHOOK_BACKOFF_MAX_SECONDS", cls.webhook_backoff_max_seconds
            ),
            webhook_timeout_seconds=_env_float(
                "SMARTDIFF_WEBHOOK_TIMEOUT_SECONDS", cls.webhook_timeout_seconds
            ),
        )
        if "{job_id}" not in settings.object_key_template:
            raise ValueError("SMARTDIFF_OBJECT_KEY_TEMPLATE must contain {job_id}: object keys are per job")
        if settings.lease_seconds < 3 or settings.reaper_seconds < 1:
            raise ValueError("SMARTDIFF_LEASE_SECONDS must be >= 3 and SMARTDIFF_REAPER_SECONDS >= 1")
        if settings.gateway_max_body_bytes < 1024 or settings.webhook_max_attempts < 1:
            raise ValueError(
                "SMARTDIFF_GATEWAY_MAX_BODY_BYTES must be >= 1024 and SMARTDIFF_WEBHOOK_MAX_ATTEMPTS >= 1"
            )
        return settings
