"""The HTTP gateway against the real app: uvicorn on loopback, a private Redis, moto's S3, a real
worker process on the tiny model, and a webhook receiver on loopback. Talks HTTP with httpx."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from farm_helpers import RedisServer, WorkerProcess, farm_env, free_port, wait_for

from smartdiff.cli import main as smartdiff_main
from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.storage import VideoStore
from smartdiff.farm.wire import priority_lists
from smartdiff.pipeline.params import GenerationParams
from smartdiff.producer.api import create_app, openapi_document
from smartdiff.producer.api_models import JobRequest
from smartdiff.producer.apikeys import ApiKeyStore
from smartdiff.producer.webhooks import verify_signature

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "whsec-test-4f1d2c9b"
AWS_SECRET = "farm-test-secret-7f3a9c"
# No worker serves this profile in these tests: jobs queued on it stay QUEUED.
IDLE_PROFILE = "wan2.1-1.3b-lossless"


class GatewayServer:
    """uvicorn serving the app in a thread, on a free loopback port."""

    def __init__(self, app):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="gateway")

    def start(self) -> GatewayServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the gateway to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class Receiver:
    """A webhook receiver on loopback that answers 500 to the first `fail_first` deliveries."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False):
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.deliveries: list[tuple[dict[str, str], bytes, float]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.deliveries.append((dict(self.headers), body, time.time()))
                    fail = receiver.always_fail or len(receiver.deliveries) <= receiver.fail_first
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Env:
    url: str
    http: httpx.Client
    redis: redis.Redis
    keys: ApiKeyStore
    app: object
    worker: WorkerProcess
    redis_url: str

    def key(self, **limits) -> dict[str, str]:
        limits.setdefault("requests_per_minute", 100_000)
        secret, _ = self.keys.create(f"test-{uuid.uuid4().hex[:6]}", **limits)
        return {"Authorization": f"Bearer {secret}"}

    def queued(self, profile: str = IDLE_PROFILE) -> int:
        return sum(self.redis.llen(key) for key in priority_lists(profile))


@pytest.fixture(scope="module")
def gw(tmp_path_factory, s3_endpoint, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("gateway")
    redis_server = RedisServer(tmp)
    redis_server.start()
    bucket = f"gw-{uuid.uuid4().hex[:10]}"
    env = farm_env(
        redis_server.url, s3_endpoint, tiny_checkpoint.parent, tmp / "work", SMARTDIFF_S3_BUCKET=bucket
    )
    worker = server = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
                mp.setenv(name, env[name])
            settings = FarmSettings(
                broker_url=redis_server.url,
                redis_url=redis_server.url,
                s3_endpoint=s3_endpoint,
                s3_public_endpoint=s3_endpoint,
                s3_bucket=bucket,
                worker_ttl_seconds=5,
                webhook_allowed_hosts=("127.0.0.1",),
                webhook_max_attempts=3,
                webhook_backoff_seconds=0.2,
                webhook_timeout_seconds=2,
            )
            # The bucket first: a worker checks it at start and refuses to run without it.
            VideoStore(settings).ensure_bucket()
            # Started early: it loads the model while the other tests run; the whole flow waits for it.
            worker = WorkerProcess(env, tmp / "worker.log").start()
            app = create_app(settings, webhook_secret=WEBHOOK_SECRET)
            server = GatewayServer(app).start()
            client = redis.Redis.from_url(redis_server.url, decode_responses=True)
            with httpx.Client(base_url=server.url, timeout=30) as http:
                yield Env(server.url, http, client, ApiKeyStore(client), app, worker, redis_server.url)
    finally:
        if server is not None:
            server.stop()
        if worker is not None:
            worker.stop()
        redis_server.stop()


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def job_body(**extra) -> dict:
    return {"profile": IDLE_PROFILE, "prompt": "a red ball", "queue_anyway": True, **extra}


# ---------------------------------------------------------------------------------------- basics


def test_health_readiness_and_metrics(gw):
    assert gw.http.get("/healthz").json()["status"] == "ok"
    ready = gw.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}
    gw.http.get("/v1/profiles")  # a 401, counted
    text = gw.http.get("/metrics").text
    assert 'smartdiff_gateway_requests_total{method="GET",route="/v1/profiles",status="401"}' in text
    assert "smartdiff_gateway_request_seconds_bucket" in text
    assert f'smartdiff_queue_depth{{profile="{IDLE_PROFILE}"}}' in text


def test_the_gateway_logs_in_the_farms_one_format(gw, tmp_path):
    """JSON lines as the workers write them, uvicorn's access lines included."""
    import os
    import subprocess

    from smartdiff.cli import python_module_command

    port = free_port()
    env = {**os.environ, "SMARTDIFF_BROKER_URL": gw.redis_url, "SMARTDIFF_S3_ENDPOINT": "http://127.0.0.1:1"}
    log = tmp_path / "gateway.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            python_module_command("smartdiff", "gateway", "--port", str(port)),
            env=env,
            stderr=out,
            stdout=out,
        )
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        wait_for(lambda: _answers(url), 60, "the gateway to answer")
    finally:
        server.terminate()
        server.wait(20)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg", "process"} <= set(line) for line in lines)
    assert all(line["process"].startswith("gateway-") for line in lines)
    assert any(line["logger"] == "uvicorn.access" and "/healthz" in line["msg"] for line in lines)
    assert not [text for text in log.read_text().splitlines() if text.strip() and not text.startswith("{")]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_openapi_in_the_repo_is_what_the_app_serves(gw):
    in_repo = json.loads((REPO / "openapi.json").read_text())
    assert in_repo == json.loads(json.dumps(gw.app.openapi())), (
        "regenerate: smartdiff gateway --write-openapi openapi.json"
    )
    assert gw.http.get("/openapi.json").json() == in_repo
    assert json.loads(openapi_document()) == in_repo
    # The documented request is exactly what the gateway and validate_params accept.
    params = {f.name for f in fields(GenerationParams)} | {"size"}
    assert set(JobRequest.model_fields) == params | {"profile", "priority", "callback_url", "queue_anyway"}
    paths = in_repo["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/video"} <= set(
        paths
    )
    assert "HTTPValidationError" not in json.dumps(in_repo)


# ---------------------------------------------------------------------------------------- auth


def test_authentication_failures_and_key_commands(gw, monkeypatch, capsys):
    monkeypatch.setenv("SMARTDIFF_BROKER_URL", gw.redis_url)
    assert (
        smartdiff_main(["apikey", "create", "--name", "billing", "--requests-per-minute", "1000", "--json"])
        == 0
    )
    created = json.loads(capsys.readouterr().out)
    secret, key_id = created["key"], created["id"]
    headers = {"Authorization": f"Bearer {secret}"}
    assert gw.http.get("/v1/profiles", headers=headers).status_code == 200

    missing = gw.http.get("/v1/profiles")
    assert_error(missing, 401, "UNAUTHENTICATED")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    for value in (
        "Bearer sdk_" + "x" * 43,  # well formed, unknown
        "Bearer " + secret[:-1],
        "Basic " + secret,
        "Bearer",
        "bearer  x",
        secret,
    ):
        assert_error(gw.http.get("/v1/profiles", headers={"Authorization": value}), 401, "UNAUTHENTICATED")

    # The key is stored only as its hash, and never shown again.
    dump = json.dumps({k: gw.redis.dump(k).hex() for k in gw.redis.keys("*")})
    assert secret not in dump and secret.encode().hex() not in dump
    assert gw.redis.exists(f"smartdiff:apikey:{hashlib.sha256(secret.encode()).hexdigest()}")
    assert smartdiff_main(["apikey", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "billing" in listing and secret not in listing

    job = gw.http.post("/v1/jobs", headers=headers, json=job_body())
    assert job.status_code == 201 and secret not in job.text
    # Another key cannot see, cancel or download it.
    other = gw.key()
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/video")):
        response = gw.http.request(method, f"/v1/jobs/{job.json()['id']}{path}", headers=other)
        assert_error(response, 404, "NOT_FOUND")

    assert smartdiff_main(["apikey", "revoke", key_id]) == 0
    assert smartdiff_main(["apikey", "revoke", "no-such-key"]) == 1
    capsys.readouterr()
    assert_error(gw.http.get("/v1/profiles", headers=headers), 403, "KEY_REVOKED")
    assert_error(gw.http.get(f"/v1/jobs/{job.json()['id']}", headers=headers), 403, "KEY_REVOKED")


# ---------------------------------------------------------------------------------------- jobs


def test_idempotent_retries_create_one_job(gw):
    headers = gw.key()
    before, records_before = gw.queued(), len(gw.redis.keys("smartdiff:job:*"))
    idem = {**headers, "Idempotency-Key": f"order-{uuid.uuid4()}"}
    body = job_body(seed=7, priority=3)
    first = gw.http.post("/v1/jobs", headers=idem, json=body)
    assert first.status_code == 201, first.text
    assert first.headers["Location"] == f"/v1/jobs/{first.json()['id']}"
    # Retries, some at the same time: the same job every time.
    answers: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: answers.append(gw.http.post("/v1/jobs", headers=idem, json=body)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The same body with its fields in another order and other spacing is the same body.
    reordered = json.dumps(dict(reversed(body.items())), indent=1)
    answers.append(
        gw.http.post("/v1/jobs", headers={**idem, "Content-Type": "application/json"}, content=reordered)
    )
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    assert {a.json()["id"] for a in answers} == {first.json()["id"]}
    assert gw.queued() == before + 1 and len(gw.redis.keys("smartdiff:job:*")) == records_before + 1

    # The same key with another body is refused; nothing is queued.
    other = gw.http.post("/v1/jobs", headers=idem, json=job_body(seed=8, priority=3))
    assert_error(other, 422, "IDEMPOTENCY_KEY_REUSED")
    # Keys are scoped per API key: another caller's identical key is another job.
    elsewhere = gw.http.post(
        "/v1/jobs", headers={**gw.key(), "Idempotency-Key": idem["Idempotency-Key"]}, json=body
    )
    assert elsewhere.status_code == 201 and elsewhere.json()["id"] != first.json()["id"]
    assert gw.queued() == before + 2
    # A request that failed does not hold its key: the corrected retry goes through.
    retry_key = {**headers, "Idempotency-Key": "fix-and-retry"}
    assert_error(gw.http.post("/v1/jobs", headers=retry_key, json=job_body(steps=0)), 400, "INVALID_INPUT")
    assert gw.http.post("/v1/jobs", headers=retry_key, json=job_body(steps=2)).status_code == 201


def test_rate_limit_per_key(gw):
    headers = gw.key(requests_per_minute=3)
    for _ in range(3):
        assert gw.http.get("/v1/profiles", headers=headers).status_code == 200
    limited = gw.http.get("/v1/profiles", headers=headers)
    assert_error(limited, 429, "RATE_LIMITED")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert gw.http.get("/v1/profiles", headers=gw.key()).status_code == 200  # other keys are not affected


def test_concurrent_jobs_limit_per_key(gw):
    headers = gw.key(max_concurrent_jobs=2)
    ids = [gw.http.post("/v1/jobs", headers=headers, json=job_body()).json()["id"] for _ in range(2)]
    third = gw.http.post("/v1/jobs", headers=headers, json=job_body())
    assert_error(third, 429, "TOO_MANY_JOBS")
    assert int(third.headers["Retry-After"]) >= 1
    cancelled = gw.http.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
    assert gw.http.post("/v1/jobs", headers=headers, json=job_body()).status_code == 201


def test_body_size_limit(gw):
    headers = {**gw.key(), "Content-Type": "application/json"}
    big = json.dumps(job_body(prompt="x" * 70_000)).encode()
    assert_error(gw.http.post("/v1/jobs", headers=headers, content=big), 413, "PAYLOAD_TOO_LARGE")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 8192

    assert_error(gw.http.post("/v1/jobs", headers=headers, content=chunks()), 413, "PAYLOAD_TOO_LARGE")


def test_no_worker_and_unknown_profile(gw):
    headers = gw.key()
    no_worker = gw.http.post(
        "/v1/jobs", headers=headers, json={"profile": "wan2.1-14b-lossless", "prompt": "x"}
    )
    assert_error(no_worker, 503, "NO_WORKER")
    assert_error(
        gw.http.post("/v1/jobs", headers=headers, json=job_body(profile="nope")), 400, "UNKNOWN_PROFILE"
    )
    assert_error(
        gw.http.post("/v1/jobs", headers=headers, json=job_body(profile="../models/tiny")),
        400,
        "UNKNOWN_PROFILE",
    )


def test_garbage_is_answered_with_codes_never_500(gw):
    headers = gw.key()
    as_json = {**headers, "Content-Type": "application/json"}
    job_id = gw.http.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]
    cases: list[tuple[str, str, dict, int]] = [
        # wrong methods
        ("GET", "/v1/jobs", {"headers": headers}, 405),
        ("PUT", "/v1/jobs", {"headers": headers}, 405),
        ("DELETE", f"/v1/jobs/{job_id}", {"headers": headers}, 405),
        ("GET", f"/v1/jobs/{job_id}/cancel", {"headers": headers}, 405),
        ("POST", f"/v1/jobs/{job_id}", {"headers": headers}, 405),
        ("POST", "/v1/profiles", {"headers": headers}, 405),
        ("POST", "/healthz", {}, 405),
        ("PATCH", "/metrics", {}, 405),
        # routes and ids
        ("GET", "/v2/jobs", {"headers": headers}, 404),
        ("GET", "/", {}, 404),
        ("GET", "/v1/jobs/short", {"headers": headers}, 404),
        ("GET", "/v1/jobs/" + "a" * 65, {"headers": headers}, 404),
        ("GET", "/v1/jobs/%00%ff%fe", {"headers": headers}, 404),
        ("GET", "/v1/jobs/..%2F..%2Fetc", {"headers": headers}, 404),
        ("GET", "/v1/jobs/ünïcødé-id-123", {"headers": headers}, 404),
        ("GET", "/v1/jobs/smartdiff:job:x", {"headers": headers}, 404),
        ("POST", "/v1/jobs/" + uuid.uuid4().hex + "/cancel", {"headers": headers}, 404),
        ("GET", "/v1/jobs/" + uuid.uuid4().hex + "/video", {"headers": headers}, 404),
        ("GET", f"/v1/jobs/{job_id}/video", {"headers": headers}, 409),
        # bodies
        ("POST", "/v1/jobs", {"headers": headers}, 415),
        ("POST", "/v1/jobs", {"headers": headers, "content": b'{"profile": "tiny"}'}, 415),
        ("POST", "/v1/jobs", {"headers": {**headers, "Content-Type": "text/plain"}, "content": b"{}"}, 415),
        (
            "POST",
            "/v1/jobs",
            {"headers": {**headers, "Content-Type": "multipart/form-data"}, "content": b"x"},
            415,
        ),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b""}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"{"}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"{'profile': 'tiny'}"}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"[]"}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"[1, 2]"}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"null"}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"42"}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b'"text"'}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"\xff\xfe\x00garbage"}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"[" * 50_000}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b'{"a":' * 10_000}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b"[" * 70_000}, 413),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b'{"profile": "tiny", "steps": NaN}'}, 400),
        ("POST", "/v1/jobs", {"headers": as_json, "content": b'{"profile": "tiny", "steps": Infinity}'}, 400),
        (
            "POST",
            "/v1/jobs",
            {"headers": as_json, "content": b'{"profile": "tiny", "prompt": "\\ud800"}'},
            400,
        ),
        # headers
        ("POST", "/v1/jobs", {"headers": {**headers, "Idempotency-Key": "x" * 300}, "json": job_body()}, 400),
        (
            "POST",
            "/v1/jobs",
            {"headers": {**headers, "Idempotency-Key": "with space"}, "json": job_body()},
            400,
        ),
        ("POST", "/v1/jobs", {"headers": {**headers, "Idempotency-Key": ""}, "json": job_body()}, 400),
        (
            "POST",
            "/v1/jobs",
            {"headers": {**headers, "Idempotency-Key": "ключ".encode()}, "json": job_body()},
            400,
        ),
        ("GET", "/v1/profiles", {"headers": {"Authorization": b"Bearer \xff\xfe"}}, 401),
        ("GET", "/v1/profiles", {"headers": {"Authorization": "Bearer ä€".encode()}}, 401),
        ("GET", "/v1/profiles", {"headers": {"Authorization": "Bearer " + "x" * 5000}}, 401),
    ]
    wrong = [
        {},
        {"prompt": "x"},
        {"profile": None, "prompt": "x"},
        {"profile": 5, "prompt": "x"},
        {"profile": ["tiny"], "prompt": "x"},
        {"profile": {"a": 1}, "prompt": "x"},
        job_body(prompt=None),
        job_body(prompt=5),
        job_body(prompt=["a"]),
        job_body(prompt=""),
        job_body(prompt="x" * 2001),
        job_body(prompt="a\x00b"),
        job_body(steps="many"),
        job_body(steps=1e308),
        job_body(steps=-1),
        job_body(steps=2.5),
        job_body(steps=True),
        job_body(steps={"n": 1}),
        job_body(frames=80),
        job_body(frames=[81]),
        job_body(seed=-1),
        job_body(seed=2**70),
        job_body(seed="42"),
        job_body(size="axb"),
        job_body(size=832),
        job_body(size="832x480", width=832),
        job_body(width=832),
        job_body(width="832", height=480),
        job_body(guidance=31),
        job_body(shift=0),
        job_body(solver="ddim"),
        job_body(solver=["unipc"]),
        job_body(flexcache="magic"),
        job_body(flexcache={"x": 1}),
        job_body(teacache_threshold=0.1),
        job_body(priority=10),
        job_body(priority=-1),
        job_body(priority="5"),
        job_body(priority=True),
        job_body(priority=5.5),
        job_body(queue_anyway="yes"),
        job_body(queue_anyway=1),
        job_body(callback_url=5),
        job_body(callback_url=""),
        job_body(callback_url="javascript:alert(1)"),
        job_body(callback_url="file:///etc/passwd"),
        job_body(callback_url="http://127.0.0.1:99999/x"),
        job_body(callback_url="http://[::1/x"),
        job_body(callback_url="http://user:pw@127.0.0.1/x"),
        job_body(callback_url="http://127.0.0.1/a b"),
        job_body(unknown_field=1),
        job_body(job_id="myownid123"),
        job_body(owner="someone-else"),
        job_body(params={"steps": 4}),
        job_body(**{"": 1}),
        job_body(**{"__class__": 1}),
    ]
    cases += [("POST", "/v1/jobs", {"headers": headers, "json": body}, 400) for body in wrong]
    for method, path, kwargs, expected in cases:
        response = gw.http.request(method, path, **kwargs)
        assert response.status_code < 500, (method, path, kwargs, response.text)
        assert response.headers["content-type"].startswith("application/json"), (path, response.text)
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert response.status_code == expected, (method, path, str(kwargs)[:200], response.text)
        assert "Traceback" not in response.text and AWS_SECRET not in response.text


def test_an_unreachable_redis_is_503_not_500(s3_endpoint):
    from fastapi.testclient import TestClient

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = FarmSettings(
        broker_url=dead, redis_url=dead, s3_endpoint=s3_endpoint, s3_bucket="no-such-bucket"
    )
    with TestClient(create_app(settings, webhook_secret="")) as client:
        assert client.get("/healthz").status_code == 200
        ready = assert_error(client.get("/readyz"), 503, "NOT_READY")
        assert "redis" in ready["error"]["message"] and "storage" in ready["error"]["message"]
        headers = {"Authorization": "Bearer sdk_" + "x" * 43}
        answer = client.get("/v1/profiles", headers=headers)
        assert_error(answer, 503, "NOT_READY")
        assert answer.headers["Retry-After"] == "5"


# ---------------------------------------------------------------------------------------- webhooks


def signature_ok(headers: dict[str, str], body: bytes) -> bool:
    """Checked by hand here, as a receiver in another language would."""
    fields = dict(part.split("=", 1) for part in headers["X-Smartdiff-Signature"].split(","))
    expected = hmac.new(
        WEBHOOK_SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 60


def test_webhook_is_signed_and_retried_until_delivered(gw):
    receiver = Receiver(fail_first=2)
    try:
        headers = gw.key()
        job = gw.http.post("/v1/jobs", headers=headers, json=job_body(callback_url=receiver.url)).json()
        assert job["callback_url"] == receiver.url and job["webhook"]["state"] == "pending"
        gw.http.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)  # a final state: CANCELLED
        wait_for(lambda: len(receiver.deliveries) >= 3, 60, "three deliveries")
        time.sleep(0.5)
        assert len(receiver.deliveries) == 3
        for n, (sent, body, _) in enumerate(receiver.deliveries, start=1):
            assert signature_ok(sent, body) and verify_signature(
                WEBHOOK_SECRET, sent["X-Smartdiff-Signature"], body
            )
            assert not verify_signature("another-secret", sent["X-Smartdiff-Signature"], body)
            assert sent["X-Smartdiff-Delivery"] == job["id"] and sent["X-Smartdiff-Attempt"] == str(n)
            record = json.loads(body)
            assert record["id"] == job["id"] and record["state"] == "CANCELLED" and "owner" not in record
        # Backoff: the waits grow (0.2 s, then 0.4 s).
        times = [t for _, _, t in receiver.deliveries]
        assert times[1] - times[0] >= 0.15 and times[2] - times[1] >= 0.35
        state = wait_for(
            lambda: (lambda w: w if w["state"] == "delivered" else None)(
                gw.http.get(f"/v1/jobs/{job['id']}", headers=headers).json()["webhook"]
            ),
            5,
            "the delivery to be recorded",
        )
        assert state["attempts"] == 3 and state["last_status"] == 200
        assert (
            'smartdiff_gateway_webhook_deliveries_total{outcome="delivered"}' in gw.http.get("/metrics").text
        )
    finally:
        receiver.stop()


def test_webhook_gives_up_after_max_attempts(gw):
    receiver = Receiver(always_fail=True)
    try:
        headers = gw.key()
        job = gw.http.post("/v1/jobs", headers=headers, json=job_body(callback_url=receiver.url)).json()
        gw.http.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
        state = wait_for(
            lambda: (lambda w: w if w["state"] == "failed" else None)(
                gw.http.get(f"/v1/jobs/{job['id']}", headers=headers).json()["webhook"]
            ),
            20,
            "the delivery to be given up",
        )
        assert state["attempts"] == 3 and state["last_status"] == 500 and len(receiver.deliveries) == 3
    finally:
        receiver.stop()


def test_callback_to_a_host_not_allowed_is_refused_at_submit(gw):
    headers = gw.key()
    before = gw.queued()
    for url in (
        "http://evil.example.com/hook",
        "https://127.0.0.1.evil.example.com/hook",
        "http://127.0.0.1@evil.example.com/hook",
        "ftp://127.0.0.1/hook",
        "http://localhost/hook",
    ):
        answer = assert_error(
            gw.http.post("/v1/jobs", headers=headers, json=job_body(callback_url=url)), 400, "INVALID_INPUT"
        )
        assert "callback_url" in answer["error"]["message"]
    assert gw.queued() == before


# ---------------------------------------------------------------------------------------- whole flow


def test_whole_flow_over_http(gw):
    receiver = Receiver()
    try:
        headers = gw.key()
        wait_for(
            lambda: (
                not gw.worker.alive()  # a dead worker fails at once below, with its log
                or {p["name"]: p for p in gw.http.get("/v1/profiles", headers=headers).json()["profiles"]}[
                    "tiny"
                ]["live_workers"]
            ),
            90,
            "the worker to announce itself",
        )
        assert gw.worker.alive(), gw.worker.log()[-3000:]
        request = {
            "profile": "tiny",
            "prompt": "a red ball",
            "seed": 3,
            "steps": 40,
            "callback_url": receiver.url,
        }
        created = gw.http.post("/v1/jobs", headers=headers, json=request)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        assert created.json()["state"] == "QUEUED" and created.json()["params"]["steps"] == 40

        seen_steps: set[int] = set()
        stages: set[str] = set()
        deadline = time.monotonic() + 180  # generous: CI machines may be loaded
        while time.monotonic() < deadline:
            record = gw.http.get(f"/v1/jobs/{job_id}", headers=headers).json()
            if record["state"] == "RUNNING":
                stages.add(record["stage"])
                if record["stage"] == "denoise":
                    seen_steps.add(record["step"])
            if record["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.03)
        assert record["state"] == "SUCCEEDED", (record["error_code"], record["error_message"])
        assert seen_steps and "denoise" in stages, (seen_steps, stages)
        result = record["result"]
        assert result["url"].startswith(gw_s3(gw)) and "X-Amz-Signature=" in result["url"]
        assert AWS_SECRET not in json.dumps(record) and "owner" not in record

        video = gw.http.get(f"/v1/jobs/{job_id}/video", headers=headers)
        assert video.status_code == 302 and video.headers["Cache-Control"] == "no-store"
        data = httpx.get(video.headers["Location"]).content
        assert hashlib.sha256(data).hexdigest() == result["sha256"] and len(data) == result["size"]

        assert_error(gw.http.post(f"/v1/jobs/{job_id}/cancel", headers=headers), 409, "JOB_FINISHED")
        wait_for(lambda: receiver.deliveries, 60, "the webhook")
        sent, body, _ = receiver.deliveries[0]
        assert signature_ok(sent, body)
        delivered = json.loads(body)
        assert delivered["state"] == "SUCCEEDED" and delivered["result"]["sha256"] == result["sha256"]
    finally:
        receiver.stop()


def gw_s3(gw: Env) -> str:
    return gw.app.state.gateway.settings.s3_public_endpoint
