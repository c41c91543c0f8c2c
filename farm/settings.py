"""Farm settings, read from the environment (``SMARTDIFF_<NAME>``) once per process, each checked.

Credentials are never stored here: boto3 reads the usual AWS_* variables itself, so no setting
object can leak them. Torch-free: producers import it.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class FarmSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMARTDIFF_", frozen=True, extra="ignore")

    # Redis: the Celery broker and the job records (the same server unless told otherwise).
    broker_url: str = "redis://127.0.0.1:6379/0"
    redis_url: str = ""  # default: broker_url
    # S3-compatible storage. endpoint None means AWS itself; public_endpoint is what presigned
    # links point at (e.g. the address clients reach, when workers use an internal one).
    s3_endpoint: str | None = None
    s3_public_endpoint: str | None = None  # default: s3_endpoint
    s3_bucket: str = "smartdiff-videos"
    s3_region: str = "us-east-1"  # default: AWS_DEFAULT_REGION, where boto looks
    # Object keys are per job: the template must hold {job_id}.
    object_key_template: Annotated[str, Field(pattern=r"\{job_id\}")] = "videos/{job_id}.mp4"
    presign_seconds: int = Field(3600, ge=1)
    # A request to the storage that makes no progress for this long is given up and retried.
    s3_timeout_seconds: float = Field(10.0, gt=0)
    # A worker retries a finished video's upload this long (a storage restart costs no compute);
    # past it the video is kept on the worker and its upload retried in the background.
    upload_budget_seconds: float = Field(600.0, ge=0)
    # A running job holds a lease refreshed every lease_seconds / 3; a reaper on every worker
    # requeues jobs whose lease ran out. A killed worker's job restarts within
    # lease_seconds + reaper_seconds.
    lease_seconds: int = Field(30, ge=3)
    reaper_seconds: int = Field(5, ge=1)
    max_attempts: int = Field(3, ge=1)
    # SIGTERM: "drain" finishes the running job first; "requeue" stops it at the next step and
    # puts it back on the queue at once.
    shutdown: Literal["drain", "requeue"] = "drain"
    # Job records outlive Celery's results: kept this long after they finish.
    record_ttl_seconds: int = Field(7 * 24 * 3600, ge=1)
    # A worker counts as alive while its heartbeat is younger than this.
    worker_ttl_seconds: int = Field(15, ge=1)
    work_dir: str = "/tmp/smartdiff"
    # CPU workers (--gpus none): threads per job; 0 shares the host's cores among its CPU workers.
    cpu_threads: int = Field(0, ge=0)
    metrics_port: int = Field(0, ge=0, le=65535)  # 0: no metrics server
    # HTTP gateway (producer/api.py): request bodies above this are refused before parsing.
    gateway_max_body_bytes: int = Field(64 * 1024, ge=1024)
    # Webhooks: callback URLs may only name these hosts ("hooks.example.com", or "*.example.com" for
    # its subdomains), comma-separated; empty: no callbacks. The signing secret is
    # SMARTDIFF_WEBHOOK_SECRET, read by the gateway itself (no credential lives in this object).
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # A failed delivery is retried after backoff, 2 * backoff, 4 * backoff, ... (at most
    # backoff_max), max_attempts deliveries in all, then given up (noted on the job's webhook state).
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_backoff_seconds: float = Field(2.0, ge=0)
    webhook_backoff_max_seconds: float = Field(300.0, ge=0)
    webhook_timeout_seconds: float = Field(5.0, gt=0)

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(host.strip().lower() for host in value.split(",") if host.strip())
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_others(cls, values: Any) -> Any:
        # Empty variables mean "not set", as in a compose file's ${VAR:-}.
        values = {k: v for k, v in values.items() if v != ""} if isinstance(values, dict) else values
        if isinstance(values, dict):
            values.setdefault("redis_url", values.get("broker_url", cls.model_fields["broker_url"].default))
            values.setdefault("s3_public_endpoint", values.get("s3_endpoint"))
            if os.environ.get("AWS_DEFAULT_REGION"):
                values.setdefault("s3_region", os.environ["AWS_DEFAULT_REGION"])
        return values

    @classmethod
    def from_env(cls) -> FarmSettings:
        """The settings of this process: every ``SMARTDIFF_*`` variable, checked."""
        return cls()
