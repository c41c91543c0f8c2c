"""``smartdiff demo``: the whole farm on one machine with the embedded defaults.

A private Redis (when redis-server is installed and SMARTDIFF_BROKER_URL is not set), an S3
endpoint on loopback (moto's server, unless SMARTDIFF_S3_ENDPOINT is set), the shipped world
model, one CPU worker; one job submitted through the client, followed to the end, its record
printed and its MP4 downloaded through the presigned link.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from smartdiff.cli import python_module_command

# The world model the project ships (weights/wan-world), trained on the procedural world (world/).
DEMO_PROFILE = "wan-world"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="a red circle moving right on a white background")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("out/demo.mp4"))
    parser.add_argument("--timeout", type=float, default=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit(
            "error: the demo needs redis-server (e.g. apt-get install redis-server), "
            "or SMARTDIFF_BROKER_URL pointing at a Redis it may use"
        )
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("error: the private Redis did not start")


def start_s3() -> tuple[object, str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise SystemExit(
            "error: the demo's S3 endpoint needs moto: pip install 'smart-diffusion[demo]', "
            "or set SMARTDIFF_S3_ENDPOINT"
        ) from None
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="smartdiff-demo-"))
    env = os.environ
    redis_process = s3_server = worker = None
    try:
        if not env.get("SMARTDIFF_BROKER_URL"):
            redis_process, url = start_redis(workdir)
            env["SMARTDIFF_BROKER_URL"] = url
            env.pop("SMARTDIFF_REDIS_URL", None)
        if not env.get("SMARTDIFF_S3_ENDPOINT"):
            s3_server, endpoint = start_s3()
            env["SMARTDIFF_S3_ENDPOINT"] = endpoint
            # moto accepts any credentials; these exist only inside this demo.
            env.setdefault("AWS_ACCESS_KEY_ID", "demo-access-key")
            env.setdefault("AWS_SECRET_ACCESS_KEY", "demo-secret-key")
        env.setdefault("SMARTDIFF_WORK_DIR", str(workdir / "work"))

        from smartdiff.farm.settings import FarmSettings
        from smartdiff.farm.storage import VideoStore
        from smartdiff.pipeline.config import load_profile
        from smartdiff.producer import Client, FarmError

        settings = FarmSettings.from_env()
        VideoStore(settings).ensure_bucket()
        profile = load_profile(DEMO_PROFILE)
        if not profile.checkpoint_dir.exists():
            raise SystemExit(f"error: the shipped weights are missing: {profile.checkpoint_dir}")

        log_path = workdir / "worker.log"
        worker = subprocess.Popen(
            python_module_command("smartdiff", "worker", "--profile", DEMO_PROFILE, "--gpus", "none"),
            stdout=open(log_path, "w"),
            stderr=subprocess.STDOUT,
        )
        client = Client(settings)
        deadline = time.monotonic() + 120
        while not client.workers(DEMO_PROFILE):
            if worker.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text()[-3000:], file=sys.stderr)
                raise SystemExit("error: the worker did not start")
            time.sleep(0.2)
        print(f"worker up: {client.workers(DEMO_PROFILE)[0]['id']}", file=sys.stderr)

        job = client.submit(DEMO_PROFILE, args.prompt, seed=args.seed)
        print(f"submitted {job.id}", file=sys.stderr)
        last = None
        deadline = time.monotonic() + args.timeout
        while True:
            record = job.status()
            shown = (record["state"], record["stage"], record["step"])
            if shown != last:
                print(
                    f"  {record['state']:9} {record['stage']:12} {record['step']}/{record['steps']}",
                    file=sys.stderr,
                )
                last = shown
            if record["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        try:
            record = job.wait(timeout=0)
        except FarmError as error:
            print(json.dumps(error.record, indent=2, ensure_ascii=False))
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(json.dumps(record, indent=2, ensure_ascii=False))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(record["result"]["url"]) as response:
            args.out.write_bytes(response.read())
        print(f"saved {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
        return 0
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if s3_server is not None:
            s3_server.stop()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
