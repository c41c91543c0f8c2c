"""The gateway's work behind the routes: keys, idempotency, jobs through the Python client, records
as callers see them, profiles, readiness and metrics of the farm. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials
from kombu.exceptions import OperationalError
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from smartdiff.farm.codes import ErrorCode, JobState
from smartdiff.farm.records import PREFIX, JobRecord
from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.storage import make_client
from smartdiff.farm.wire import priority_lists
from smartdiff.pipeline.config import list_profile_names, load_profile
from smartdiff.pipeline.params import REQUEST_FIELDS, param_error
from smartdiff.producer.api_models import ApiError, JobRequest
from smartdiff.producer.apikeys import ApiKey, ApiKeyStore
from smartdiff.producer.client import Client, FarmError
from smartdiff.producer.webhooks import WebhookDelivery, check_callback_url, delivery_state

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
_IDEMPOTENCY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
TOO_MANY_JOBS_RETRY_SECONDS = 5
# FarmError codes of Client.submit -> HTTP status.
_FARM_STATUS = {ErrorCode.INVALID_INPUT: 400, ErrorCode.UNKNOWN_PROFILE: 400, ErrorCode.NO_WORKER: 503}


class _Idempotency:
    """Idempotency-Key -> (job id, body hash), per API key, for 24 h."""

    # KEYS[1]. ARGV: value, ttl. Sets the value unless one exists; returns the value that holds.
    _CLAIM = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""
    # KEYS[1]. ARGV: value. Deletes only if it still holds this value.
    _RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

    def __init__(self, client: redis.Redis):
        self._claim = client.register_script(self._CLAIM)
        self._release = client.register_script(self._RELEASE)

    @staticmethod
    def _key(key_id: str, idempotency_key: str) -> str:
        return f"{PREFIX}:idempotency:{key_id}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"

    def claim(self, key_id: str, idempotency_key: str, job_id: str, body_hash: str) -> tuple[str, str]:
        """(job id, body hash) stored under the key: ours if it was free, else the first request's."""
        value = json.dumps({"job_id": job_id, "body": body_hash})
        held = json.loads(
            self._claim(keys=[self._key(key_id, idempotency_key)], args=[value, IDEMPOTENCY_TTL_SECONDS])
        )
        return held["job_id"], held["body"]

    def release(self, key_id: str, idempotency_key: str, job_id: str, body_hash: str) -> None:
        value = json.dumps({"job_id": job_id, "body": body_hash})
        self._release(keys=[self._key(key_id, idempotency_key)], args=[value])


class Gateway:
    """What the routes do, with their Redis, S3 and farm clients; one per app."""

    def __init__(self, settings: FarmSettings, webhook_secret: str):
        self.settings = settings
        self.client = Client(settings)
        self.redis = self.client.store.redis
        self.keys = ApiKeyStore(self.redis)
        self.idempotency = _Idempotency(self.redis)
        self.webhook_secret = webhook_secret
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "smartdiff_gateway_requests_total",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "smartdiff_gateway_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.jobs_created = Counter(
            "smartdiff_gateway_jobs_created_total", "Jobs created", ["profile"], registry=self.registry
        )
        self.webhook_outcomes = Counter(
            "smartdiff_gateway_webhook_deliveries_total",
            "Webhook delivery attempts by outcome (delivered, retry, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(_FarmCollector(self))
        self.webhooks: WebhookDelivery | None = None
        if webhook_secret:
            self.webhooks = WebhookDelivery(
                redis.Redis.from_url(settings.redis_url, decode_responses=True),
                self.client.store,
                settings,
                webhook_secret,
                self.public_record,
                on_outcome=lambda outcome: self.webhook_outcomes.labels(outcome).inc(),
            )
        self._s3 = None

    # -- records ----------------------------------------------------------------------------------

    def public_record(self, record: JobRecord) -> dict[str, Any]:
        """The record as callers see it: with a fresh link when it succeeded; no owner id."""
        out = record.to_dict()
        out.pop("owner", None)
        if record.state == JobState.SUCCEEDED and record.result.get("key"):
            result = record.result
            out["result"]["url"] = self.client.video_store.presign(result["bucket"], result["key"])
        return out

    def own_record(self, key: ApiKey, job_id: str) -> JobRecord:
        """The job if this key created it; NOT_FOUND otherwise (others' jobs do not exist for it)."""
        record = self.client.store.get(job_id) if _JOB_ID_RE.match(job_id) else None
        if record is None or record.owner != key.id:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id!r} for this API key")
        return record

    def answer(self, record: JobRecord) -> dict[str, Any]:
        out = self.public_record(record)
        if record.callback_url:
            out["webhook"] = delivery_state(self.redis, record.id) or {
                "state": "pending",
                "attempts": 0,
                "last_status": 0,
            }
        return out

    # -- authentication and rate ------------------------------------------------------------------

    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
        if credentials is None or not credentials.credentials:
            raise ApiError(
                401,
                ErrorCode.UNAUTHENTICATED,
                "send an API key as 'Authorization: Bearer <key>' (smartdiff apikey create)",
                {"WWW-Authenticate": "Bearer"},
            )
        key = self.keys.authenticate(credentials.credentials)
        if key is None:
            raise ApiError(401, ErrorCode.UNAUTHENTICATED, "unknown API key", {"WWW-Authenticate": "Bearer"})
        if key.revoked:
            raise ApiError(403, ErrorCode.KEY_REVOKED, f"API key {key.id} was revoked; ask for a new one")
        wait = self.keys.hit(key)
        if wait > 0:
            raise ApiError(
                429,
                ErrorCode.RATE_LIMITED,
                f"more than {key.requests_per_minute} requests in a minute with this key",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return key

    # -- jobs -------------------------------------------------------------------------------------

    def create_job(self, key: ApiKey, body: dict[str, Any], idempotency_key: str | None) -> tuple[int, dict]:
        try:
            body_hash = hashlib.sha256(_canonical(body)).hexdigest()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") would fail later, in Redis
            raise ApiError(
                400, ErrorCode.INVALID_INPUT, "strings must be valid Unicode (no surrogates)"
            ) from None
        profile, priority, callback_url, queue_anyway, params = self._parse(body)
        job_id = uuid.uuid4().hex
        replay = False
        if idempotency_key is not None:
            if not _IDEMPOTENCY_RE.match(idempotency_key):
                raise ApiError(
                    400, ErrorCode.INVALID_INPUT, "Idempotency-Key: 1 to 255 printable ASCII characters"
                )
            held_id, held_hash = self.idempotency.claim(key.id, idempotency_key, job_id, body_hash)
            if held_hash != body_hash:
                raise ApiError(
                    422,
                    ErrorCode.IDEMPOTENCY_KEY_REUSED,
                    "this Idempotency-Key was used with another body; use a new key for a new job",
                )
            replay = held_id != job_id
            job_id = held_id
            if replay:
                record = self.client.store.get(job_id)
                if record is not None and record.owner == key.id:
                    return 200, self.answer(record)
                # The first request is still on its way (or died midway): finish its work with the
                # same job id. Creating a record is atomic, so the job is queued once at most.
        try:
            if not self.keys.reserve_job(key, job_id):
                raise ApiError(
                    429,
                    ErrorCode.TOO_MANY_JOBS,
                    f"this key has {key.max_concurrent_jobs} unfinished jobs, its limit; wait for one to end",
                    {"Retry-After": str(TOO_MANY_JOBS_RETRY_SECONDS)},
                )
            try:
                self.client.submit(
                    profile,
                    params.pop("prompt", None),
                    priority=priority,
                    queue_anyway=queue_anyway,
                    job_id=job_id,
                    callback_url=callback_url,
                    owner=key.id,
                    **params,
                )
            except FarmError as error:
                self.keys.release_job(key.id, job_id)
                headers = {"Retry-After": "30"} if error.code == ErrorCode.NO_WORKER else None
                status = _FARM_STATUS.get(error.code, 400)
                raise ApiError(status, error.code, error.message, headers) from None
            except (redis.RedisError, OperationalError):
                self._abandon(key, job_id)
                raise
        except (ApiError, redis.RedisError, OperationalError):
            if idempotency_key is not None and not replay:
                self.idempotency.release(key.id, idempotency_key, job_id, body_hash)
            raise
        record = self.client.store.get(job_id)
        if record is None:  # it finished and expired within this call: practically never
            raise ApiError(503, ErrorCode.NOT_READY, "the job's record vanished; try again")
        if not replay:
            self.jobs_created.labels(profile).inc()
        return (200 if replay else 201), self.answer(record)

    def _abandon(self, key: ApiKey, job_id: str) -> None:
        # Redis or the broker failed midway: a record without a queued message would wait forever.
        try:
            self.keys.release_job(key.id, job_id)
            self.client.store.fail_unclaimed(
                job_id, ErrorCode.NOT_READY, "the job could not be queued; submit again"
            )
        except redis.RedisError:
            pass

    def _parse(self, body: dict[str, Any]) -> tuple[str, Any, str | None, bool, dict[str, Any]]:
        """(profile, priority, callback_url, queue_anyway, generation parameters), by JobRequest;
        Client.submit checks the parameters against the profile's model."""
        try:
            request = JobRequest.model_validate(body)
        except ValidationError as error:
            raise ApiError(400, ErrorCode.INVALID_INPUT, str(param_error(error))) from None
        profile = request.profile
        known = list_profile_names()
        if profile not in known:  # a name, never a path: only the listed profiles exist
            message = f"unknown profile {profile[:100]!r} (known: {', '.join(known)})"
            raise ApiError(400, ErrorCode.UNKNOWN_PROFILE, message)
        callback_url = request.callback_url
        if callback_url is not None:
            if not self.webhooks:
                message = "callback_url: webhooks are off here (SMARTDIFF_WEBHOOK_SECRET unset)"
                raise ApiError(400, ErrorCode.INVALID_INPUT, message)
            try:
                check_callback_url(callback_url, self.settings.webhook_allowed_hosts)
            except ValueError as error:
                raise ApiError(400, ErrorCode.INVALID_INPUT, str(error)) from None
        # null means "the default" for every optional parameter.
        params = request.model_dump(include=set(REQUEST_FIELDS), exclude_none=True)
        return profile, request.priority, callback_url, request.queue_anyway, params

    def cancel(self, key: ApiKey, job_id: str) -> dict[str, Any]:
        record = self.own_record(key, job_id)
        if record.state in (JobState.SUCCEEDED, JobState.FAILED):
            raise ApiError(409, ErrorCode.JOB_FINISHED, f"job {job_id} already ended {record.state}")
        self.client.store.cancel(job_id)
        return self.answer(self.own_record(key, job_id))

    def video_url(self, key: ApiKey, job_id: str) -> str:
        record = self.own_record(key, job_id)
        if record.state != JobState.SUCCEEDED:
            raise ApiError(
                409, ErrorCode.JOB_NOT_SUCCEEDED, f"job {job_id} is {record.state}; no video (yet)"
            )
        return self.client.video_store.presign(record.result["bucket"], record.result["key"])

    # -- profiles, readiness ----------------------------------------------------------------------

    def queue_depths(self, names: list[str]) -> dict[str, int]:
        # kombu's Redis transport keeps one list per priority (farm.wire.priority_lists).
        lists = {name: priority_lists(name) for name in names}
        pipe = self.redis.pipeline()
        for key in (key for keys in lists.values() for key in keys):
            pipe.llen(key)
        lengths = iter(pipe.execute())
        return {name: sum(next(lengths) for _ in keys) for name, keys in lists.items()}

    def profiles(self) -> list[dict[str, Any]]:
        names = list_profile_names()
        depths = self.queue_depths(names)
        out = []
        for name in names:
            profile = load_profile(name)
            workers = [_public_worker(w) for w in self.client.registry.live_workers(name)]
            out.append(
                {
                    "name": name,
                    "model": profile.model,
                    "attention": profile.attention,
                    "flexcache": list(profile.flexcache),
                    "live_workers": len(workers),
                    "queue_depth": depths[name],
                    "workers": workers,
                }
            )
        return out

    def readiness(self) -> dict[str, str]:
        """'ok' or what failed, per dependency; quick (no retries)."""
        checks = {}
        try:
            self.redis.ping()
            checks["redis"] = "ok"
        except redis.RedisError as error:
            checks["redis"] = f"unreachable: {type(error).__name__}"
        try:
            if self._s3 is None:
                self._s3 = make_client(self.settings, retries=0, connect_timeout=2, read_timeout=3)
            self._s3.head_bucket(Bucket=self.settings.s3_bucket)
            checks["storage"] = "ok"
        except (BotoCoreError, ClientError) as error:
            detail = error.response.get("Error", {}).get("Code", "") if isinstance(error, ClientError) else ""
            bucket = self.settings.s3_bucket
            checks["storage"] = f"bucket {bucket} not reachable: {type(error).__name__} {detail}".strip()
        return checks

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        _ = self.client.app  # the Celery app, made once here rather than by racing request threads
        if self.webhooks is not None:
            self.webhooks.start()
        try:
            yield
        finally:
            if self.webhooks is not None:
                await run_in_threadpool(self.webhooks.stop)


def _public_worker(info: dict[str, Any]) -> dict[str, Any]:
    # Not the worker's current job id (another key's job) nor its pid or memory figures.
    gpu = info.get("gpu") or {}
    return {
        "id": str(info.get("id", "")),
        "state": str(info.get("state", "")),
        "device": info.get("device"),
        "gpu": gpu.get("name") if isinstance(gpu, dict) else None,
        "attention": info.get("attention"),
        "jobs_done": info.get("jobs_done"),
        "started_at": info.get("started_at"),
    }


class _FarmCollector:
    """Queue depths and live workers per profile, read from Redis at scrape time."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def describe(self) -> list:
        return []  # nothing collected at registration (Redis may not be up yet)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("smartdiff_queue_depth", "Jobs waiting per profile", labels=["profile"])
        workers = GaugeMetricFamily("smartdiff_live_workers", "Live workers per profile", labels=["profile"])
        try:
            names = list_profile_names()
            for name, count in self.gateway.queue_depths(names).items():
                depth.add_metric([name], count)
            for name in names:
                workers.add_metric([name], len(self.gateway.client.registry.live_workers(name)))
        except redis.RedisError:
            return
        yield depth
        yield workers


def _canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 415 unless it is declared JSON, 400 unless it parses to an object."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        message = "send a JSON body with 'Content-Type: application/json'"
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, message)
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: "[[[[...": nesting deeper than Python's stack
        raise ApiError(400, ErrorCode.INVALID_INPUT, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(
            400, ErrorCode.INVALID_INPUT, f"the body must be a JSON object, not {type(body).__name__}"
        )
    return body
