"""The words the farm answers with: a job's states and the error codes of records and the HTTP API.

Stable strings (StrEnum: each member is its own value) for programs to branch on; the messages
beside them are for people. Torch-free: producers import it.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"  # with a stage (text_encode, denoise, vae_decode, encode, upload) and a step
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class ErrorCode(StrEnum):
    # Why a job ended other than SUCCEEDED (its record's error_code), or why a request was refused.
    INVALID_INPUT = "INVALID_INPUT"  # a parameter the model or the profile cannot honour
    INVALID_MESSAGE = "INVALID_MESSAGE"  # a queue message that is not a usable task message
    UNKNOWN_PROFILE = "UNKNOWN_PROFILE"
    NO_WORKER = "NO_WORKER"  # no live worker serves the profile (submit again with queue_anyway)
    NOT_FOUND = "NOT_FOUND"
    TIMEOUT = "TIMEOUT"  # waiting for a job took longer than the caller allowed
    CANCELLED = "CANCELLED"
    PURGED = "PURGED"  # its message was purged from the queue
    WORKER_LOST = "WORKER_LOST"  # its workers died on every attempt
    STORAGE_ERROR = "STORAGE_ERROR"
    WOULD_NOT_FIT = "WOULD_NOT_FIT"  # refused before it started: not enough GPU memory
    GPU_OUT_OF_MEMORY = "GPU_OUT_OF_MEMORY"
    INTERNAL_ERROR = "INTERNAL_ERROR"  # a bug of ours, logged
    NOT_READY = "NOT_READY"  # the farm's Redis or storage is not reachable now: try again
    # The HTTP API's own answers.
    UNAUTHENTICATED = "UNAUTHENTICATED"
    KEY_REVOKED = "KEY_REVOKED"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_JOBS = "TOO_MANY_JOBS"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    JOB_NOT_SUCCEEDED = "JOB_NOT_SUCCEEDED"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    HTTP_ERROR = "HTTP_ERROR"
    INTERNAL = "INTERNAL"  # the gateway's own unexpected error, logged
    JOB_FINISHED = "JOB_FINISHED"  # cancelling a job that already ended
