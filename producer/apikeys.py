"""API keys of the HTTP gateway, and ``smartdiff apikey create | list | revoke``.

A key is ``sdk_`` + 43 random URL-safe characters (256 bits, from ``secrets``). It is shown once,
at creation; Redis keeps only its SHA-256 (a fast hash is enough for a random 256-bit secret: there
is nothing to guess), with a public id, a name, the creation time, a revoked flag and the key's
limits. Revoked keys stay listed (and are answered 403, not 401).

Redis layout (prefix ``smartdiff:``):
  apikey:<sha256>         hash: id, name, created_at, revoked, max_concurrent_jobs, requests_per_minute
  apikeys                 hash: key id -> sha256 (list and revoke by id)
  apikey-rate:<id>        zset: one member per request in the last 60 s (sliding window)
  apikey-active:<id>      zset: the key's jobs that may not be final yet -> time they were reserved
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from smartdiff.farm.records import PREFIX, job_key

KEY_PREFIX = "sdk_"
_KEY_RE = re.compile(r"^sdk_[A-Za-z0-9_-]{43}$")
DEFAULT_MAX_CONCURRENT_JOBS = 10
DEFAULT_REQUESTS_PER_MINUTE = 600
RATE_WINDOW_SECONDS = 60
# A reserved job whose record does not exist yet is still being created: it counts for this long.
RESERVATION_GRACE_SECONDS = 60

INDEX = f"{PREFIX}:apikeys"


def _record_key(digest: str) -> str:
    return f"{PREFIX}:apikey:{digest}"


def _rate_key(key_id: str) -> str:
    return f"{PREFIX}:apikey-rate:{key_id}"


def _active_key(key_id: str) -> str:
    return f"{PREFIX}:apikey-active:{key_id}"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


# KEYS[1] rate zset. ARGV: now, window seconds, limit, unique member. Returns '0' if the request may
# go, else the seconds until a slot frees (a string: Lua numbers would be truncated to integers).
_HIT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(math.max(0.001, tonumber(oldest[2]) + window - now))
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], window + 1)
return '0'
"""

# KEYS[1] active zset. ARGV: job id, limit, now, grace, job key prefix. Reserves a slot for the job
# if one is free: 1, else 0. Only a full set is pruned (of jobs that are final, or whose record is
# gone), so a check costs O(1) until the key nears its limit and O(limit) at most. Reserving a job
# that holds a slot already (a retried request) always succeeds.
_RESERVE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
local limit = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= limit then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local state = redis.call('HGET', ARGV[5] .. id, 'state')
    if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then
      redis.call('ZREM', KEYS[1], id)
    elseif not state and tonumber(redis.call('ZSCORE', KEYS[1], id)) < now - tonumber(ARGV[4]) then
      redis.call('ZREM', KEYS[1], id)
    end
  end
  if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"""


@dataclass(frozen=True)
class ApiKey:
    """What is known about a key: never the key itself."""

    id: str
    name: str
    created_at: float
    revoked: bool
    max_concurrent_jobs: int
    requests_per_minute: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> ApiKey:
        return cls(
            id=raw["id"],
            name=raw.get("name", ""),
            created_at=float(raw.get("created_at", 0)),
            revoked=raw.get("revoked") == "1",
            max_concurrent_jobs=int(raw.get("max_concurrent_jobs", DEFAULT_MAX_CONCURRENT_JOBS)),
            requests_per_minute=int(raw.get("requests_per_minute", DEFAULT_REQUESTS_PER_MINUTE)),
        )


class ApiKeyStore:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._hit = client.register_script(_HIT)
        self._reserve = client.register_script(_RESERVE)

    def create(
        self,
        name: str,
        max_concurrent_jobs: int = DEFAULT_MAX_CONCURRENT_JOBS,
        requests_per_minute: int = DEFAULT_REQUESTS_PER_MINUTE,
    ) -> tuple[str, ApiKey]:
        """A new key: (the secret, to hand over once; its record)."""
        if not name or len(name) > 100:
            raise ValueError("name: 1 to 100 characters")
        if max_concurrent_jobs < 1 or requests_per_minute < 1:
            raise ValueError("limits must be at least 1")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=secrets.token_hex(6),
            name=name,
            created_at=time.time(),
            revoked=False,
            max_concurrent_jobs=max_concurrent_jobs,
            requests_per_minute=requests_per_minute,
        )
        digest = hash_key(secret)
        fields = {**key.to_dict(), "revoked": "0"}
        pipe = self.redis.pipeline()
        pipe.hset(_record_key(digest), mapping=fields)
        pipe.hset(INDEX, key.id, digest)
        pipe.execute()
        return secret, key

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key's record (revoked or not), or None if no such key exists."""
        if not _KEY_RE.match(secret):
            return None  # not even shaped like a key: no need to ask Redis
        raw = self.redis.hgetall(_record_key(hash_key(secret)))
        return ApiKey.from_hash(raw) if raw.get("id") else None

    def get(self, key_id: str) -> ApiKey | None:
        digest = self.redis.hget(INDEX, key_id)
        raw = self.redis.hgetall(_record_key(digest)) if digest else {}
        return ApiKey.from_hash(raw) if raw.get("id") else None

    def list(self) -> list[ApiKey]:
        digests = self.redis.hgetall(INDEX)
        pipe = self.redis.pipeline()
        for digest in digests.values():
            pipe.hgetall(_record_key(digest))
        keys = [ApiKey.from_hash(raw) for raw in pipe.execute() if raw.get("id")]
        return sorted(keys, key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> bool:
        """Mark the key revoked; False if there is no such key."""
        digest = self.redis.hget(INDEX, key_id)
        if not digest or not self.redis.exists(_record_key(digest)):
            return False
        self.redis.hset(_record_key(digest), "revoked", "1")
        return True

    # -- limits -----------------------------------------------------------------------------------

    def hit(self, key: ApiKey) -> float:
        """Count one request against the key's rate: 0 if it may go, else seconds to wait."""
        now = time.time()
        answer = self._hit(
            keys=[_rate_key(key.id)],
            args=[now, RATE_WINDOW_SECONDS, key.requests_per_minute, f"{now}-{secrets.token_hex(4)}"],
        )
        return float(answer)

    def reserve_job(self, key: ApiKey, job_id: str) -> bool:
        """Take one of the key's concurrent-job slots for this job; False if all are taken."""
        answer = self._reserve(
            keys=[_active_key(key.id)],
            args=[job_id, key.max_concurrent_jobs, time.time(), RESERVATION_GRACE_SECONDS, job_key("")],
        )
        return answer == 1

    def release_job(self, key_id: str, job_id: str) -> None:
        """Give a slot back (the job was never created)."""
        self.redis.zrem(_active_key(key_id), job_id)


# ----------------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key and print it (the only time it is shown)")
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument("--max-concurrent-jobs", type=int, default=DEFAULT_MAX_CONCURRENT_JOBS)
    create.add_argument("--requests-per-minute", type=int, default=DEFAULT_REQUESTS_PER_MINUTE)
    create.add_argument("--json", action="store_true")
    listing = actions.add_parser("list", help="list keys (ids, names, limits; never the keys)")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")


def run(args: argparse.Namespace) -> int:
    from smartdiff.farm.settings import FarmSettings

    client = redis.Redis.from_url(FarmSettings.from_env().redis_url, decode_responses=True)
    store = ApiKeyStore(client)
    if args.action == "create":
        try:
            secret, key = store.create(args.name, args.max_concurrent_jobs, args.requests_per_minute)
        except ValueError as error:
            print(f"error: {error}")
            return 2
        if args.json:
            print(json.dumps({"key": secret, **key.to_dict()}))
        else:
            print(f"id {key.id}  name {key.name}")
            print(f"key {secret}")
            print("Keep the key now: only its hash is stored, it cannot be shown again.")
        return 0
    if args.action == "list":
        keys = store.list()
        if args.json:
            print(json.dumps([k.to_dict() for k in keys]))
        for k in [] if args.json else keys:
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created_at))
            state = "revoked" if k.revoked else "active"
            print(
                f"{k.id}  {state:7}  {created}Z  jobs<={k.max_concurrent_jobs}  "
                f"{k.requests_per_minute}/min  {k.name}"
            )
        return 0
    if not store.revoke(args.key_id):
        print(f"error: no API key with id {args.key_id!r}")
        return 1
    print(f"{args.key_id}  revoked")
    return 0
