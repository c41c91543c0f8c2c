"""The Python client other services use: submit, status, wait, cancel.

    from smartdiff.producer import Client
    job = Client().submit(profile="wan2.1-1.3b-lossless", prompt="a corgi on a beach", seed=42)
    record = job.wait(timeout=600)      # raises FarmError if it failed or was cancelled
    print(record["result"]["url"])      # a presigned link, made at poll time

Configuration comes from the environment (SMARTDIFF_BROKER_URL, SMARTDIFF_S3_*, AWS_*).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from smartdiff.farm.celery_app import make_celery
from smartdiff.farm.codes import ErrorCode, JobState
from smartdiff.farm.records import JobRecord, JobStore
from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.storage import VideoStore
from smartdiff.farm.wire import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    TASK_NAME,
    broker_client,
    find_queued,
    task_kwargs,
    transport_priority,
)
from smartdiff.farm.workers import WorkerRegistry
from smartdiff.pipeline.config import list_profile_names, load_profile
from smartdiff.pipeline.params import ParamError, validate_params
from smartdiff.producer.webhooks import check_callback_url


class FarmError(Exception):
    """A request the farm refuses or a job that did not succeed; ``code`` is stable for scripts."""

    def __init__(self, code: str, message: str, record: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.record = record


class Client:
    def __init__(self, settings: FarmSettings | None = None):
        self.settings = settings or FarmSettings.from_env()
        client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        self.store = JobStore(client, self.settings.record_ttl_seconds)
        self.registry = WorkerRegistry(client, self.settings.worker_ttl_seconds)
        self.broker = broker_client(self.settings.broker_url)  # the queues (records: self.store)
        self._app = None
        self._video_store = None

    @property
    def app(self):
        if self._app is None:
            self._app = make_celery(self.settings)
        return self._app

    @property
    def video_store(self) -> VideoStore:
        if self._video_store is None:
            self._video_store = VideoStore(self.settings)
        return self._video_store

    def submit(
        self,
        profile: str,
        prompt: str,
        *,
        priority: int = DEFAULT_PRIORITY,
        queue_anyway: bool = False,
        job_id: str | None = None,
        callback_url: str | None = None,
        owner: str | None = None,
        **params: Any,
    ) -> Job:
        """Validate and enqueue one job. ``priority`` 0..9, 9 the most urgent (default 5).

        Raises ``FarmError`` (UNKNOWN_PROFILE, INVALID_INPUT, NO_WORKER) before anything is queued.
        Submitting again with the same ``job_id`` returns the existing job and queues nothing.
        ``callback_url``: the final record is posted there by the gateway's webhook delivery (its
        host must be in SMARTDIFF_WEBHOOK_ALLOWED_HOSTS). ``owner``: who submitted it (the gateway
        stores the API key's id; jobs are only shown to their owner there).
        """
        try:
            profile_config = load_profile(profile)
        except ValueError as error:
            raise FarmError(ErrorCode.UNKNOWN_PROFILE, str(error)) from None
        try:
            request = {"prompt": prompt, **params}
            validated = validate_params(request, profile_config.model_config, profile_config)
        except ParamError as error:
            raise FarmError(ErrorCode.INVALID_INPUT, str(error)) from None
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
            raise FarmError(ErrorCode.INVALID_INPUT, f"priority: must be an integer from 0 to {MAX_PRIORITY}")
        if job_id is not None and (
            not isinstance(job_id, str) or not 8 <= len(job_id) <= 64 or not job_id.replace("-", "").isalnum()
        ):
            raise FarmError(ErrorCode.INVALID_INPUT, "job_id: 8 to 64 letters, digits and dashes")
        extra = {"owner": owner} if owner else {}
        if callback_url is not None:
            try:
                extra["callback_url"] = check_callback_url(callback_url, self.settings.webhook_allowed_hosts)
            except ValueError as error:
                raise FarmError(ErrorCode.INVALID_INPUT, str(error)) from None
        if not queue_anyway and not self.registry.live_workers(profile):
            raise FarmError(
                ErrorCode.NO_WORKER,
                f"no live worker serves profile {profile!r}; start one, or "
                "submit with queue_anyway=True to wait in the queue",
            )
        job_id = job_id or uuid.uuid4().hex
        if self.store.create(job_id, profile, validated.to_dict(), priority, extra):
            self.app.send_task(
                TASK_NAME,
                kwargs={"profile": profile, "params": validated.to_dict()},
                task_id=job_id,
                queue=profile,
                priority=priority,
            )
        return Job(self, job_id)

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def find(self, job_id: str) -> JobRecord | None:
        """The job's record. A job another service queued with Celery alone (docs/WIRE.md) has none
        until a worker takes it: one is made from its waiting message, so status and cancel see it
        from the moment it is queued."""
        record = self.store.get(job_id)
        broker = self.broker
        if record is None and broker and (found := find_queued(broker, list_profile_names(), job_id)):
            queue, envelope = found
            params = (task_kwargs(envelope) or {}).get("params")
            priority = transport_priority(envelope.get("properties", {}).get("priority"))
            self.store.create(job_id, queue, params if isinstance(params, dict) else {}, priority)
            record = self.store.get(job_id)
        return record

    def record(self, job_id: str) -> dict[str, Any]:
        """The job's record as a dict, with a fresh presigned link if it succeeded."""
        record = self.find(job_id)
        if record is None:
            raise FarmError(
                ErrorCode.NOT_FOUND, f"no job {job_id!r} (never submitted, or its record expired)"
            )
        out = record.to_dict()
        if record.state == JobState.SUCCEEDED and record.result.get("key"):
            out["result"]["url"] = self.video_store.presign(record.result["bucket"], record.result["key"])
        return out

    def workers(self, profile: str) -> list[dict[str, Any]]:
        return self.registry.live_workers(profile)


class Job:
    def __init__(self, client: Client, job_id: str):
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict[str, Any]:
        return self.client.record(self.id)

    def wait(self, timeout: float | None = None, poll_seconds: float = 0.5) -> dict[str, Any]:
        """Block until the job finishes; its record if it succeeded, else ``FarmError`` with it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.status()
            if record["state"] == JobState.SUCCEEDED:
                return record
            if record["state"] in (JobState.FAILED, JobState.CANCELLED):
                raise FarmError(record["error_code"] or record["state"], record["error_message"], record)
            if deadline is not None and time.monotonic() > deadline:
                raise FarmError(
                    ErrorCode.TIMEOUT, f"job {self.id} is still {record['state']} after {timeout} s", record
                )
            time.sleep(poll_seconds)

    def cancel(self) -> str:
        """Cancel: a queued job at once, a running one at its next denoising step. Returns the state."""
        self.client.find(self.id)  # a job queued by another service gets its record first
        state = self.client.store.cancel(self.id)
        if state == "missing":
            raise FarmError(ErrorCode.NOT_FOUND, f"no job {self.id!r}")
        return state
