"""Celery's consumer, recording every message it refuses on that job's record.

Celery logs and drops a message it cannot use (undecodable, pickled, unknown task, malformed). A
caller polling that job id must learn why, so each refusal also fails the job's record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer


def _ignore(message: Any, reason: str) -> None:
    pass


class Consumer(CeleryConsumer):
    # Set by the worker at start: on_reject(message, reason).
    on_reject: Callable[[Any, str], None] = staticmethod(_ignore)

    def on_decode_error(self, message, exc):
        super().on_decode_error(message, exc)
        self.on_reject(message, f"the message body could not be decoded: {exc}")

    def on_unknown_message(self, body, message):
        super().on_unknown_message(body, message)
        self.on_reject(message, "not a task message")

    def on_unknown_task(self, body, message, exc):
        super().on_unknown_task(body, message, exc)
        self.on_reject(message, f"unknown task {str(message.headers.get('task'))[:100]!r}")

    def on_invalid_task(self, body, message, exc):
        super().on_invalid_task(body, message, exc)
        self.on_reject(message, f"invalid task message: {str(exc)[:300]}")
