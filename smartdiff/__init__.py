"""Smart-Diffusion: Wan text-to-video, fast. The one import name of the project.

``from smartdiff import Client`` is what other services use (``smartdiff.producer``); the pipeline,
kernels, worker and farm are ``smartdiff.pipeline``, ``smartdiff.kernels``, ``smartdiff.worker`` and
``smartdiff.farm``. Kept light on purpose: nothing is imported here until it is asked for, so
``import smartdiff.pipeline.params`` never pulls in Celery, and the client never pulls in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smartdiff.producer.client import Client, FarmError, Job

__all__ = ["Client", "FarmError", "Job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from smartdiff.producer import client

        return getattr(client, name)
    raise AttributeError(f"module 'smartdiff' has no attribute {name!r}")
