"""Structured logs of every farm process (workers and the gateway): one JSON object per line, with
the process's identity, and the job id while a job runs."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

current_job: contextvars.ContextVar[str] = contextvars.ContextVar("current_job", default="")
_PROCESS = {"value": ""}
# Extra fields a log call may pass (``extra={...}``) that the line carries.
_FIELDS = ("stage", "step", "steps", "state", "code", "seconds")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _PROCESS["value"]:
            entry["process"] = _PROCESS["value"]
        job = getattr(record, "job_id", None) or current_job.get()
        if job:
            entry["job_id"] = job
        for key in _FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(process: str, level: str = "INFO") -> None:
    """Every logger of this process to stderr as JSON lines; ``process`` names it in each line
    (a worker's id, or the gateway's)."""
    _PROCESS["value"] = process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # botocore at DEBUG would print request headers; keep library chatter at WARNING.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "kombu", "celery"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
