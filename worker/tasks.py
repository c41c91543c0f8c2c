"""The Celery task: a thin shell around ``WorkerService.execute``."""

from __future__ import annotations

from celery import Celery

from smartdiff.farm.celery_app import TASK_NAME
from smartdiff.worker.service import WorkerService


def register(app: Celery, service: WorkerService) -> None:
    @app.task(name=TASK_NAME, bind=True, acks_late=True)
    def generate(self, *args, **kwargs):
        # Any shape of message reaches here: execute() checks it and records why it is refused.
        return service.execute(self.request.id, args, kwargs)
