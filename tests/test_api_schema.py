"""The HTTP API against its own description: a bounded property-based run of every operation in
openapi.json (schemathesis), no server error, every answer documented and shaped as documented, and
jobs created from the description alone (its per-profile examples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import schemathesis
from farm_helpers import RedisServer
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from smartdiff.farm.records import job_key
from smartdiff.farm.settings import FarmSettings
from smartdiff.producer.api import create_app
from smartdiff.producer.apikeys import ApiKeyStore

# "Come back later" answers the API documents with Retry-After: no live worker for the profile (the
# test runs none), the farm's Redis or storage not ready. Every other 5xx is a failure.
LATER = {"NO_WORKER", "NOT_READY"}


@schemathesis.check
def no_server_error(ctx, response, case) -> None:
    if response.status_code >= 500:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if response.status_code != 503 or code not in LATER:
            raise AssertionError(f"server error {response.status_code}: {response.text[:300]}")


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api(tmp_path_factory, s3_endpoint):
    server = RedisServer(tmp_path_factory.mktemp("api-schema"))
    server.start()
    try:
        settings = FarmSettings(
            broker_url=server.url,
            redis_url=server.url,
            s3_endpoint=s3_endpoint,
            s3_public_endpoint=s3_endpoint,
            s3_bucket="api-schema",
        )
        client = redis.Redis.from_url(server.url, decode_responses=True)
        keys = ApiKeyStore(client)
        secret, key_id = keys.create("schemathesis", requests_per_minute=10**9, max_concurrent_jobs=10**9)
        app = create_app(settings, webhook_secret="")
        yield {"app": app, "redis": client, "secret": secret, "key": key_id.id}
    finally:
        server.stop()


def exercise(strategy, api: dict, examples: int) -> None:
    """Cases drawn from ``strategy`` against the app, each answer checked against the description."""
    headers = {"Authorization": f"Bearer {api['secret']}"}

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


OPERATIONS = [
    f"{method.upper()} {path}"
    for path, item in json.loads((Path(__file__).parent.parent / "openapi.json").read_text())["paths"].items()
    for method in item
]


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_operation_answers_as_its_description_says(api, label):
    schema = schemathesis.openapi.from_asgi("/openapi.json", api["app"])
    (operation,) = [op.ok() for op in schema.get_all_operations() if op.ok().label == label]
    for example in operation.get_strategies_from_examples():  # the documented examples, each once
        exercise(example, api, 1)
    exercise(operation.as_strategy(), api, 25)  # then cases drawn from the description


def test_the_description_alone_creates_jobs(api):
    """Runs after the operations above (same module, later): the examples made real jobs."""
    owned = [
        job_id
        for key in api["redis"].scan_iter(match=job_key("*"))
        if api["redis"].hget(key, "owner") == api["key"] and (job_id := key.removeprefix(job_key("")))
    ]
    assert owned, "no request made from openapi.json created a job"
    assert all(api["redis"].hget(job_key(job_id), "state") == "QUEUED" for job_id in owned)
