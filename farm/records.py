"""Job records in Redis: one hash per job, keyed by the job id (which is also the Celery task id).

Every state change goes through a Lua script, so it is atomic: two deliveries of one message can
never both claim the job, a worker that lost its lease can never finish it, and a finished job
stays finished. Records outlive Celery's result expiry (Celery keeps no results here at all).

States: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED (RUNNING -> QUEUED when a lease runs
out or a worker hands the job back on shutdown).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from smartdiff.farm.codes import ErrorCode, JobState

STAGES = ("text_encode", "denoise", "vae_decode", "encode", "upload")

PREFIX = "smartdiff"
RUNNING_SET = f"{PREFIX}:running"  # zset: job key -> lease expiry (unix seconds)
QUEUED_SET = f"{PREFIX}:queued"  # zset: job key -> when it was (re)queued, while it is QUEUED
# zset: job key -> when its finished video was parked on its worker, the storage being unreachable
PARKED_SET = f"{PREFIX}:upload-pending"
# Stream of final states ({job_id, state}), appended in the same atomic step that ends a job; a
# consumer (webhook delivery) reads it with a consumer group. Capped, oldest entries dropped.
EVENTS_STREAM = f"{PREFIX}:events"
EVENTS_MAXLEN = 100_000
REJECTED_LIST = f"{PREFIX}:rejected"  # messages that could not be read at all, newest first

_JSON_FIELDS = ("params", "result", "seconds")
_NUMBER_FIELDS = (
    "step",
    "steps",
    "attempt",
    "priority",
    "created_at",
    "queued_at",
    "started_at",
    "finished_at",
    "updated_at",
    "lease_until",
)


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def _job_id(key: str) -> str:
    # A job id may itself contain ":" (another service's "billing:1234"): strip the prefix only.
    return key.removeprefix(job_key(""))


@dataclass
class JobRecord:
    id: str
    state: str
    profile: str = ""
    stage: str = ""
    step: int = 0
    steps: int = 0
    attempt: int = 0
    priority: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    worker: str = ""
    created_at: float = 0.0
    queued_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    updated_at: float = 0.0
    lease_until: float = 0.0
    cancel_requested: bool = False
    # Set by producers that say who submitted the job (the gateway: its API key id) and where its
    # final record is posted (webhooks); empty for jobs that did not ask.
    owner: str = ""
    callback_url: str = ""
    # Set while the finished video waits on its worker for the storage to come back (the job stays
    # RUNNING at stage "upload"): says since when and who retries.
    upload_pending: str = ""

    @property
    def finished(self) -> bool:
        return JobState(self.state).final

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out.pop("lease_until")
        return out

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> JobRecord:
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key in _JSON_FIELDS:
                values[key] = json.loads(value) if value else {}
            elif key in _NUMBER_FIELDS:
                number = float(value or 0)
                values[key] = int(number) if key in ("step", "steps", "attempt", "priority") else number
            elif key == "cancel_requested":
                values[key] = value == "1"
            elif key in cls.__dataclass_fields__:
                values[key] = value
        return cls(**values)


# KEYS[1] job, KEYS[2] running zset, KEYS[3] events, KEYS[4] queued zset. ARGV: worker, now,
# lease_until, max_attempts, events maxlen.
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
redis.call('ZREM', KEYS[4], KEYS[1])
if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then return 'finished' end
local now = tonumber(ARGV[2])
if state == 'RUNNING' and tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0') > now then
  return 'busy'
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  local why = 'cancelled before it started'
  if tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') > 0 then
    why = 'cancelled: a cancel was pending when its worker stopped during the run'
  end
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[2], 'updated_at', ARGV[2],
             'error_code', 'CANCELLED', 'error_message', why, 'worker', '')
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'job_id', redis.call('HGET', KEYS[1], 'id'),
             'state', 'CANCELLED')
  return 'cancelled'
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if attempt > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'state', 'FAILED', 'finished_at', ARGV[2], 'updated_at', ARGV[2],
             'error_code', 'WORKER_LOST', 'worker', '',
             'error_message',
             'the job was started ' .. (attempt - 1) .. ' times and its worker died each time')
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'job_id', redis.call('HGET', KEYS[1], 'id'),
             'state', 'FAILED')
  return 'failed'
end
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'worker', ARGV[1], 'started_at', ARGV[2],
           'updated_at', ARGV[2], 'lease_until', ARGV[3], 'stage', '', 'step', 0)
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
return 'claimed'
"""

# KEYS[1] job, KEYS[2] running. ARGV: worker, now, lease_until, then field/value pairs to set.
# Returns 'lost' if this worker no longer owns the job, else '1'/'0' for a requested cancel.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return 'lost'
end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3], 'updated_at', ARGV[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
return redis.call('HGET', KEYS[1], 'cancel_requested') or '0'
"""

# KEYS[1] job, KEYS[2] running, KEYS[3] events. ARGV: worker, ttl, events maxlen, then field/value
# pairs (including state).
_FINISH = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return 'lost'
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'lease_until', 0)
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'job_id', redis.call('HGET', KEYS[1], 'id'),
           'state', redis.call('HGET', KEYS[1], 'state'))
return 'ok'
"""

# KEYS[1] job, KEYS[2] running, KEYS[3] parked. ARGV: worker, now, note. The storage stayed unreachable
# past the upload budget: the job keeps RUNNING at stage upload, without a lease (no reaper requeues
# it: its video exists), until its worker uploads it (_FINISH_PARKED).
_PARK = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return 0
end
redis.call('HSET', KEYS[1], 'stage', 'upload', 'upload_pending', ARGV[3], 'lease_until', 0,
           'updated_at', ARGV[2])
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('ZADD', KEYS[3], ARGV[2], KEYS[1])
return 1
"""

# KEYS[1] job, KEYS[2] parked, KEYS[3] events. ARGV: ttl, events maxlen, then field/value pairs
# (state included). Ends a parked job (any worker may: the video is where its work dir is).
_FINISH_PARKED = """
local parked = redis.call('HGET', KEYS[1], 'upload_pending') or ''
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' or parked == '' then
  redis.call('ZREM', KEYS[2], KEYS[1])
  return 0
end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'upload_pending', '', 'stage', '')
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'job_id', redis.call('HGET', KEYS[1], 'id'),
           'state', redis.call('HGET', KEYS[1], 'state'))
return 1
"""

# KEYS[1] job, KEYS[2] running, KEYS[3] queued, KEYS[4] events. ARGV: now, worker ('' = any owner
# whose lease ran out), refund, events maxlen. Puts a RUNNING job back to QUEUED (1), or ends it
# CANCELLED if a cancel was pending when its worker stopped (2). refund=1 (a clean hand-back on
# shutdown) does not count the attempt against max_attempts.
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  redis.call('ZREM', KEYS[2], KEYS[1])
  return 0
end
local owner = redis.call('HGET', KEYS[1], 'worker')
if ARGV[2] ~= '' then
  if owner ~= ARGV[2] then return 0 end
elseif tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0') > tonumber(ARGV[1]) then
  return 0
end
redis.call('ZREM', KEYS[2], KEYS[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  local stage = redis.call('HGET', KEYS[1], 'stage')
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[1], 'updated_at', ARGV[1],
             'error_code', 'CANCELLED', 'worker', '', 'lease_until', 0, 'error_message',
             'cancelled during ' .. stage .. '; its worker stopped before it could end the job')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'job_id', redis.call('HGET', KEYS[1], 'id'),
             'state', 'CANCELLED')
  return 2
end
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'worker', '', 'stage', '', 'step', 0, 'lease_until', 0,
           'queued_at', ARGV[1], 'updated_at', ARGV[1])
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempt', -1) end
redis.call('ZADD', KEYS[3], ARGV[1], KEYS[1])
return 1
"""

# KEYS[1] job, KEYS[2] events, KEYS[3] queued. ARGV: now, events maxlen, error code, message. A queued
# job ends at once with that code and message, a running one at its next step.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[1], 'updated_at', ARGV[1],
             'error_code', ARGV[3], 'error_message', ARGV[4], 'cancel_requested', '1')
  redis.call('ZREM', KEYS[3], KEYS[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'job_id', redis.call('HGET', KEYS[1], 'id'),
             'state', 'CANCELLED')
  return 'CANCELLED'
end
if state == 'RUNNING' then redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1]) end
return state
"""


# KEYS[1] job, KEYS[2] queued. ARGV: now, then field/value pairs. Creates a QUEUED record only if
# there is none.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[1])
return 1
"""

# KEYS[1] job, KEYS[2] events, KEYS[3] queued. ARGV: id, code, message, now, profile, ttl, events maxlen.
_REJECT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'QUEUED' then return state end
redis.call('ZREM', KEYS[3], KEYS[1])
if not state then redis.call('HSET', KEYS[1], 'id', ARGV[1], 'profile', ARGV[5], 'created_at', ARGV[4]) end
redis.call('HSET', KEYS[1], 'state', 'FAILED', 'error_code', ARGV[2], 'error_message', ARGV[3],
           'finished_at', ARGV[4], 'updated_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'job_id', ARGV[1], 'state', 'FAILED')
return 'FAILED'
"""


class OwnershipLost(RuntimeError):
    """This worker's lease on the job ran out and another worker may have taken it over."""


class JobStore:
    """All reads and writes of job records. Used by producers (create, read, cancel) and workers."""

    def __init__(self, client: redis.Redis, record_ttl_seconds: int = 7 * 24 * 3600):
        self.redis = client
        self.record_ttl_seconds = record_ttl_seconds
        self._create = client.register_script(_CREATE)
        self._reject = client.register_script(_REJECT)
        self._claim = client.register_script(_CLAIM)
        self._progress = client.register_script(_PROGRESS)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)
        self._cancel = client.register_script(_CANCEL)
        self._park = client.register_script(_PARK)
        self._finish_parked = client.register_script(_FINISH_PARKED)

    @classmethod
    def from_url(cls, url: str, record_ttl_seconds: int = 7 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), record_ttl_seconds)

    def create(
        self,
        job_id: str,
        profile: str,
        params: dict[str, Any],
        priority: int,
        extra: dict[str, str] | None = None,
    ) -> bool:
        """A QUEUED record; False (and nothing changed) if the id exists already.

        ``extra``: more string fields stored with it (e.g. ``owner``, ``callback_url``).
        """
        now = time.time()
        fields = {
            "id": job_id,
            "state": JobState.QUEUED,
            "profile": profile,
            "params": json.dumps(params),
            "priority": priority,
            "created_at": now,
            "queued_at": now,
            "updated_at": now,
            "attempt": 0,
            "steps": params.get("steps", 0),
            **(extra or {}),
        }
        pairs = [item for pair in fields.items() for item in pair]
        return bool(self._create(keys=[job_key(job_id), QUEUED_SET], args=[now, *pairs]))

    def fail_unclaimed(self, job_id: str, code: str, message: str, profile: str = "") -> str:
        """Fail a job before any worker ran it (its message was unusable); creates the record if
        there is none, so the caller can read why. A running or finished job is left alone."""
        return self._reject(
            keys=[job_key(job_id), EVENTS_STREAM, QUEUED_SET],
            args=[job_id, code, message, time.time(), profile, self.record_ttl_seconds, EVENTS_MAXLEN],
        )

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(job_key(job_id))
        return JobRecord.from_hash(raw) if raw.get("state") else None

    def claim(self, job_id: str, worker: str, lease_seconds: float, max_attempts: int) -> str:
        """'claimed', 'busy' (another live worker runs it), 'finished', 'cancelled', 'failed' or 'missing'."""
        now = time.time()
        return self._claim(
            keys=[job_key(job_id), RUNNING_SET, EVENTS_STREAM, QUEUED_SET],
            args=[worker, now, now + lease_seconds, max_attempts, EVENTS_MAXLEN],
        )

    def progress(self, job_id: str, worker: str, lease_seconds: float, **fields: Any) -> bool:
        """Refresh the lease (and set progress fields); True if a cancel was requested.

        Raises ``OwnershipLost`` if the job is no longer this worker's.
        """
        now = time.time()
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, json.dumps(value) if name in _JSON_FIELDS else value]
        answer = self._progress(
            keys=[job_key(job_id), RUNNING_SET], args=[worker, now, now + lease_seconds, *pairs]
        )
        if answer == "lost":
            raise OwnershipLost(f"job {job_id} is no longer owned by {worker}")
        return answer == "1"

    def finish(self, job_id: str, worker: str, state: str, **fields: Any) -> bool:
        """Final state, only if this worker still owns the job; False if it does not."""
        answer = self._finish(
            keys=[job_key(job_id), RUNNING_SET, EVENTS_STREAM],
            args=[worker, self.record_ttl_seconds, EVENTS_MAXLEN, *_final_fields(state, fields)],
        )
        return answer == "ok"

    def park_upload(self, job_id: str, worker: str, note: str) -> bool:
        """The storage is still down after the upload budget: keep the job RUNNING at stage upload
        with ``note``, out of the reaper's reach (its video exists on ``worker``)."""
        keys = [job_key(job_id), RUNNING_SET, PARKED_SET]
        return bool(self._park(keys=keys, args=[worker, time.time(), note]))

    def finish_parked(self, job_id: str, state: str, **fields: Any) -> bool:
        """Final state of a parked job; False if it is not parked (any more)."""
        keys = [job_key(job_id), PARKED_SET, EVENTS_STREAM]
        args = [self.record_ttl_seconds, EVENTS_MAXLEN, *_final_fields(state, fields)]
        return bool(self._finish_parked(keys=keys, args=args))

    def _requeue_running(self, job_id: str, worker: str, refund: int) -> int:
        keys = [job_key(job_id), RUNNING_SET, QUEUED_SET, EVENTS_STREAM]
        return int(self._requeue(keys=keys, args=[time.time(), worker, refund, EVENTS_MAXLEN]))

    def hand_back(self, job_id: str, worker: str) -> bool:
        """Put this worker's running job back to QUEUED (shutdown in requeue mode); no attempt counted."""
        return self._requeue_running(job_id, worker, 1) == 1

    def requeue_if_expired(self, job_id: str) -> str:
        """For a running job whose lease ran out (its worker died): QUEUED if this call put it back,
        CANCELLED if a cancel was pending (it ends there), "" if there was nothing to do."""
        return {1: JobState.QUEUED, 2: JobState.CANCELLED}.get(self._requeue_running(job_id, "", 0), "")

    def expired_jobs(self) -> list[str]:
        """Ids of running jobs whose lease ran out."""
        return [_job_id(key) for key in self.redis.zrangebyscore(RUNNING_SET, 0, time.time())]

    def queued_jobs(self, before: float) -> list[str]:
        """Ids of the jobs QUEUED since before ``before`` (unix seconds)."""
        return [_job_id(key) for key in self.redis.zrangebyscore(QUEUED_SET, 0, before)]

    def cancel(
        self, job_id: str, code: str = ErrorCode.CANCELLED, message: str = "cancelled before it started"
    ) -> str:
        """Ask for a cancel; returns the state after the call ('missing' if there is no such job).
        A queued job ends at once with ``code`` and ``message``; a running one at its next step."""
        keys = [job_key(job_id), EVENTS_STREAM, QUEUED_SET]
        return self._cancel(keys=keys, args=[time.time(), EVENTS_MAXLEN, code, message])


def _final_fields(state: str, fields: dict[str, Any]) -> list[Any]:
    """Field/value pairs of a final state, JSON fields encoded."""
    if not JobState(state).final:
        raise ValueError(f"not a final state: {state}")
    now = time.time()
    pairs: list[Any] = ["state", state, "finished_at", now, "updated_at", now]
    for name, value in fields.items():
        pairs += [name, json.dumps(value) if name in _JSON_FIELDS else value]
    return pairs


def record_rejection(client: redis.Redis, reason: str, message_id: str | None) -> None:
    """Note a message that could not be used at all (bounded list, newest first, for operators)."""
    entry = json.dumps({"at": time.time(), "reason": reason[:500], "message_id": message_id})
    pipe = client.pipeline()
    pipe.lpush(REJECTED_LIST, entry)
    pipe.ltrim(REJECTED_LIST, 0, 999)
    pipe.execute()
