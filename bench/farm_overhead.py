"""The farm's own cost, on this machine with the tiny model: queue pick-up, time to the first
denoising step, overhead per job (record keeping, MP4 encode, upload) against generation time,
and throughput with 1 and 2 workers. Starts a private Redis and an S3 endpoint on loopback.

    python bench/farm_overhead.py --jobs 8 --workers 1 2 > farm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from smartdiff.cli import python_module_command

GENERATION_STAGES = ("text_encode", "denoise", "vae_decode")


def start_workers(count: int, log_dir: Path) -> list[subprocess.Popen]:
    command = python_module_command("smartdiff", "worker", "--profile", "tiny", "--gpus", "none")
    threads = str(max(1, (os.cpu_count() or 1) // count))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    return [
        subprocess.Popen(
            command, env=env, stdout=open(log_dir / f"worker{i}.log", "w"), stderr=subprocess.STDOUT
        )
        for i in range(count)
    ]


def first_step_latency(client, params: dict) -> float:
    """Seconds from submit to the record showing denoising step 1 (polled every millisecond)."""
    start = time.perf_counter()
    job = client.submit("tiny", **params)
    while True:
        record = client.store.get(job.id)
        if record.stage == "denoise" and record.step >= 1 or record.finished:
            latency = time.perf_counter() - start
            break
        time.sleep(0.001)
    job.wait(timeout=600)
    return latency


def measure(workers: int, jobs: int, params: dict, log_dir: Path) -> dict:
    from smartdiff.producer import Client

    processes = start_workers(workers, log_dir)
    client = Client()
    try:
        while len(client.workers("tiny")) < workers:
            if any(p.poll() is not None for p in processes):
                raise SystemExit("a worker exited; see " + str(log_dir))
            time.sleep(0.1)
        first_step_latency(client, {**params, "seed": 0})  # warm-up: first job pays one-time costs
        latencies = [first_step_latency(client, {**params, "seed": i}) for i in range(1, 4)]

        start = time.perf_counter()
        submitted = [client.submit("tiny", **params, seed=100 + i) for i in range(jobs)]
        records = [job.wait(timeout=900) for job in submitted]
        wall = time.perf_counter() - start
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(60)

    pickups, generation, overhead = [], [], []
    for r in records:
        gen = sum(r["seconds"][s] for s in GENERATION_STAGES)
        run = r["finished_at"] - r["started_at"]
        generation.append(gen)
        overhead.append(run - gen)  # encode + upload + records, everything but the model
        pickups.append(r["started_at"] - r["queued_at"])
    return {
        "workers": workers,
        "jobs": jobs,
        "wall_s": round(wall, 3),
        "jobs_per_minute": round(60 * jobs / wall, 2),
        "first_step_latency_ms_median": round(1000 * statistics.median(latencies), 1),
        "queue_pickup_ms_min": round(1000 * min(pickups), 1),
        "generation_s_mean": round(statistics.mean(generation), 3),
        "overhead_s_mean": round(statistics.mean(overhead), 3),
        "overhead_stages_s_mean": {
            s: round(statistics.mean(r["seconds"][s] for r in records), 4) for s in ("encode", "upload")
        },
        "overhead_fraction_of_generation": round(statistics.mean(overhead) / statistics.mean(generation), 4),
    }


def encode_seconds(width: int, height: int, frames: int) -> float:
    """MP4 encode time of a full-size video (moving gradients: closer to real video than noise)."""
    import numpy as np

    from smartdiff.pipeline.video import write_mp4

    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[0:height, 0:width]
    base = (x[None] + y[None] + 4 * t) % 256
    video = np.stack([base, (base + 85) % 256, (2 * base) % 256], axis=-1).astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_mp4(video, Path(folder) / "v.mp4")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    from smartdiff.demo import start_redis, start_s3

    workdir = Path(tempfile.mkdtemp(prefix="smartdiff-bench-"))
    redis_process, url = start_redis(workdir)
    s3_server, endpoint = start_s3()
    os.environ.update(
        {
            "SMARTDIFF_BROKER_URL": url,
            "SMARTDIFF_S3_ENDPOINT": endpoint,
            "SMARTDIFF_WORK_DIR": str(workdir / "work"),
            "SMARTDIFF_CHECKPOINT_ROOT": str(workdir),
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }
    )
    os.environ.pop("SMARTDIFF_REDIS_URL", None)
    try:
        from smartdiff.farm.settings import FarmSettings
        from smartdiff.farm.storage import VideoStore
        from smartdiff.pipeline.tiny import write_tiny_checkpoint

        VideoStore(FarmSettings.from_env()).ensure_bucket()
        write_tiny_checkpoint(workdir / "tiny")
        params = {
            "prompt": "a red ball moving left",
            "size": args.size,
            "frames": args.frames,
            "steps": args.steps,
        }
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(),
            "model": "tiny (CPU)",
            "job": f"{args.size}x{args.frames}, {args.steps} steps",
            "runs": [measure(n, args.jobs, params, workdir) for n in args.workers],
            # The encode is the farm's largest own cost; at the real size it is what carries over.
            "mp4_encode_s_832x480x81": round(encode_seconds(832, 480, 81), 3),
        }
    finally:
        s3_server.stop()
        redis_process.terminate()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
