"""Webhooks: a job may carry a callback URL that receives its final record, signed, with retries.

Only http(s) URLs to hosts the operator allows (``SMARTDIFF_WEBHOOK_ALLOWED_HOSTS``) are accepted,
checked when the job is created and again before every delivery (the list may have changed).

Delivery runs inside the gateway process (a background thread, ``WebhookDelivery``): it reads the
farm's stream of final states (``smartdiff:events``) through a consumer group, so several gateway
replicas share the work and one that was down catches up. A failed delivery is retried after an
exponential backoff with a cap, from a Redis sorted set (so a restart does not lose it), then given
up and noted. Delivery is at least once: receivers dedupe by the ``X-Smartdiff-Delivery`` header
(the job id).

Signature: ``X-Smartdiff-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` with the
shared secret ``SMARTDIFF_WEBHOOK_SECRET``; ``verify_signature`` is what a receiver does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import redis

from smartdiff.farm.records import EVENTS_STREAM, PREFIX, JobRecord, JobStore
from smartdiff.farm.settings import FarmSettings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Smartdiff-Signature"
DELIVERY_HEADER = "X-Smartdiff-Delivery"
ATTEMPT_HEADER = "X-Smartdiff-Attempt"
GROUP = "smartdiff-webhooks"
RETRY_SET = f"{PREFIX}:webhook-retry"  # zset: job id -> unix time of its next attempt
MAX_URL_CHARS = 2048
# An event read but never acknowledged (its gateway died mid-delivery) is taken over after this.
STALE_EVENT_MS = 60_000


def state_key(job_id: str) -> str:
    """A hash with the job's delivery state: state, attempts, last_status, last_error, ..."""
    return f"{PREFIX}:webhook:{job_id}"


# --------------------------------------------------------------------------------- URLs and hosts


def host_allowed(host: str, allowed_hosts: Iterable[str]) -> bool:
    """Exact host names (case-insensitive), or "*.example.com" for any subdomain of example.com."""
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
        if host == entry:
            return True
    return False


def check_callback_url(url: Any, allowed_hosts: Iterable[str]) -> str:
    """The URL if a webhook may be sent to it; ``ValueError`` ("callback_url: ...") if not."""
    allowed = tuple(allowed_hosts)
    if not isinstance(url, str):
        raise ValueError(f"callback_url: must be a string, got {type(url).__name__}")
    if not url or len(url) > MAX_URL_CHARS:
        raise ValueError(f"callback_url: must be 1 to {MAX_URL_CHARS} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError("callback_url: must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as error:
        raise ValueError(f"callback_url: not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("callback_url: must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("callback_url: must not carry credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("callback_url: has no host")
    if not allowed:
        raise ValueError("callback_url: webhooks are not enabled here (no SMARTDIFF_WEBHOOK_ALLOWED_HOSTS)")
    if not host_allowed(parts.hostname, allowed):
        raise ValueError(
            f"callback_url: host {parts.hostname!r} is not allowed (ask the operator to add it to "
            "SMARTDIFF_WEBHOOK_ALLOWED_HOSTS)"
        )
    return url


# ------------------------------------------------------------------------------------ signatures


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header's value for ``body`` at ``timestamp`` (default: now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_seconds: float = 300, now: float | None = None
) -> bool:
    """What a receiver does: the HMAC matches and the timestamp is recent (replays are refused)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
        given = fields["v1"]
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - t) > tolerance_seconds:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


# -------------------------------------------------------------------------------------- delivery


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could lead to a host nobody allowed: it counts as a failed delivery instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookDelivery:
    """Posts final records to their jobs' callback URLs: one pass per ``step()``, or a thread."""

    def __init__(
        self,
        client: redis.Redis,
        store: JobStore,
        settings: FarmSettings,
        secret: str,
        payload: Callable[[JobRecord], dict[str, Any]],
        *,
        poll_seconds: float = 0.5,
        consumer: str | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        """payload: the JSON body for a finished job's record. on_outcome: called with "delivered",
        "retry" or "failed" after each attempt (metrics)."""
        if not secret:
            raise ValueError("webhooks need a signing secret (SMARTDIFF_WEBHOOK_SECRET)")
        self.redis = client
        self.store = store
        self.settings = settings
        self._secret = secret
        self._payload = payload
        self.poll_seconds = poll_seconds
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reclaim = 0.0
        self._group_ready = False

    # -- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="webhook-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except redis.RedisError as error:  # Redis restarting: keep trying
                log.warning("webhook delivery: %s", error)
                self._group_ready = False
                self._stop.wait(1.0)
            except Exception:  # never let one bad record end deliveries for everyone
                log.exception("webhook delivery failed unexpectedly")
                self._stop.wait(1.0)

    def ensure_group(self) -> None:
        """The consumer group, created at the stream's end: events before the first start are old."""
        try:
            self.redis.xgroup_create(EVENTS_STREAM, GROUP, id="$", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    def step(self) -> None:
        """Read new final states (waiting up to poll_seconds), then make every retry that is due."""
        if not self._group_ready:
            self.ensure_group()
        self._reclaim_stale()
        answer = self.redis.xreadgroup(
            GROUP, self.consumer, {EVENTS_STREAM: ">"}, count=50, block=self._block_ms()
        )
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                self._handle_event(entry_id, fields)
        self._due_retries()

    def _block_ms(self) -> int:
        wait = self.poll_seconds
        nearest = self.redis.zrange(RETRY_SET, 0, 0, withscores=True)
        if nearest:
            wait = min(wait, max(0.0, nearest[0][1] - time.time()))
        return max(1, int(wait * 1000))

    def _reclaim_stale(self) -> None:
        # Events a dead gateway read but never finished: take them over, at most every 10 s.
        if time.monotonic() - self._last_reclaim < 10:
            return
        self._last_reclaim = time.monotonic()
        answer = self.redis.xautoclaim(EVENTS_STREAM, GROUP, self.consumer, STALE_EVENT_MS, "0-0", count=50)
        for entry_id, fields in answer[1]:
            if fields:
                self._handle_event(entry_id, fields)

    def _handle_event(self, entry_id: str, fields: dict[str, str]) -> None:
        job_id = fields.get("job_id", "")
        if job_id:
            self.deliver(job_id)
        # Acknowledged only now: a gateway that dies mid-delivery leaves it for another to reclaim.
        self.redis.xack(EVENTS_STREAM, GROUP, entry_id)

    def _due_retries(self) -> None:
        for job_id in self.redis.zrangebyscore(RETRY_SET, "-inf", time.time(), start=0, num=50):
            if self.redis.zrem(RETRY_SET, job_id):  # 1 for exactly one gateway: that one delivers
                self.deliver(job_id)

    # -- one attempt ------------------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Seconds before the next try after ``attempt`` failed ones: exponential, capped."""
        base = self.settings.webhook_backoff_seconds
        return min(self.settings.webhook_backoff_max_seconds, base * 2 ** (attempt - 1))

    def deliver(self, job_id: str) -> str:
        """One delivery attempt for the job: 'delivered', 'retry', 'failed' or 'skipped'."""
        record = self.store.get(job_id)
        if record is None or not record.callback_url or not record.finished:
            return "skipped"
        key = state_key(job_id)
        if self.redis.hget(key, "state") in ("delivered", "failed"):
            return "skipped"  # a duplicate event (at-least-once): already settled
        try:
            check_callback_url(record.callback_url, self.settings.webhook_allowed_hosts)
        except ValueError as error:
            self._settle(job_id, "failed", 0, str(error))
            return "failed"
        try:
            body = json.dumps(self._payload(record), ensure_ascii=False).encode("utf-8")
        except Exception as error:  # e.g. no credentials to presign the link: retrying will not help
            log.exception("webhook payload for job %s could not be made", job_id)
            self._settle(job_id, "failed", 0, f"payload: {type(error).__name__}")
            return "failed"
        attempt = int(self.redis.hincrby(key, "attempts", 1))
        self.redis.expire(key, self.settings.record_ttl_seconds)
        status, error = self._post(record.callback_url, body, job_id, attempt)
        if 200 <= status < 300:
            self._settle(job_id, "delivered", status, "")
            log.info("webhook delivered", extra={"job_id": job_id, "attempt": attempt})
            return "delivered"
        if attempt >= self.settings.webhook_max_attempts:
            self._settle(job_id, "failed", status, error)
            log.warning("webhook given up after %d attempts: %s", attempt, error, extra={"job_id": job_id})
            return "failed"
        next_at = time.time() + self.backoff(attempt)
        pipe = self.redis.pipeline()
        pipe.hset(
            key, mapping={"state": "retrying", "last_status": status, "last_error": error, "next_at": next_at}
        )
        pipe.zadd(RETRY_SET, {job_id: next_at})
        pipe.execute()
        self._on_outcome("retry")
        return "retry"

    def _settle(self, job_id: str, state: str, status: int, error: str) -> None:
        key = state_key(job_id)
        pipe = self.redis.pipeline()
        pipe.hset(
            key,
            mapping={"state": state, "last_status": status, "last_error": error, "settled_at": time.time()},
        )
        pipe.hdel(key, "next_at")
        pipe.expire(key, self.settings.record_ttl_seconds)
        pipe.execute()
        self._on_outcome(state)

    def _post(self, url: str, body: bytes, job_id: str, attempt: int) -> tuple[int, str]:
        """(HTTP status, error text); status 0 when no answer came."""
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "smartdiff-webhooks/1",
                SIGNATURE_HEADER: sign(self._secret, body),
                DELIVERY_HEADER: job_id,
                ATTEMPT_HEADER: str(attempt),
            },
        )
        try:
            with self._opener.open(request, timeout=self.settings.webhook_timeout_seconds) as response:
                response.read(65536)
                return response.status, ""
        except urllib.error.HTTPError as error:
            return error.code, f"HTTP {error.code}"
        except (OSError, ValueError) as error:  # refused, timed out, DNS, TLS, a bad URL
            return 0, f"{type(error).__name__}: {error}"[:300]


def delivery_state(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The job's webhook delivery state for its record, or None if no delivery was tried yet."""
    raw = client.hgetall(state_key(job_id))
    if not raw:
        return None
    out: dict[str, Any] = {
        "state": raw.get("state", "pending"),
        "attempts": int(raw.get("attempts", 0)),
        "last_status": int(raw.get("last_status", 0) or 0),
    }
    if raw.get("last_error"):
        out["last_error"] = raw["last_error"]
    if raw.get("next_at"):
        out["next_attempt_at"] = float(raw["next_at"])
    return out
