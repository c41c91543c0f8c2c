"""Load on the HTTP gateway, on loopback: job creation and status polling, requests/s and latency.

    python bench/gateway_load.py [--requests 2000] [--seconds 20] [--concurrency 16]

Starts a private Redis and moto's S3 (as `smartdiff demo` does), the gateway as its own process
(`smartdiff gateway`, access log off), and creates an API key with limits high enough never to
trigger. Then, for each phase, at most --requests requests or --seconds seconds, whichever comes
first, from --concurrency concurrent clients (asyncio + httpx, in this process):
  create: POST /v1/jobs with queue_anyway (no worker is needed; the jobs stay queued)
  poll:   GET /v1/jobs/{id} over the jobs created
Prints one JSON object. Needs redis-server, moto[server] and httpx (the test extras).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from smartdiff.cli import python_module_command
from smartdiff.demo import free_port, start_redis, start_s3

PROFILE = "tiny"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def phase(
    client: httpx.AsyncClient, make_request, count: int, seconds: float, concurrency: int
) -> tuple[dict, list]:
    """Run make_request(i) from `concurrency` tasks until `count` are done or `seconds` pass."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    answers: list = []
    issued = 0
    deadline = time.perf_counter() + seconds

    async def runner() -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            i = issued
            issued += 1
            start = time.perf_counter()
            response = await make_request(client, i)
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            answers.append(response)

    start = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    summary = {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }
    return summary, answers


async def load(url: str, key: str, args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        body = {"profile": PROFILE, "prompt": "a red ball", "queue_anyway": True, "steps": 4}

        async def create(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.post("/v1/jobs", json={**body, "seed": i})

        # A short warm-up: connections, the first Celery publish, imports.
        await phase(client, create, 50, 10, args.concurrency)
        created, answers = await phase(client, create, args.requests, args.seconds, args.concurrency)
        ids = [a.json()["id"] for a in answers if a.status_code == 201]
        if not ids:
            raise SystemExit(f"no job was created: {answers[0].status_code} {answers[0].text}")

        async def poll(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.get(f"/v1/jobs/{ids[i % len(ids)]}")

        polled, _ = await phase(client, poll, args.requests, args.seconds, args.concurrency)
    return {"create": created, "poll": polled}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per phase, at most")
    parser.add_argument("--seconds", type=float, default=20, help="per phase, at most")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="smartdiff-gateway-load-"))
    redis_process, redis_url = start_redis(workdir)
    s3_server, s3_endpoint = start_s3()
    gateway = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTDIFF_", "AWS_"))}
        env.update(
            SMARTDIFF_BROKER_URL=redis_url,
            SMARTDIFF_S3_ENDPOINT=s3_endpoint,
            SMARTDIFF_S3_BUCKET="gateway-load",
            # moto accepts any credentials; these exist only inside this benchmark.
            AWS_ACCESS_KEY_ID="bench-access-key",
            AWS_SECRET_ACCESS_KEY="bench-secret-key",
            AWS_DEFAULT_REGION="us-east-1",
        )
        os.environ.update(env)
        import redis

        from smartdiff.farm.settings import FarmSettings
        from smartdiff.farm.storage import VideoStore
        from smartdiff.producer.apikeys import ApiKeyStore

        VideoStore(FarmSettings.from_env()).ensure_bucket()
        keys = ApiKeyStore(redis.Redis.from_url(redis_url, decode_responses=True))
        secret, _ = keys.create("load-test", max_concurrent_jobs=10**9, requests_per_minute=10**9)

        port = free_port()
        gateway = subprocess.Popen(
            python_module_command("smartdiff", "gateway", "--port", str(port))
            + ["--log-level", "warning", "--no-access-log"],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit("the gateway did not become ready")
            time.sleep(0.1)

        results = asyncio.run(load(url, secret, args))
        report = {
            "benchmark": "gateway_load",
            "date": time.strftime("%Y-%m-%d"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.platform(),
            },
            "setup": {
                "gateway": "one uvicorn process, loopback, access log off",
                "client": f"httpx.AsyncClient, {args.concurrency} concurrent, same machine",
                "bound": {"requests": args.requests, "seconds": args.seconds},
            },
            **results,
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        s3_server.stop()
        redis_process.terminate()
        redis_process.wait(10)


if __name__ == "__main__":
    sys.exit(main())
