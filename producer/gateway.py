"""``smartdiff gateway``: the farm over HTTP, for services that do not speak Python.

    POST /v1/jobs                  create a job (Idempotency-Key makes a retried POST return the same job)
    GET  /v1/jobs/{id}             its record: state, stage, progress, result with a fresh presigned link
    POST /v1/jobs/{id}/cancel      cancel it
    GET  /v1/jobs/{id}/video       302 to the video (presigned link)
    GET  /v1/profiles              profiles with their live workers and queue depths
    GET  /healthz, /readyz         process up; Redis and the bucket reachable
    GET  /metrics                  Prometheus
    GET  /openapi.json, /docs      the API description (also openapi.json in the repo)

Every /v1 call needs ``Authorization: Bearer <API key>`` (``smartdiff apikey create``); a job is
visible only to the key that created it. Every error is ``{"error": {"code": ..., "message": ...}}``.
docs/API.md is the user's guide. Imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import redis
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from smartdiff.farm.records import FAILED, PREFIX, SUCCEEDED, JobRecord
from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.storage import StorageError, make_client
from smartdiff.farm.wire import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, priority_lists
from smartdiff.pipeline.config import list_profile_names, load_profile
from smartdiff.pipeline.params import REQUEST_FIELDS, GenerationRequest, param_error
from smartdiff.producer.apikeys import ApiKey, ApiKeyStore
from smartdiff.producer.client import Client, FarmError
from smartdiff.producer.webhooks import WebhookDelivery, check_callback_url, delivery_state

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
_IDEMPOTENCY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
# Body fields the gateway handles itself; every other field is a generation parameter.
TOO_MANY_JOBS_RETRY_SECONDS = 5
# FarmError codes of Client.submit -> HTTP status.
_FARM_STATUS = {"INVALID_INPUT": 400, "UNKNOWN_PROFILE": 400, "NO_WORKER": 503}


class ApiError(Exception):
    """An answer in the one error shape: {"error": {"code", "message"}}."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------ OpenAPI models
# For the API description only: requests are checked by pipeline.params.validate_params (the one
# validator the farm has) and the gateway's own field checks, so the messages are the farm's.


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, for programs: INVALID_INPUT, UNAUTHENTICATED, RATE_LIMITED, ...")
    message: str = Field(description="for people: what is wrong and what to do")


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobRequest(GenerationRequest):
    """A job: the profile and a generation request (pipeline.params.GenerationRequest, the farm's one
    request schema: the same fields, limits and messages as the Python client and the worker)."""

    profile: str = Field(description="a profile from GET /v1/profiles", examples=["wan2.1-1.3b-lossless"])
    priority: int = Field(
        DEFAULT_PRIORITY, ge=MIN_PRIORITY, le=MAX_PRIORITY, strict=True, description="9 is the most urgent"
    )
    callback_url: str | None = Field(
        None, description="http(s) URL on an allowed host; receives the final record, signed"
    )
    queue_anyway: bool = Field(
        False, strict=True, description="queue even if no live worker serves the profile"
    )


class WebhookState(BaseModel):
    state: Literal["retrying", "delivered", "failed", "pending"]
    attempts: int
    last_status: int = Field(description="HTTP status of the last attempt; 0 if none came")
    last_error: str | None = None
    next_attempt_at: float | None = None


class JobOut(BaseModel):
    id: str
    state: Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
    profile: str
    stage: str = Field(description="while RUNNING: text_encode, denoise, vae_decode, encode or upload")
    step: int = Field(description="denoising step done")
    steps: int
    attempt: int
    priority: int
    params: dict[str, Any] = Field(description="the generation parameters, every default filled in")
    result: dict[str, Any] = Field(
        description="when SUCCEEDED: bucket, key, size, sha256, width, height, frames, fps, seed, "
        "profile, model, attention, cache, and url (presigned when this answer was made)"
    )
    seconds: dict[str, float] = Field(description="seconds per stage")
    error_code: str
    error_message: str
    worker: str
    created_at: float
    queued_at: float
    started_at: float
    finished_at: float
    updated_at: float
    cancel_requested: bool
    callback_url: str
    upload_pending: str = Field(
        "",
        description="while RUNNING at stage upload and the storage is away: the finished video waits on "
        "its worker, which uploads it as soon as the storage answers (it is never generated again)",
    )
    webhook: WebhookState | None = None


class WorkerOut(BaseModel):
    id: str
    state: str
    device: str | None = None
    gpu: str | None = None
    attention: str | None = None
    jobs_done: int | None = None
    started_at: float | None = None


class ProfileOut(BaseModel):
    name: str
    model: str
    attention: str
    flexcache: list[str]
    live_workers: int
    queue_depth: int = Field(description="messages waiting in the profile's queue (all priorities)")
    workers: list[WorkerOut]


class ProfilesOut(BaseModel):
    profiles: list[ProfileOut]


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] | None = None


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "invalid input (INVALID_INPUT, UNKNOWN_PROFILE)",
        401: "no API key, or an unknown one (UNAUTHENTICATED)",
        403: "the API key was revoked (KEY_REVOKED)",
        404: "no such job for this key (NOT_FOUND)",
        409: "the job is not in a state that allows this (JOB_NOT_SUCCEEDED, JOB_FINISHED)",
        413: "the body is larger than the limit (PAYLOAD_TOO_LARGE)",
        415: "the body is not JSON (UNSUPPORTED_MEDIA_TYPE)",
        422: "the Idempotency-Key was used before with another body (IDEMPOTENCY_KEY_REUSED)",
        429: "too many requests (RATE_LIMITED) or running jobs (TOO_MANY_JOBS); see Retry-After",
        503: "no live worker for the profile (NO_WORKER) or the farm is unreachable (NOT_READY)",
    }
    return {s: {"model": ErrorBody, "description": descriptions[s]} for s in statuses}


_AUTH_ERRORS = (401, 403, 429, 503)


# ------------------------------------------------------------------------------ middleware


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes before anything reads them: by Content-Length at
    once, and by counting for bodies sent without one (chunked)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                answer = error_response(400, "INVALID_INPUT", "Content-Length is not a number")
                await answer(scope, receive, send)
                return
            if int(declared) > self.limit:
                await self._too_large()(scope, receive, send)
                return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised inside the endpoint's body read: the ApiError handler answers it.
                    raise ApiError(413, "PAYLOAD_TOO_LARGE", self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.limit} bytes"

    def _too_large(self) -> JSONResponse:
        return error_response(413, "PAYLOAD_TOO_LARGE", self._message(), {"Connection": "close"})


class Metrics:
    """Requests by route template (never the raw path: ids would explode the label set)."""

    def __init__(self, app: Any, requests: Counter, latency: Histogram):
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


# ------------------------------------------------------------------------------ the gateway


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
        if record.state == SUCCEEDED and record.result.get("key"):
            result = record.result
            out["result"]["url"] = self.client.video_store.presign(result["bucket"], result["key"])
        return out

    def own_record(self, key: ApiKey, job_id: str) -> JobRecord:
        """The job if this key created it; NOT_FOUND otherwise (others' jobs do not exist for it)."""
        record = self.client.store.get(job_id) if _JOB_ID_RE.match(job_id) else None
        if record is None or record.owner != key.id:
            raise ApiError(404, "NOT_FOUND", f"no job {job_id!r} for this API key")
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
                "UNAUTHENTICATED",
                "send an API key as 'Authorization: Bearer <key>' (smartdiff apikey create)",
                {"WWW-Authenticate": "Bearer"},
            )
        key = self.keys.authenticate(credentials.credentials)
        if key is None:
            raise ApiError(401, "UNAUTHENTICATED", "unknown API key", {"WWW-Authenticate": "Bearer"})
        if key.revoked:
            raise ApiError(403, "KEY_REVOKED", f"API key {key.id} was revoked; ask for a new one")
        wait = self.keys.hit(key)
        if wait > 0:
            raise ApiError(
                429,
                "RATE_LIMITED",
                f"more than {key.requests_per_minute} requests in a minute with this key",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return key

    # -- jobs -------------------------------------------------------------------------------------

    def create_job(self, key: ApiKey, body: dict[str, Any], idempotency_key: str | None) -> tuple[int, dict]:
        try:
            body_hash = hashlib.sha256(_canonical(body)).hexdigest()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") would fail later, in Redis
            raise ApiError(400, "INVALID_INPUT", "strings must be valid Unicode (no surrogates)") from None
        profile, priority, callback_url, queue_anyway, params = self._parse(body)
        job_id = uuid.uuid4().hex
        replay = False
        if idempotency_key is not None:
            if not _IDEMPOTENCY_RE.match(idempotency_key):
                raise ApiError(400, "INVALID_INPUT", "Idempotency-Key: 1 to 255 printable ASCII characters")
            held_id, held_hash = self.idempotency.claim(key.id, idempotency_key, job_id, body_hash)
            if held_hash != body_hash:
                raise ApiError(
                    422,
                    "IDEMPOTENCY_KEY_REUSED",
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
                    "TOO_MANY_JOBS",
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
                headers = {"Retry-After": "30"} if error.code == "NO_WORKER" else None
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
            raise ApiError(503, "NOT_READY", "the job's record vanished; try again")
        if not replay:
            self.jobs_created.labels(profile).inc()
        return (200 if replay else 201), self.answer(record)

    def _abandon(self, key: ApiKey, job_id: str) -> None:
        # Redis or the broker failed midway: a record without a queued message would wait forever.
        try:
            self.keys.release_job(key.id, job_id)
            self.client.store.fail_unclaimed(job_id, "NOT_READY", "the job could not be queued; submit again")
        except redis.RedisError:
            pass

    def _parse(self, body: dict[str, Any]) -> tuple[str, Any, str | None, bool, dict[str, Any]]:
        """(profile, priority, callback_url, queue_anyway, generation parameters), by JobRequest;
        Client.submit checks the parameters against the profile's model."""
        try:
            request = JobRequest.model_validate(body)
        except ValidationError as error:
            raise ApiError(400, "INVALID_INPUT", str(param_error(error))) from None
        profile = request.profile
        known = list_profile_names()
        if profile not in known:  # a name, never a path: only the listed profiles exist
            message = f"unknown profile {profile[:100]!r} (known: {', '.join(known)})"
            raise ApiError(400, "UNKNOWN_PROFILE", message)
        callback_url = request.callback_url
        if callback_url is not None:
            if not self.webhooks:
                message = "callback_url: webhooks are off here (SMARTDIFF_WEBHOOK_SECRET unset)"
                raise ApiError(400, "INVALID_INPUT", message)
            try:
                check_callback_url(callback_url, self.settings.webhook_allowed_hosts)
            except ValueError as error:
                raise ApiError(400, "INVALID_INPUT", str(error)) from None
        # null means "the default" for every optional parameter.
        params = request.model_dump(include=set(REQUEST_FIELDS), exclude_none=True)
        return profile, request.priority, callback_url, request.queue_anyway, params

    def cancel(self, key: ApiKey, job_id: str) -> dict[str, Any]:
        record = self.own_record(key, job_id)
        if record.state in (SUCCEEDED, FAILED):
            raise ApiError(409, "JOB_FINISHED", f"job {job_id} already ended {record.state}")
        self.client.store.cancel(job_id)
        return self.answer(self.own_record(key, job_id))

    def video_url(self, key: ApiKey, job_id: str) -> str:
        record = self.own_record(key, job_id)
        if record.state != SUCCEEDED:
            raise ApiError(409, "JOB_NOT_SUCCEEDED", f"job {job_id} is {record.state}; no video (yet)")
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


async def _json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 415 unless it is declared JSON, 400 unless it parses to an object."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        message = "send a JSON body with 'Content-Type: application/json'"
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", message)
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: "[[[[...": nesting deeper than Python's stack
        raise ApiError(400, "INVALID_INPUT", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_INPUT", f"the body must be a JSON object, not {type(body).__name__}")
    return body


# ------------------------------------------------------------------------------ the app


def create_app(settings: FarmSettings | None = None, *, webhook_secret: str | None = None) -> FastAPI:
    """The gateway. ``webhook_secret``: default SMARTDIFF_WEBHOOK_SECRET; empty turns webhooks off."""
    settings = settings or FarmSettings.from_env()
    if webhook_secret is None:
        webhook_secret = os.environ.get("SMARTDIFF_WEBHOOK_SECRET", "")
    gw = Gateway(settings, webhook_secret)
    app = FastAPI(
        title="Smart-Diffusion gateway",
        version=API_VERSION,
        description="Text-to-video jobs on the Smart-Diffusion farm (Wan models). Guide: docs/API.md.",
        lifespan=gw.lifespan,
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,  # operationId: create_job, get_job, ...
    )
    app.state.gateway = gw
    bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey", description="Authorization: Bearer <API key>")

    def api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        return gw.authenticate(credentials)

    # -- errors: one shape, never a framework default ----------------------------------------------

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "header", "path"))
        return error_response(400, "INVALID_INPUT", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}
        return error_response(
            error.status_code,
            codes.get(error.status_code, "HTTP_ERROR"),
            message.get(error.status_code, str(error.detail)),
            dict(error.headers or {}),
        )

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def on_farm_unreachable(request: Request, error: Exception) -> JSONResponse:
        log.warning("farm unreachable: %s", type(error).__name__)
        message = "the farm's Redis is unreachable; try again"
        return error_response(503, "NOT_READY", message, {"Retry-After": "5"})

    @app.exception_handler(StorageError)
    async def on_storage_error(request: Request, error: StorageError) -> JSONResponse:
        return error_response(503, "NOT_READY", str(error), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "INTERNAL", "an unexpected error; it was logged")

    # -- routes --------------------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        status_code=201,
        tags=["jobs"],
        summary="Create a job",
        response_model=None,
        responses={
            201: {"model": JobOut, "description": "created"},
            200: {"model": JobOut, "description": "an Idempotency-Key replay: the job created before"},
            **_errors(400, 413, 415, 422, *_AUTH_ERRORS),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}},
            }
        },
    )
    async def create_job(
        request: Request,
        key: ApiKey = Depends(api_key),
        idempotency_key: str | None = Header(
            None, alias="Idempotency-Key", description="a retried POST with the same key returns the same job"
        ),
    ) -> JSONResponse:
        body = await _json_object(request)
        status, record = await run_in_threadpool(gw.create_job, key, body, idempotency_key)
        return JSONResponse(record, status_code=status, headers={"Location": f"/v1/jobs/{record['id']}"})

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        summary="Read a job",
        response_model=None,
        responses={200: {"model": JobOut}, **_errors(404, *_AUTH_ERRORS)},
    )
    def get_job(job_id: str, key: ApiKey = Depends(api_key)) -> JSONResponse:
        return JSONResponse(gw.answer(gw.own_record(key, job_id)))

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        tags=["jobs"],
        summary="Cancel a job (at once if queued, at the next step if running)",
        response_model=None,
        responses={200: {"model": JobOut}, **_errors(404, 409, *_AUTH_ERRORS)},
    )
    def cancel_job(job_id: str, key: ApiKey = Depends(api_key)) -> JSONResponse:
        return JSONResponse(gw.cancel(key, job_id))

    @app.get(
        "/v1/jobs/{job_id}/video",
        tags=["jobs"],
        summary="Redirect to the video",
        response_class=RedirectResponse,
        status_code=302,
        responses={302: {"description": "Location: a presigned link"}, **_errors(404, 409, *_AUTH_ERRORS)},
    )
    def job_video(job_id: str, key: ApiKey = Depends(api_key)) -> RedirectResponse:
        url = gw.video_url(key, job_id)
        return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})

    @app.get(
        "/v1/profiles",
        tags=["farm"],
        summary="Profiles with their live workers and queue depths",
        response_model=None,
        responses={200: {"model": ProfilesOut}, **_errors(*_AUTH_ERRORS)},
    )
    def profiles(key: ApiKey = Depends(api_key)) -> JSONResponse:
        return JSONResponse({"profiles": gw.profiles()})

    @app.get(
        "/healthz",
        tags=["ops"],
        summary="The process is up",
        response_model=None,
        responses={200: {"model": HealthOut}},
    )
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Redis answers and the bucket is reachable",
        response_model=None,
        responses={200: {"model": HealthOut}, 503: {"model": ErrorBody, "description": "NOT_READY"}},
    )
    def readyz() -> JSONResponse:
        checks = gw.readiness()
        failed = {name: state for name, state in checks.items() if state != "ok"}
        if failed:
            return error_response(503, "NOT_READY", "; ".join(f"{n}: {s}" for n, s in failed.items()))
        return JSONResponse({"status": "ready", "checks": checks})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(gw.registry), media_type=CONTENT_TYPE_LATEST)

    # Outermost first: metrics see every answer, including the body limit's.
    app.add_middleware(BodyLimit, limit=settings.gateway_max_body_bytes)
    app.add_middleware(Metrics, requests=gw.requests, latency=gw.latency)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's description, plus the request model it cannot see (the body is parsed by hand) and
    without its default 422 validation answers (this API answers 400 INVALID_INPUT instead)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request["properties"]["profile"]["enum"] = profiles = list_profile_names()
    components["JobRequest"] = request
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    # A request per profile that its model accepts: a client made from this description can form a
    # valid job for every profile.
    body["examples"] = {
        name: {"summary": f"a job for {name}", "value": example_job(name)} for name in profiles
    }
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path in schema["paths"].values():
        for operation in path.values():
            answer = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in json.dumps(answer):
                del operation["responses"]["422"]
    app.openapi_schema = schema
    return schema


def example_job(profile: str) -> dict[str, Any]:
    """A request that the profile's model accepts, with its own defaults spelled out."""
    sampling = load_profile(profile).model_config.sampling
    return {
        "profile": profile,
        "prompt": "a red ball moving left on a white background",
        "size": sampling.size,
        "frames": sampling.frames,
        "steps": sampling.steps,
        "seed": 42,
        "priority": DEFAULT_PRIORITY,
        "queue_anyway": True,
    }


def openapi_document(app: FastAPI | None = None) -> str:
    """The API description as the repo keeps it (openapi.json): indented, one trailing newline."""
    app = app or create_app(FarmSettings(), webhook_secret="")
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--no-access-log", action="store_true", help="no line per request")
    parser.add_argument(
        "--write-openapi", type=Path, metavar="PATH", help="write the OpenAPI description to PATH and exit"
    )


def run(args: argparse.Namespace) -> int:
    if args.write_openapi:
        args.write_openapi.write_text(openapi_document())
        print(f"wrote {args.write_openapi}")
        return 0
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        # Behind a proxy, X-Forwarded-For is trusted only from these addresses (uvicorn's default).
        proxy_headers=True,
    )
    return 0
