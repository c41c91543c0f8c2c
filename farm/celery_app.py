"""The Celery app both sides use: JSON only, late acks, prefetch 1, priorities, one queue per profile.

Celery's own tools work against the farm through the module-level ``app`` (settings from the
environment, as everywhere)::

    celery -A smartdiff.farm.celery_app inspect ping | active | stats | registered
    celery -A smartdiff.farm.celery_app control revoke JOB_ID     # our cancel
    celery -A smartdiff.farm.celery_app purge -Q PROFILE          # the jobs' records say PURGED
    celery -A smartdiff.farm.celery_app events                    # or Flower with the same broker

Workers are started with ``smartdiff worker`` (the model is loaded before the first job), not with
``celery worker``. The message contract other services follow is docs/WIRE.md (``farm.wire``).
"""

from __future__ import annotations

from celery import Celery

from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.wire import DEFAULT_PRIORITY, PRIORITY_STEPS


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
        task_default_priority=DEFAULT_PRIORITY,
        task_create_missing_queues=True,
        broker_transport_options={
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            # Redelivery after a crash is our lease and reaper's job (seconds, not this hour);
            # this only bounds how long an unacked message hides.
            "visibility_timeout": 3600,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        # Task events for `celery events` and Flower: sent, received, started, succeeded, failed.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


app = make_celery(FarmSettings.from_env())
