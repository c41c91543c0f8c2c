"""Every message Celery refuses is recorded on that job's record.

Celery logs and drops a message it cannot use (undecodable, pickled, unknown task, malformed). A
caller polling that job id must learn why, so each refusal also fails the job's record. Celery
says so through its public signals (``task_rejected``, ``task_unknown``) for all of them but an
undecodable body, for which the consumer's ``on_decode_error`` is overridden (Celery is pinned to
the minor version this is written against; tests/test_celery_contract.py checks the signature).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.signals import task_rejected, task_unknown
from celery.worker.consumer import Consumer as CeleryConsumer

# on_reject(message, reason): what the worker does with a refused message.
RejectFn = Callable[[Any, str], None]


def _ignore(message: Any, reason: str) -> None:
    pass


class Consumer(CeleryConsumer):
    on_reject: RejectFn = staticmethod(_ignore)  # set by record_refusals

    def on_decode_error(self, message, exc):
        super().on_decode_error(message, exc)
        self.on_reject(message, f"the message body could not be decoded: {exc}")


def record_refusals(on_reject: RejectFn) -> None:
    """Send every message Celery refuses to ``on_reject``, with the reason a person can act on."""
    Consumer.on_reject = staticmethod(on_reject)

    def rejected(message: Any = None, exc: Exception | None = None, **_: Any) -> None:
        on_reject(message, "not a task message" if exc is None else f"invalid task message: {str(exc)[:300]}")

    def unknown(message: Any = None, name: str | None = None, **_: Any) -> None:
        on_reject(message, f"unknown task {str(name)[:100]!r}")

    task_rejected.connect(rejected, weak=False)
    task_unknown.connect(unknown, weak=False)
