"""Live workers in Redis: who serves which profile, on which node and GPU, and GPU leases.

A worker announces itself and refreshes a heartbeat while alive; a producer refuses a profile that
no live worker serves. With ``--gpus auto`` a worker claims a free GPU through a lease keyed by
the GPU's UUID, refreshed by the same heartbeat, so a killed worker's GPU frees itself.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from smartdiff.farm.records import PREFIX


def _profile_key(profile: str) -> str:
    return f"{PREFIX}:workers:{profile}"


def _worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def _gpu_key(uuid: str) -> str:
    return f"{PREFIX}:gpu-lease:{uuid}"


# KEYS[1] lease. ARGV: owner, ttl. Refresh only if still ours.
_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS[1] lease. ARGV: owner. Delete only if ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class WorkerRegistry:
    def __init__(self, client: redis.Redis, ttl_seconds: int = 15):
        self.redis = client
        self.ttl = ttl_seconds
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)

    def heartbeat(self, worker_id: str, profile: str, info: dict[str, Any]) -> None:
        """Announce or refresh a worker: its details expire unless refreshed within the TTL."""
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.set(
            _worker_key(worker_id),
            json.dumps({**info, "id": worker_id, "profile": profile, "seen": now}),
            ex=self.ttl,
        )
        pipe.zadd(_profile_key(profile), {worker_id: now})
        pipe.zremrangebyscore(_profile_key(profile), 0, now - self.ttl)
        pipe.execute()

    def remove(self, worker_id: str, profile: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(_worker_key(worker_id))
        pipe.zrem(_profile_key(profile), worker_id)
        pipe.execute()

    def live_workers(self, profile: str) -> list[dict[str, Any]]:
        ids = self.redis.zrangebyscore(_profile_key(profile), time.time() - self.ttl, "+inf")
        if not ids:
            return []
        found = self.redis.mget([_worker_key(i) for i in ids])
        return [json.loads(raw) for raw in found if raw]

    def on_node(self, node: str) -> list[dict[str, Any]]:
        """Every live worker of any profile on one host."""
        keys = list(self.redis.scan_iter(match=_worker_key("*"), count=1000))
        found = [json.loads(raw) for raw in self.redis.mget(keys) if raw] if keys else []
        return [info for info in found if info.get("node") == node]

    def claim_gpu(self, uuid: str, worker_id: str) -> bool:
        return bool(self.redis.set(_gpu_key(uuid), worker_id, nx=True, ex=self.ttl))

    def refresh_gpu(self, uuid: str, worker_id: str) -> bool:
        return bool(self._refresh(keys=[_gpu_key(uuid)], args=[worker_id, self.ttl]))

    def release_gpu(self, uuid: str, worker_id: str) -> None:
        self._release(keys=[_gpu_key(uuid)], args=[worker_id])
