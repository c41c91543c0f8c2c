"""The HTTP API's shapes: the one error form, the request (pipeline.params.GenerationRequest and
the gateway's own fields), the answers, and what the OpenAPI description says of them.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from smartdiff.farm.codes import ErrorCode, JobState
from smartdiff.farm.wire import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from smartdiff.pipeline.params import GenerationRequest

API_VERSION = "1.0.0"


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
    code: ErrorCode = Field(description="stable, for programs")
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
    state: JobState
    profile: str
    stage: str = Field(description="while RUNNING: text_encode, denoise, vae_decode, encode or upload")
    step: int = Field(description="denoising step done")
    steps: int
    attempt: int
    priority: int
    params: dict[str, Any] = Field(description="the generation parameters, every default filled in")
    result: dict[str, Any] = Field(
        description="when SUCCEEDED: bucket, key, size, sha256, width, height, frames, fps, seed, "
        "profile, model, attention, gemm (fp8 or the model dtype), cache, attention_sparsity, "
        "loras (file, sha256 prefix, strength, expert "
        "of each LoRA merged into the model) and url (presigned when this answer was made)"
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


def error_answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
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


AUTH_ERRORS = (401, 403, 429, 503)
