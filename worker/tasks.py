"""The Celery task: a thin shell around ``WorkerService.execute``. It is the only task a worker
runs: Celery's built-in tasks are unregistered, so a message naming one is refused and recorded."""

from __future__ import annotations

from celery import Celery

from smartdiff.farm.wire import TASK_NAME, transport_priority
from smartdiff.worker.service import WorkerService


def register(app: Celery, service: WorkerService) -> None:
    @app.task(name=TASK_NAME, bind=True, acks_late=True)
    def generate(self, *args, **kwargs):
        # Any shape of message reaches here: execute() checks it and records why it is refused.
        priority = transport_priority((self.request.delivery_info or {}).get("priority"))
        return service.execute(self.request.id, args, kwargs, priority)

    for name in [name for name in app.tasks if name != TASK_NAME]:  # celery.backend_cleanup, ...
        app.tasks.unregister(name)
