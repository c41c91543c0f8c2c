"""Structured logs: one JSON object per line, keyed by job id while a job runs."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

current_job: contextvars.ContextVar[str] = contextvars.ContextVar("current_job", default="")
_WORKER_ID = {"value": ""}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _WORKER_ID["value"]:
            entry["worker"] = _WORKER_ID["value"]
        job = getattr(record, "job_id", None) or current_job.get()
        if job:
            entry["job_id"] = job
        for key in ("stage", "step", "steps", "state", "code", "seconds"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(worker_id: str, level: str = "INFO") -> None:
    _WORKER_ID["value"] = worker_id
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # botocore at DEBUG would print request headers; keep library chatter at WARNING.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "kombu", "celery"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
