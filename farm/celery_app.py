"""The Celery app both sides use: JSON only, late acks, prefetch 1, priorities, one queue per profile."""

from __future__ import annotations

from celery import Celery

from smartdiff.farm.settings import FarmSettings

TASK_NAME = "smartdiff.generate"
# Users give priority 0..9, higher first. Redis' transport serves 0 first, so we send 9 - priority.
DEFAULT_PRIORITY = 5
MAX_PRIORITY = 9
REQUEUE_PRIORITY = MAX_PRIORITY  # a job taken back from a dead or stopping worker goes first


def transport_priority(priority: int) -> int:
    return MAX_PRIORITY - priority


def make_celery(settings: FarmSettings) -> Celery:
    app = Celery("smartdiff", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # a pickled message is refused, never unpickled
        result_serializer="json",
        task_ignore_result=True,  # job records live in our own Redis hash (farm.records)
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_priority=transport_priority(DEFAULT_PRIORITY),
        task_create_missing_queues=True,
        broker_transport_options={
            "priority_steps": list(range(MAX_PRIORITY + 1)),
            "sep": ":",
            "queue_order_strategy": "priority",
            # Redelivery after a crash is our lease and reaper's job (seconds, not this hour);
            # this only bounds how long an unacked message hides.
            "visibility_timeout": 3600,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app
