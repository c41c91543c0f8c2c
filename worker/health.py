"""``smartdiff worker-health``: exit 0 if this host's worker has a fresh heartbeat (container health)."""

from __future__ import annotations

import argparse
import os
import socket
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        default=os.environ.get("SMARTDIFF_PROFILE"),
        help="profile of the worker (default: $SMARTDIFF_PROFILE)",
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0 if a worker of this host serving the profile has a fresh heartbeat in Redis."""
    import redis

    from smartdiff.farm.settings import FarmSettings
    from smartdiff.farm.workers import WorkerRegistry

    if not args.profile:
        print("error: give --profile or set SMARTDIFF_PROFILE", file=sys.stderr)
        return 2
    settings = FarmSettings.from_env()
    try:
        registry = WorkerRegistry(
            redis.Redis.from_url(settings.redis_url, decode_responses=True), settings.worker_ttl_seconds
        )
        live = [w for w in registry.live_workers(args.profile) if w.get("node") == socket.gethostname()]
    except redis.RedisError as error:
        print(f"unhealthy: Redis: {error}", file=sys.stderr)
        return 1
    if not live:
        print(f"unhealthy: no live {args.profile} worker on {socket.gethostname()}", file=sys.stderr)
        return 1
    print(f"healthy: {len(live)} worker(s), {sum(w['state'] == 'busy' for w in live)} busy")
    return 0
