"""farm.storage against a real S3 endpoint on loopback (moto's server), with injected failures."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.stub import Stubber
from s3_server import FlakyProxy, start_moto_server, stop_moto_server

from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.storage import MiB, StorageError, StoredObject, VideoStore, make_client

KEY_ID = "testing-key-id"
SECRET = "testing-secret-value"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dummy credentials only, and nothing from the machine's own AWS setup or proxies.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def moto_endpoint():
    server, url = start_moto_server()
    yield url
    stop_moto_server(server)


@pytest.fixture
def bucket() -> str:
    return f"videos-{uuid.uuid4().hex[:12]}"


def settings_for(endpoint: str, bucket: str, **kwargs) -> FarmSettings:
    kwargs.setdefault("s3_public_endpoint", endpoint)
    return FarmSettings(s3_endpoint=endpoint, s3_bucket=bucket, **kwargs)


def make_store(endpoint: str, bucket: str, sleeps: list[float] | None = None, **kwargs) -> VideoStore:
    """A store whose retry sleeps are recorded, never slept; botocore's own retries off unless asked."""
    kwargs.setdefault("client_retries", 0)
    sleeps = [] if sleeps is None else sleeps
    return VideoStore(settings_for(endpoint, bucket), sleep=sleeps.append, **kwargs)


def write_video(tmp_path: Path, size: int, name: str = "video.mp4") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def b64_sha256(sha_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha_hex)).decode()


def sends(client, operation: str) -> list[dict[str, str]]:
    """Headers of every HTTP request of `operation` the client sends (botocore's retries included)."""
    seen: list[dict[str, str]] = []

    def record(request, **_):
        seen.append(
            {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        )

    client.meta.events.register(f"before-send.s3.{operation}", record)
    return seen


def read_object(store: VideoStore, bucket: str, key: str) -> bytes:
    return store.client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_object_key_is_deterministic_and_safe() -> None:
    store = VideoStore(settings_for("http://127.0.0.1:9", "some-bucket"))  # builds no connection
    assert store.object_key("3f2a-77") == "videos/3f2a-77.mp4"
    assert store.object_key("3f2a-77") == store.object_key("3f2a-77")
    custom = VideoStore(settings_for("http://127.0.0.1:9", "b", object_key_template="out/{job_id}/v.mp4"))
    assert custom.object_key("j1") == "out/j1/v.mp4"
    for bad in ("", "../etc", "a/b", ".hidden", "a..b", "x" * 300):
        with pytest.raises(ValueError):
            store.object_key(bad)


def test_upload_small_file(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = make_store(moto_endpoint, bucket)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    puts = sends(store.client, "PutObject")
    path, sha = write_video(tmp_path, 100_000)

    stored = store.upload(path, "job-1", sha, {"profile": "tiny"})

    assert stored == StoredObject(bucket, "videos/job-1.mp4", 100_000, sha, stored.etag)
    assert stored.etag and '"' not in stored.etag
    assert stored.to_dict() == {
        "bucket": bucket,
        "key": "videos/job-1.mp4",
        "size": 100_000,
        "sha256": sha,
        "etag": stored.etag,
    }
    head = store.client.head_object(Bucket=bucket, Key=stored.key, ChecksumMode="ENABLED")
    assert head["ContentType"] == "video/mp4"
    assert head["ContentLength"] == 100_000
    assert head["Metadata"] == {"sha256": sha, "profile": "tiny"}
    assert head["ETag"].strip('"') == stored.etag
    # The integrity checksum was sent with the body and stored by the server.
    assert len(puts) == 1
    assert puts[0]["x-amz-checksum-sha256"] == b64_sha256(sha)
    assert puts[0]["if-none-match"] == "*"
    assert head["ChecksumSHA256"] == b64_sha256(sha)
    assert read_object(store, bucket, stored.key) == path.read_bytes()


def test_repeat_upload_is_a_noop_and_another_video_is_refused(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    store = make_store(moto_endpoint, bucket)
    store.ensure_bucket()
    path, sha = write_video(tmp_path, 20_000)
    first = store.upload(path, "job-2", sha)
    puts = sends(store.client, "PutObject")

    assert store.upload(path, "job-2", sha) == first
    assert puts == []

    other, other_sha = write_video(tmp_path, 5_000, "other.mp4")
    with pytest.raises(StorageError) as info:
        store.upload(other, "job-2", other_sha)
    assert not info.value.transient
    assert "different video" in str(info.value) and sha in str(info.value)
    assert puts == []
    assert read_object(store, bucket, first.key) == path.read_bytes()


@pytest.mark.parametrize("same_video", [True, False])
def test_write_race_is_caught_by_if_none_match(
    moto_endpoint: str, bucket: str, tmp_path: Path, same_video: bool
) -> None:
    """Another writer creates the key between our HEAD and our PUT: the PUT answers 412 and the
    store judges what is there, never overwriting it."""
    store = make_store(moto_endpoint, bucket)
    store.ensure_bucket()
    path, sha = write_video(tmp_path, 10_000)
    key = store.object_key("job-race")
    theirs = path.read_bytes() if same_video else b"another video"
    their_sha = hashlib.sha256(theirs).hexdigest()
    other_client = make_client(store.settings)

    def sneak_in(**_):
        if not other_client.list_objects_v2(Bucket=bucket).get("KeyCount"):
            other_client.put_object(Bucket=bucket, Key=key, Body=theirs, Metadata={"sha256": their_sha})

    store.client.meta.events.register("after-call.s3.HeadObject", sneak_in)
    statuses: list[int] = []
    store.client.meta.events.register(
        "after-call.s3.PutObject", lambda http_response, **_: statuses.append(http_response.status_code)
    )

    if same_video:
        assert store.upload(path, "job-race", sha).sha256 == sha
    else:
        with pytest.raises(StorageError, match="different video") as info:
            store.upload(path, "job-race", sha)
        assert not info.value.transient
    assert statuses == [412]  # moto honours If-None-Match: * on PutObject
    assert read_object(store, bucket, key) == theirs


def test_multipart_upload(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    # s3transfer never cuts parts below S3's 5 MiB minimum, so a 1 MiB threshold with 5 MiB
    # parts is the smallest real multipart upload: 2 parts for 6 MiB.
    store = make_store(moto_endpoint, bucket, multipart_threshold=1 * MiB, multipart_chunksize=5 * MiB)
    store.ensure_bucket()
    parts = sends(store.client, "UploadPart")
    completes = sends(store.client, "CompleteMultipartUpload")
    puts = sends(store.client, "PutObject")
    path, sha = write_video(tmp_path, 6 * MiB + 123)

    stored = store.upload(path, "job-big", sha)

    assert len(parts) == 2 and puts == [] and len(completes) == 1
    assert all(p["x-amz-checksum-sha256"] for p in parts)  # each part carries its SHA-256
    assert completes[0]["if-none-match"] == "*"  # write-once for multipart too
    assert stored.size == 6 * MiB + 123 and stored.etag.endswith("-2")
    head = store.client.head_object(Bucket=bucket, Key=stored.key)
    assert head["ContentType"] == "video/mp4" and head["Metadata"]["sha256"] == sha
    attrs = store.client.get_object_attributes(Bucket=bucket, Key=stored.key, ObjectAttributes=["Checksum"])
    assert attrs["Checksum"]["ChecksumSHA256"]  # composite (per-part) checksum kept by the server
    assert read_object(store, bucket, stored.key) == path.read_bytes()
    assert store.upload(path, "job-big", sha) == stored  # and repeats are no-ops here too
    assert len(parts) == 2


def test_multipart_write_race_leaves_no_debris(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = make_store(moto_endpoint, bucket, multipart_threshold=1 * MiB, multipart_chunksize=5 * MiB)
    store.ensure_bucket()
    path, sha = write_video(tmp_path, 6 * MiB)
    key = store.object_key("job-big-race")
    other_client = make_client(store.settings)
    store.client.meta.events.register(
        "after-call.s3.CreateMultipartUpload",
        lambda **_: other_client.put_object(Bucket=bucket, Key=key, Body=b"x", Metadata={"sha256": "0" * 64}),
    )

    with pytest.raises(StorageError, match="different video"):
        store.upload(path, "job-big-race", sha)

    assert read_object(store, bucket, key) == b"x"
    assert not store.client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # aborted


def test_transient_put_failures_are_retried_with_the_same_file(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    make_store(moto_endpoint, bucket).ensure_bucket()
    path, sha = write_video(tmp_path, 50_000)
    sleeps: list[float] = []
    with FlakyProxy(moto_endpoint, failures=2, methods=("PUT",)) as proxy:
        store = make_store(proxy.url, bucket, sleeps)
        stored = store.upload(path, "job-retry", sha)

    assert proxy.injected == 2
    assert [m for m, _ in proxy.seen].count("PUT") == 3
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 < sleeps[1] <= 1.0  # 0.5 s base, doubling
    direct = make_store(moto_endpoint, bucket)
    assert read_object(direct, bucket, stored.key) == path.read_bytes()


def test_botocore_retries_absorb_a_single_blip(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    make_store(moto_endpoint, bucket).ensure_bucket()
    path, sha = write_video(tmp_path, 1_000)
    sleeps: list[float] = []
    with FlakyProxy(moto_endpoint, failures=1, methods=("PUT",)) as proxy:
        store = make_store(proxy.url, bucket, sleeps, client_retries=3)  # the production default
        store.upload(path, "job-blip", sha)
    assert proxy.injected == 1 and sleeps == []  # botocore retried inside one attempt


def test_failed_part_is_retried(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    make_store(moto_endpoint, bucket).ensure_bucket()
    path, sha = write_video(tmp_path, 6 * MiB)
    sleeps: list[float] = []
    with FlakyProxy(moto_endpoint, failures=1, methods=("PUT",), path_contains="partNumber=") as proxy:
        store = make_store(proxy.url, bucket, sleeps, multipart_threshold=MiB, multipart_chunksize=5 * MiB)
        stored = store.upload(path, "job-part", sha)
    assert proxy.injected == 1 and len(sleeps) == 1
    direct = make_store(moto_endpoint, bucket)
    assert read_object(direct, bucket, stored.key) == path.read_bytes()
    assert not direct.client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_retries_run_out(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    make_store(moto_endpoint, bucket).ensure_bucket()
    path, sha = write_video(tmp_path, 1_000)
    sleeps: list[float] = []
    with FlakyProxy(moto_endpoint, failures=100, methods=("PUT",)) as proxy:
        store = make_store(proxy.url, bucket, sleeps, attempts=3)
        with pytest.raises(StorageError) as info:
            store.upload(path, "job-doomed", sha)
    assert info.value.transient
    assert "3 attempts" in str(info.value) and "SlowDown" in str(info.value)
    assert proxy.injected == 3 and len(sleeps) == 2
    direct = make_store(moto_endpoint, bucket)
    assert not direct.client.list_objects_v2(Bucket=bucket).get("KeyCount")


def test_uploads_retry_on_a_time_budget_through_a_storage_restart(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    make_store(moto_endpoint, bucket).ensure_bucket()
    path, sha = write_video(tmp_path, 1_000)
    with FlakyProxy(moto_endpoint) as proxy:
        # Connections reset for 2 s: a budget of 6 s outlasts it however many attempts that takes.
        settings = settings_for(proxy.url, bucket)
        store = VideoStore(settings, client_retries=0, upload_budget_seconds=6, max_delay=0.5)
        proxy.outage(2.0, "reset")
        start = time.monotonic()
        stored = store.upload(path, "job-through-a-restart", sha)
        assert time.monotonic() - start >= 1.5 and proxy.outage_requests >= 2
        assert stored.sha256 == sha
        # A storage that stays away past the budget: a transient error that says how long it tried.
        proxy.outage(60.0, "reset")
        start = time.monotonic()
        other, other_sha = write_video(tmp_path, 1_000, "other.mp4")
        with pytest.raises(StorageError) as info:
            store.upload(other, "job-budget-spent", other_sha)
        spent = time.monotonic() - start
    assert info.value.transient and 5 <= spent <= 8, spent
    assert re.search(r"gave up after \d+ attempts in [5-8] s", str(info.value)), str(info.value)


def test_a_hung_storage_is_given_up_in_seconds(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    make_store(moto_endpoint, bucket).ensure_bucket()
    path, sha = write_video(tmp_path, 1_000)
    with FlakyProxy(moto_endpoint) as proxy:
        settings = settings_for(proxy.url, bucket, s3_timeout_seconds=1.0)
        store = VideoStore(settings, client_retries=0, upload_budget_seconds=30, max_delay=0.5)
        proxy.outage(4.0, "hang")  # requests answered never: only a read timeout notices
        start = time.monotonic()
        store.upload(path, "job-after-a-hang", sha)
        # About the hang itself, not a minute per request.
        assert time.monotonic() - start < 10 and proxy.outage_requests >= 2


def test_unreachable_endpoint_is_transient(bucket: str, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path, sha = write_video(tmp_path, 1_000)
    sleeps: list[float] = []
    store = make_store(f"http://127.0.0.1:{port}", bucket, sleeps, attempts=2, connect_timeout=1)
    with pytest.raises(StorageError) as info:
        store.upload(path, "job-offline", sha)
    assert info.value.transient and "2 attempts" in str(info.value)
    assert "SMARTDIFF_S3_ENDPOINT" in str(info.value) and len(sleeps) == 1


def test_missing_bucket_fails_at_once(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    sleeps: list[float] = []
    store = make_store(moto_endpoint, bucket, sleeps, client_retries=3)  # no ensure_bucket
    puts = sends(store.client, "PutObject")
    path, sha = write_video(tmp_path, 1_000)
    with pytest.raises(StorageError) as info:
        store.upload(path, "job-nobucket", sha)
    assert not info.value.transient
    assert "NoSuchBucket" in str(info.value) and "ensure_bucket" in str(info.value)
    assert sleeps == [] and len(puts) == 1


def test_access_denied_fails_at_once(bucket: str, tmp_path: Path) -> None:
    settings = settings_for("http://127.0.0.1:9", bucket)
    client = make_client(settings)
    sleeps: list[float] = []
    store = VideoStore(settings, client=client, sleep=sleeps.append)
    path, sha = write_video(tmp_path, 1_000)
    with Stubber(client) as stub:
        stub.add_client_error("head_object", "404", http_status_code=404)
        stub.add_client_error("put_object", "AccessDenied", "Access Denied", http_status_code=403)
        with pytest.raises(StorageError) as info:
            store.upload(path, "job-denied", sha)
        stub.assert_no_pending_responses()
    assert not info.value.transient and sleeps == []
    assert "AccessDenied (HTTP 403)" in str(info.value) and "AWS_" in str(info.value)


def test_local_file_problems(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = make_store(moto_endpoint, bucket)
    with pytest.raises(StorageError) as info:
        store.upload(tmp_path / "gone.mp4", "job-x", "a" * 64)
    assert not info.value.transient
    path, _ = write_video(tmp_path, 10)
    with pytest.raises(ValueError):
        store.upload(path, "job-x", "not-a-sha")


def test_ensure_bucket_outside_us_east_1(moto_endpoint: str, bucket: str) -> None:
    store = VideoStore(settings_for(moto_endpoint, bucket, s3_region="eu-west-1"), sleep=lambda s: None)
    other_client = make_client(store.settings)
    # A racing worker creates the bucket between our HEAD and our CREATE: BucketAlreadyOwnedByYou.
    store.client.meta.events.register(
        "after-call.s3.HeadBucket",
        lambda **_: other_client.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        ),
        unique_id="race-once",
    )
    store.ensure_bucket()
    store.client.meta.events.unregister("after-call.s3.HeadBucket", unique_id="race-once")
    store.ensure_bucket()
    assert store.client.get_bucket_location(Bucket=bucket)["LocationConstraint"] == "eu-west-1"


def test_presign_uses_the_public_endpoint(moto_endpoint: str, bucket: str) -> None:
    public = "https://videos.example.com:9443"
    settings = settings_for(moto_endpoint, bucket, s3_public_endpoint=public, presign_seconds=900)
    store = VideoStore(settings)
    sent = sends(store.client, "GetObject")

    url = store.presign(bucket, "videos/j.mp4")
    assert url.startswith(f"{public}/{bucket}/videos/j.mp4?")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Signature"][0]
    short = store.presign(bucket, "videos/j.mp4", expires=60)
    assert parse_qs(urlsplit(short).query)["X-Amz-Expires"] == ["60"]
    assert SECRET not in url  # the key *id* is in X-Amz-Credential by SigV4's design
    assert sent == []  # presigning is local
    for bad in (0, 8 * 24 * 3600):
        with pytest.raises(ValueError):
            store.presign(bucket, "videos/j.mp4", expires=bad)


def test_presigned_link_downloads_the_video(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = make_store(moto_endpoint, bucket)
    store.ensure_bucket()
    path, sha = write_video(tmp_path, 30_000)
    stored = store.upload(path, "job-link", sha)
    url = store.presign(stored.bucket, stored.key, expires=120)
    assert url.startswith(moto_endpoint)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "video/mp4"
        assert response.read() == path.read_bytes()


def test_presign_without_credentials(monkeypatch: pytest.MonkeyPatch, bucket: str) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = VideoStore(settings_for("http://127.0.0.1:9", bucket))
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        store.presign(bucket, "videos/j.mp4")


def test_no_credentials_in_errors_results_or_logs(
    moto_endpoint: str, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="smartdiff.farm")
    texts: list[str] = []
    path, sha = write_video(tmp_path, 2_000)
    store = make_store(moto_endpoint, bucket)
    store.ensure_bucket()
    with FlakyProxy(moto_endpoint, failures=1, methods=("PUT",)) as proxy:
        stored = make_store(proxy.url, bucket).upload(path, "job-secret", sha)
        texts += [json.dumps(stored.to_dict()), repr(stored)]
        proxy.set_failures(100, ("PUT",))
        with pytest.raises(StorageError) as exhausted:
            make_store(proxy.url, bucket, attempts=2).upload(path, "job-secret-2", sha)
    other, other_sha = write_video(tmp_path, 10, "other.mp4")
    with pytest.raises(StorageError) as conflict:
        store.upload(other, "job-secret", other_sha)
    with pytest.raises(StorageError) as nobucket:
        make_store(moto_endpoint, bucket + "-missing").upload(path, "job-secret", sha)
    for info in (exhausted, conflict, nobucket):
        texts += [str(info.value), repr(info.value), str(info.value.__cause__)]
    texts.append(caplog.text)
    assert "retrying" in caplog.text and "uploaded" in caplog.text  # the logs were captured
    for text in texts:
        assert KEY_ID not in text and SECRET not in text
