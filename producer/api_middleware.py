"""ASGI middleware of the gateway: the body size limit, and the request metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram

from smartdiff.farm.codes import ErrorCode
from smartdiff.producer.api_models import ApiError, error_response


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes before anything reads them: by Content-Length at
    once, and by counting for bodies sent without one (chunked)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                answer = error_response(400, ErrorCode.INVALID_INPUT, "Content-Length is not a number")
                await answer(scope, receive, send)
                return
            if int(declared) > self.limit:
                await self._too_large()(scope, receive, send)
                return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised inside the endpoint's body read: the ApiError handler answers it.
                    raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.limit} bytes"

    def _too_large(self) -> JSONResponse:
        return error_response(413, ErrorCode.PAYLOAD_TOO_LARGE, self._message(), {"Connection": "close"})


class Metrics:
    """Requests by route template (never the raw path: ids would explode the label set)."""

    def __init__(self, app: Any, requests: Counter, latency: Histogram):
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
