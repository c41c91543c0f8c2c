"""Finished videos to S3-compatible storage: write-once uploads with retries, presigned links.

Torch-free. Credentials come only from boto3's own chain (AWS_* variables, shared config files,
instance roles): nothing here takes, keeps, logs or returns them. Note that a presigned URL carries
the access key *id* (never the secret) in X-Amz-Credential: that is how SigV4 links work.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from smartdiff.farm.settings import FarmSettings

log = logging.getLogger(__name__)

MiB = 1024 * 1024
CONTENT_TYPE = "video/mp4"
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit

_T = TypeVar("_T")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Job ids are Celery task ids (UUIDs); anything that could walk out of the key prefix is refused.
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        # Two conditional writes raced on the same key: retrying re-reads what won.
        "ConditionalRequestConflict",
    }
)
# What a person should do about a non-transient error, by S3 error code.
_HINTS = {
    "NoSuchBucket": "the bucket does not exist: create it (VideoStore.ensure_bucket or the storage's "
    "bucket-init step) or set SMARTDIFF_S3_BUCKET to an existing bucket",
    "AccessDenied": "access denied: check the AWS_* credentials this process runs with and that they "
    "may s3:GetObject, s3:PutObject and s3:ListBucket on the bucket (without ListBucket a HEAD of a "
    "missing object answers 403)",
    "InvalidAccessKeyId": "the storage does not know this access key id: check AWS_ACCESS_KEY_ID and "
    "that SMARTDIFF_S3_ENDPOINT points at the right server",
    "SignatureDoesNotMatch": "the request signature was rejected: check AWS_SECRET_ACCESS_KEY and "
    "SMARTDIFF_S3_REGION",
    "RequestTimeTooSkewed": "this machine's clock is too far off: synchronise it (NTP)",
    "AuthorizationHeaderMalformed": "the signing region is wrong: set SMARTDIFF_S3_REGION to the "
    "bucket's region",
    "PermanentRedirect": "the bucket lives in another region or behind another endpoint: check "
    "SMARTDIFF_S3_REGION and SMARTDIFF_S3_ENDPOINT",
    "InvalidBucketName": "the bucket name is not valid for S3: fix SMARTDIFF_S3_BUCKET",
    "BucketAlreadyExists": "the bucket name belongs to another account: choose another SMARTDIFF_S3_BUCKET",
    "EntityTooSmall": "multipart parts are below the server's minimum (5 MiB on S3): raise "
    "multipart_chunksize",
    "PreconditionFailed": "the object was written by someone else meanwhile",
}
_STATUS_HINTS = {
    301: _HINTS["PermanentRedirect"],
    400: "the storage rejected the request as malformed: check SMARTDIFF_S3_ENDPOINT and SMARTDIFF_S3_REGION",
    403: _HINTS["AccessDenied"],
    404: _HINTS["NoSuchBucket"],
}


class StorageError(RuntimeError):
    """A storage operation failed. `transient` says whether trying again later may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class StoredObject:
    """Where a video lies and what it is; safe to put in job records (no secrets, no links)."""

    bucket: str
    key: str
    size: int
    sha256: str
    etag: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_client(
    settings: FarmSettings,
    endpoint_url: str | None = None,
    *,
    retries: int = 3,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Any:
    """A SigV4, path-style S3 client. Credentials: boto3's default chain only.

    retries: botocore's own retries of each request (its "max_attempts" counts retries, not
    attempts: 3 means up to 4 requests).
    """
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},  # MinIO, moto and most self-hosted stores need path style
        retries={"mode": "standard", "max_attempts": retries},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url or settings.s3_endpoint,
        region_name=settings.s3_region,
        config=config,
    )


def _add_if_none_match(params: dict[str, Any], **_: Any) -> None:
    # s3transfer does not accept IfNoneMatch in ExtraArgs; this hook makes the multipart
    # completion conditional too, so a finished object is never replaced.
    params.setdefault("IfNoneMatch", "*")


def _client_error(exc: BaseException) -> ClientError | None:
    """The ClientError behind exc; boto3's upload_file hides it inside S3UploadFailedError."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, S3UploadFailedError):
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, ClientError):
            return inner
    return None


def _error_code(exc: BaseException) -> str:
    err = _client_error(exc)
    return str(err.response.get("Error", {}).get("Code", "")) if err is not None else ""


def _classify(exc: BaseException, what: str, endpoint: str) -> StorageError | None:
    """A StorageError for exc, with advice; None for exceptions that are not storage errors.

    Messages are built from the error code, the HTTP status and the server's short message: never
    from request headers, so no credential can end up in them.
    """
    err = _client_error(exc)
    if err is not None:
        info = err.response.get("Error", {})
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(info.get("Code") or status or "Unknown")
        server_msg = str(info.get("Message") or "")[:200]
        transient = status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
        hint = "" if transient else _HINTS.get(code) or _STATUS_HINTS.get(status, "")
        text = f"{what} failed: {code} (HTTP {status})"
        if server_msg:
            text += f": {server_msg}"
        if hint:
            text += f". To fix: {hint}"
        return StorageError(text, transient=transient)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{what} failed: no usable AWS credentials. To fix: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or a profile or instance role) for this process",
            transient=False,
        )
    if isinstance(exc, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return StorageError(
            f"{what} failed: the TLS certificate of {endpoint} was not trusted. To fix: install the "
            "CA and point AWS_CA_BUNDLE at it, or check SMARTDIFF_S3_ENDPOINT",
            transient=False,
        )
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return StorageError(
            f"{what} failed: {type(exc).__name__} talking to {endpoint}. If it persists, check "
            "SMARTDIFF_S3_ENDPOINT and that the storage is up",
            transient=True,
        )
    if isinstance(exc, BotoCoreError):
        return StorageError(f"{what} failed: {type(exc).__name__}: {exc}", transient=False)
    return None


class VideoStore:
    """Write-once video objects in one bucket, with retries that reuse the same local file."""

    def __init__(
        self,
        settings: FarmSettings,
        client: Any | None = None,
        *,
        attempts: int = 6,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 64 * MiB,
        client_retries: int = 3,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        upload_budget_seconds: float | None = None,
    ) -> None:
        """attempts, base_delay, max_delay, sleep: this class's retry loop of whole operations.
        upload_budget_seconds: uploads retry transient errors until this much time is spent, however
        many attempts that takes (a worker keeps its finished video through a storage restart);
        None: ``attempts`` bound uploads too.
        client_retries: botocore's own retries of each request inside one attempt (with its own
        short sleeps); tests set 0 so every injected failure reaches the loop.
        connect_timeout, read_timeout: default to settings.s3_timeout_seconds, so a hung connection
        is given up in seconds and retried."""
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.settings = settings
        self.bucket = settings.s3_bucket
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.multipart_threshold = multipart_threshold
        self.upload_budget_seconds = upload_budget_seconds
        self._sleep = sleep
        self._endpoint = settings.s3_endpoint or "AWS S3"
        timeout = settings.s3_timeout_seconds
        self._client_kwargs = {
            "retries": client_retries,
            "connect_timeout": min(timeout, 5.0) if connect_timeout is None else connect_timeout,
            "read_timeout": timeout if read_timeout is None else read_timeout,
        }
        self._client = client if client is not None else make_client(settings, **self._client_kwargs)
        self._client.meta.events.register(
            "before-parameter-build.s3.CompleteMultipartUpload",
            _add_if_none_match,
            unique_id="farm-storage-write-once",
        )
        # "classic": the s3transfer path, whose errors and hooks this class understands (not CRT).
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            preferred_transfer_client="classic",
        )
        self._presign_client: Any | None = None

    @property
    def client(self) -> Any:
        """The boto3 client used for uploads (tests hook its events)."""
        return self._client

    def object_key(self, job_id: str) -> str:
        """The job's deterministic object key, from settings.object_key_template."""
        if not _JOB_ID_RE.match(job_id) or ".." in job_id:
            raise ValueError(f"job id {job_id!r} is not usable in an object key")
        return self.settings.object_key_template.format(job_id=job_id)

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (ours already, or made by a racing worker)."""
        region = self.settings.s3_region

        def once() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if region != "us-east-1":  # us-east-1 refuses an explicit LocationConstraint
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self._client.create_bucket(**kwargs)
                log.info("created bucket %s in %s", self.bucket, region)
            except ClientError as exc:
                if _error_code(exc) != "BucketAlreadyOwnedByYou":
                    raise

        self._with_retries(f"creating bucket {self.bucket}", once)

    def check_bucket(self) -> None:
        """Fail at worker start, not at the first job, if the bucket is missing or not ours."""
        self._with_retries(
            f"checking bucket {self.bucket}", lambda: self._client.head_bucket(Bucket=self.bucket)
        )

    def upload(
        self, path: Path, job_id: str, sha256: str, metadata: dict[str, str] | None = None
    ) -> StoredObject:
        """Store the file under the job's key once; a repeat with the same sha256 is a no-op.

        Raises StorageError: at once for errors retrying cannot fix (including a different video
        already under the key); for transient ones once the upload budget (or `attempts`) is spent.
        """
        path = Path(path)
        sha256 = sha256.lower()
        if not _SHA256_RE.match(sha256):
            raise ValueError("sha256 must be 64 hex digits")
        key = self.object_key(job_id)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot upload {path}: {exc.strerror}", transient=False) from None
        meta = {**(metadata or {}), "sha256": sha256}
        what = f"upload of s3://{self.bucket}/{key}"
        budget = self.upload_budget_seconds
        deadline = None if budget is None else time.monotonic() + budget
        return self._with_retries(what, lambda: self._upload_once(path, key, size, sha256, meta), deadline)

    def presign(self, bucket: str, key: str, expires: int | None = None) -> str:
        """A presigned GET link on the public endpoint; computed locally, no request is made."""
        seconds = self.settings.presign_seconds if expires is None else int(expires)
        if not 1 <= seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"presign expiry must be 1..{MAX_PRESIGN_SECONDS} seconds, got {seconds}")
        try:
            url = self._public_client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds
            )
        except BotoCoreError as exc:
            error = _classify(exc, f"presigning s3://{bucket}/{key}", self._endpoint)
            raise error or StorageError(f"presigning s3://{bucket}/{key} failed") from exc
        if "X-Amz-Signature=" not in url:  # botocore leaves URLs unsigned when it has no credentials
            raise StorageError(
                f"presigning s3://{bucket}/{key} failed: no AWS credentials. To fix: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for this process",
                transient=False,
            )
        return url

    # -- internals ---------------------------------------------------------------------------

    def _public_client(self) -> Any:
        public = self.settings.s3_public_endpoint
        if not public or public == self.settings.s3_endpoint:
            return self._client
        if self._presign_client is None:
            self._presign_client = make_client(self.settings, public, **self._client_kwargs)
        return self._presign_client

    def _backoff(self, attempt: int) -> float:
        # Exponential with "equal jitter": grows every attempt until the cap, yet workers that
        # failed together do not retry in lockstep.
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _with_retries(self, what: str, fn: Callable[[], _T], deadline: float | None = None) -> _T:
        """fn, retried on transient errors: ``attempts`` times, or until ``deadline`` (monotonic)."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:
                error = exc if isinstance(exc, StorageError) else _classify(exc, what, self._endpoint)
                if error is None:
                    raise
                if not error.transient:
                    log.error("%s", error)
                    if error is exc:
                        raise
                    raise error from exc
                delay = self._backoff(attempt)
                if deadline is None:
                    spent_all = attempt >= self.attempts
                else:
                    spent_all = time.monotonic() + delay > deadline
                if spent_all:
                    spent = f"{attempt} attempts in {time.monotonic() - started:.0f} s"
                    log.error("%s; giving up after %s", error, spent)
                    raise StorageError(f"{error} (gave up after {spent})", transient=True) from exc
                log.warning("%s (attempt %d); retrying in %.2fs with the same file", error, attempt, delay)
                self._sleep(delay)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _existing(self, head: dict[str, Any], key: str, sha256: str) -> StoredObject:
        stored_sha = head.get("Metadata", {}).get("sha256")
        if stored_sha != sha256:
            raise StorageError(
                f"s3://{self.bucket}/{key} already holds a different video (sha256 "
                f"{stored_sha or 'unknown'}, this one {sha256}): objects are written once per job id, "
                "so it was not overwritten. To fix: use a new job id, or delete the object if it is "
                "known to be bad",
                transient=False,
            )
        return StoredObject(
            bucket=self.bucket,
            key=key,
            size=int(head["ContentLength"]),
            sha256=sha256,
            etag=str(head.get("ETag", "")).strip('"'),
        )

    def _upload_once(
        self, path: Path, key: str, size: int, sha256: str, meta: dict[str, str]
    ) -> StoredObject:
        head = self._head(key)
        if head is not None:  # a redelivered job, or an earlier attempt whose reply was lost
            stored = self._existing(head, key, sha256)
            log.info(
                "s3://%s/%s already stored with sha256 %s; not uploading again", self.bucket, key, sha256
            )
            return stored
        extra = {"ContentType": CONTENT_TYPE, "Metadata": meta, "ChecksumAlgorithm": "SHA256"}
        try:
            if size < self.multipart_threshold:
                with path.open("rb") as body:
                    self._client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **extra)
            else:
                self._client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=self._transfer)
        except (ClientError, S3UploadFailedError) as exc:
            if _error_code(exc) != "PreconditionFailed":
                raise
            # Someone wrote the key between our HEAD and our write: judge what is there now.
            head = self._head(key)
            if head is None:
                raise StorageError(f"upload of s3://{self.bucket}/{key} raced", transient=True) from exc
            return self._existing(head, key, sha256)
        head = self._head(key)
        if head is None:
            raise StorageError(
                f"upload of s3://{self.bucket}/{key} succeeded but the object is not visible yet",
                transient=True,
            )
        stored = self._existing(head, key, sha256)
        if stored.size != size:
            raise StorageError(
                f"s3://{self.bucket}/{key} holds {stored.size} bytes, the local file {size}",
                transient=False,
            )
        log.info("uploaded s3://%s/%s (%d bytes, sha256 %s)", self.bucket, key, size, sha256)
        return stored
