"""Per-worker Prometheus metrics. Buckets reach hours: a 14B video takes tens of minutes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LONG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

JOBS = Counter("smartdiff_jobs_total", "Jobs finished by this worker, by final state", ["profile", "state"])
QUEUE_WAIT = Histogram(
    "smartdiff_queue_wait_seconds", "Time from submit to start", ["profile"], buckets=LONG_BUCKETS
)
STAGE_SECONDS = Histogram(
    "smartdiff_stage_seconds", "Seconds per job stage", ["profile", "stage"], buckets=LONG_BUCKETS
)
BUSY = Gauge("smartdiff_worker_busy", "1 while a job runs", ["profile"])
GPU_MEMORY = Gauge("smartdiff_gpu_memory_bytes", "GPU memory of this worker", ["profile", "kind"])


def serve(port: int) -> None:
    if port > 0:
        start_http_server(port)
