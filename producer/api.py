"""``smartdiff gateway``: the farm over HTTP, for services that do not speak Python.

    POST /v1/jobs                  create a job (Idempotency-Key makes a retried POST return the same job)
    GET  /v1/jobs/{id}             its record: state, stage, progress, result with a fresh presigned link
    POST /v1/jobs/{id}/cancel      cancel it
    GET  /v1/jobs/{id}/video       302 to the video (presigned link)
    GET  /v1/profiles              profiles with their live workers and queue depths
    GET  /healthz, /readyz         process up; Redis and the bucket reachable
    GET  /metrics                  Prometheus
    GET  /openapi.json, /docs      the API description (also openapi.json in the repo)

Every /v1 call needs ``Authorization: Bearer <API key>`` (``smartdiff apikey create``); a job is
visible only to the key that created it. Every error is ``{"error": {"code": ..., "message": ...}}``.
docs/API.md is the user's guide. Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import redis
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from smartdiff.farm.codes import ErrorCode
from smartdiff.farm.logs import setup_logging
from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.storage import StorageError
from smartdiff.farm.wire import DEFAULT_PRIORITY
from smartdiff.pipeline.config import list_profile_names, load_profile
from smartdiff.producer.api_middleware import BodyLimit, Metrics
from smartdiff.producer.api_models import (
    API_VERSION,
    AUTH_ERRORS,
    ApiError,
    ErrorBody,
    HealthOut,
    JobOut,
    JobRequest,
    ProfilesOut,
    error_answers,
    error_response,
)
from smartdiff.producer.apikeys import ApiKey
from smartdiff.producer.gateway import Gateway, json_body

log = logging.getLogger(__name__)


def create_app(settings: FarmSettings | None = None, *, webhook_secret: str | None = None) -> FastAPI:
    """The gateway. ``webhook_secret``: default SMARTDIFF_WEBHOOK_SECRET; empty turns webhooks off."""
    settings = settings or FarmSettings.from_env()
    if webhook_secret is None:
        webhook_secret = os.environ.get("SMARTDIFF_WEBHOOK_SECRET", "")
    gw = Gateway(settings, webhook_secret)
    app = FastAPI(
        title="Smart-Diffusion gateway",
        version=API_VERSION,
        description="Text-to-video jobs on the Smart-Diffusion farm (Wan models). Guide: docs/API.md.",
        lifespan=gw.lifespan,
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,  # operationId: create_job, get_job, ...
    )
    app.state.gateway = gw
    bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey", description="Authorization: Bearer <API key>")

    def api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        return gw.authenticate(credentials)

    # -- errors: one shape, never a framework default ----------------------------------------------

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "header", "path"))
        return error_response(400, ErrorCode.INVALID_INPUT, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}
        return error_response(
            error.status_code,
            codes.get(error.status_code, ErrorCode.HTTP_ERROR),
            message.get(error.status_code, str(error.detail)),
            dict(error.headers or {}),
        )

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def on_farm_unreachable(request: Request, error: Exception) -> JSONResponse:
        log.warning("farm unreachable: %s", type(error).__name__)
        message = "the farm's Redis is unreachable; try again"
        return error_response(503, ErrorCode.NOT_READY, message, {"Retry-After": "5"})

    @app.exception_handler(StorageError)
    async def on_storage_error(request: Request, error: StorageError) -> JSONResponse:
        return error_response(503, ErrorCode.NOT_READY, str(error), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, ErrorCode.INTERNAL, "an unexpected error; it was logged")

    # -- routes --------------------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        status_code=201,
        tags=["jobs"],
        summary="Create a job",
        response_model=None,
        responses={
            201: {"model": JobOut, "description": "created"},
            200: {"model": JobOut, "description": "an Idempotency-Key replay: the job created before"},
            **error_answers(400, 413, 415, 422, *AUTH_ERRORS),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}},
            }
        },
    )
    async def create_job(
        request: Request,
        key: ApiKey = Depends(api_key),
        idempotency_key: str | None = Header(
            None, alias="Idempotency-Key", description="a retried POST with the same key returns the same job"
        ),
    ) -> JSONResponse:
        body = await json_body(request)
        status, record = await run_in_threadpool(gw.create_job, key, body, idempotency_key)
        return JSONResponse(record, status_code=status, headers={"Location": f"/v1/jobs/{record['id']}"})

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        summary="Read a job",
        response_model=None,
        responses={200: {"model": JobOut}, **error_answers(404, *AUTH_ERRORS)},
    )
    def get_job(job_id: str, key: ApiKey = Depends(api_key)) -> JSONResponse:
        return JSONResponse(gw.answer(gw.own_record(key, job_id)))

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        tags=["jobs"],
        summary="Cancel a job (at once if queued, at the next step if running)",
        response_model=None,
        responses={200: {"model": JobOut}, **error_answers(404, 409, *AUTH_ERRORS)},
    )
    def cancel_job(job_id: str, key: ApiKey = Depends(api_key)) -> JSONResponse:
        return JSONResponse(gw.cancel(key, job_id))

    @app.get(
        "/v1/jobs/{job_id}/video",
        tags=["jobs"],
        summary="Redirect to the video",
        response_class=RedirectResponse,
        status_code=302,
        responses={
            302: {"description": "Location: a presigned link"},
            **error_answers(404, 409, *AUTH_ERRORS),
        },
    )
    def job_video(job_id: str, key: ApiKey = Depends(api_key)) -> RedirectResponse:
        url = gw.video_url(key, job_id)
        return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})

    @app.get(
        "/v1/profiles",
        tags=["farm"],
        summary="Profiles with their live workers and queue depths",
        response_model=None,
        responses={200: {"model": ProfilesOut}, **error_answers(*AUTH_ERRORS)},
    )
    def profiles(key: ApiKey = Depends(api_key)) -> JSONResponse:
        return JSONResponse({"profiles": gw.profiles()})

    @app.get(
        "/healthz",
        tags=["ops"],
        summary="The process is up",
        response_model=None,
        responses={200: {"model": HealthOut}},
    )
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Redis answers and the bucket is reachable",
        response_model=None,
        responses={200: {"model": HealthOut}, 503: {"model": ErrorBody, "description": ErrorCode.NOT_READY}},
    )
    def readyz() -> JSONResponse:
        checks = gw.readiness()
        failed = {name: state for name, state in checks.items() if state != "ok"}
        if failed:
            return error_response(503, ErrorCode.NOT_READY, "; ".join(f"{n}: {s}" for n, s in failed.items()))
        return JSONResponse({"status": "ready", "checks": checks})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(gw.registry), media_type=CONTENT_TYPE_LATEST)

    # Outermost first: metrics see every answer, including the body limit's.
    app.add_middleware(BodyLimit, limit=settings.gateway_max_body_bytes)
    app.add_middleware(Metrics, requests=gw.requests, latency=gw.latency)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's description, plus the request model it cannot see (the body is parsed by hand) and
    without its default 422 validation answers (this API answers 400 INVALID_INPUT instead)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request["properties"]["profile"]["enum"] = profiles = list_profile_names()
    components["JobRequest"] = request
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    # A request per profile that its model accepts: a client made from this description can form a
    # valid job for every profile.
    body["examples"] = {
        name: {"summary": f"a job for {name}", "value": example_job(name)} for name in profiles
    }
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path in schema["paths"].values():
        for operation in path.values():
            answer = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in json.dumps(answer):
                del operation["responses"]["422"]
    app.openapi_schema = schema
    return schema


def example_job(profile: str) -> dict[str, Any]:
    """A request that the profile accepts, with its own sampling defaults spelled out."""
    config = load_profile(profile)
    sampling = config.sampling_for(config.model_config)
    return {
        "profile": profile,
        "prompt": "a red ball moving left on a white background",
        "size": sampling.size,
        "frames": sampling.frames,
        "steps": sampling.steps,
        "seed": 42,
        "priority": DEFAULT_PRIORITY,
        "queue_anyway": True,
    }


def openapi_document(app: FastAPI | None = None) -> str:
    """The API description as the repo keeps it (openapi.json): indented, one trailing newline."""
    app = app or create_app(FarmSettings(), webhook_secret="")
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--no-access-log", action="store_true", help="no line per request")
    parser.add_argument(
        "--write-openapi", type=Path, metavar="PATH", help="write the OpenAPI description to PATH and exit"
    )


def run(args: argparse.Namespace) -> int:
    if args.write_openapi:
        args.write_openapi.write_text(openapi_document())
        print(f"wrote {args.write_openapi}")
        return 0
    import uvicorn

    # The farm's one log format (farm.logs): uvicorn's own loggers, access lines included, go to it.
    setup_logging(f"gateway-{socket.gethostname()}-{os.getpid()}", args.log_level)
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,
        access_log=not args.no_access_log,
        # Behind a proxy, X-Forwarded-For is trusted only from these addresses (uvicorn's default).
        proxy_headers=True,
    )
    return 0
