"""The wire contract in code (docs/WIRE.md): what a message is, where it waits, what its priority means.

A job is one Celery task message (protocol 2, JSON): task ``smartdiff.generate``, task id = job id,
kwargs ``{"profile": ..., "params": {...}}``, on the queue named after the profile. Priority is 0-9,
9 the most urgent, as everywhere in the farm. On Redis, kombu keeps one list per priority step:
``<queue>`` for 0 and ``<queue>\\x06\\x16<p>`` for p (kombu's own separator), and producers with
kombu's default steps (0, 3, 6, 9) write into a subset of these lists. Workers read the lists most
urgent first. Torch-free: producers import it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

TASK_NAME = "smartdiff.generate"
MIN_PRIORITY, MAX_PRIORITY = 0, 9
DEFAULT_PRIORITY = 5
REQUEUE_PRIORITY = MAX_PRIORITY  # a job taken back from a dead or stopping worker goes first
# One kombu priority step per priority: every priority has its own list.
PRIORITY_STEPS = list(range(MIN_PRIORITY, MAX_PRIORITY + 1))
SEP = "\x06\x16"  # kombu's Redis separator between a queue's name and its priority step
# kombu's Redis bookkeeping of delivered, unacknowledged messages (its default key names).
UNACKED_HASH, UNACKED_INDEX = "unacked", "unacked_index"


def broker_client(broker_url: str) -> redis.Redis | None:
    """A client of the broker's Redis, where the queues and kombu's bookkeeping are (the job records
    may live elsewhere, SMARTDIFF_REDIS_URL); None for a broker that is not Redis."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(broker_url, decode_responses=True)


def priority_list(queue: str, priority: int) -> str:
    """The Redis list that holds ``queue``'s messages of one priority."""
    return f"{queue}{SEP}{priority}" if priority else queue


def priority_lists(queue: str) -> list[str]:
    """All of a queue's lists, most urgent first (the order workers read them in)."""
    return [priority_list(queue, p) for p in reversed(PRIORITY_STEPS)]


def transport_priority(value: Any) -> int:
    """A message's priority property as the transport treats it: clamped to 0-9, absent means 0."""
    try:
        return min(max(int(value), MIN_PRIORITY), MAX_PRIORITY)
    except (TypeError, ValueError):
        return MIN_PRIORITY


def task_kwargs(envelope: dict[str, Any]) -> dict[str, Any] | None:
    """The kwargs of a protocol-2 task message in a kombu envelope, or None if it is not one."""
    try:
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        return kwargs if isinstance(kwargs, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def envelope_id(envelope: Any) -> str | None:
    """The task id (job id) a kombu envelope carries, if it is one."""
    try:
        job_id = envelope["headers"]["id"]
    except (KeyError, TypeError):
        return None
    return job_id if isinstance(job_id, str) else None


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _unacked_envelope(raw: str) -> Any:
    entry = _loads(raw)  # [envelope, exchange, routing key]
    return entry[0] if isinstance(entry, list) and entry else None


def find_queued(client: redis.Redis, queues: list[str], job_id: str) -> tuple[str, dict] | None:
    """(queue, envelope) of a job's message still waiting in one of ``queues``, if any.

    Costs one LRANGE per list: for the rare id that has no record (a producer that only speaks
    Celery), not for every poll.
    """
    for queue in queues:
        for name in priority_lists(queue):
            for raw in client.lrange(name, 0, -1):
                envelope = _loads(raw)
                if envelope_id(envelope) == job_id:
                    return queue, envelope
    return None


def waiting_ids(client: redis.Redis, queues: list[str]) -> set[str]:
    """Ids of every message waiting in ``queues``, or delivered and not yet acknowledged."""
    waiting = [
        _loads(raw) for q in queues for name in priority_lists(q) for raw in client.lrange(name, 0, -1)
    ]
    delivered = [_unacked_envelope(raw) for raw in client.hvals(UNACKED_HASH)]
    return {job_id for e in waiting + delivered if (job_id := envelope_id(e))}


def drop_unacked(client: redis.Redis, job_id: str) -> int:
    """Forget a job's delivered-but-unacknowledged message (its worker died and the job was sent
    again), so kombu does not deliver a stale copy when its visibility timeout ends. Returns how
    many entries went."""
    stale = [
        tag for tag, raw in client.hscan_iter(UNACKED_HASH) if envelope_id(_unacked_envelope(raw)) == job_id
    ]
    if stale:
        pipe = client.pipeline()
        pipe.hdel(UNACKED_HASH, *stale)
        pipe.zrem(UNACKED_INDEX, *stale)
        pipe.execute()
    return len(stale)
