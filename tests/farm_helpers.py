"""Real services for the farm's end-to-end tests: a private Redis with AOF, worker processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis

from smartdiff.cli import python_module_command
from smartdiff.farm.settings import FarmSettings
from smartdiff.farm.storage import VideoStore
from smartdiff.producer import Client

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """A private redis-server with AOF (as deployed), restartable on the same port and data."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required for the farm tests"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 10, "redis to answer")

    def stop(self) -> None:
        if self.process:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
            self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class WorkerProcess:
    """``smartdiff worker --profile tiny --gpus none`` as a real process, output to a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, profile: str = "tiny", extra_env=None):
        self.log_path = log_path
        self.env = {**env, **{k: str(v) for k, v in (extra_env or {}).items()}}
        self.profile = profile
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            python_module_command("smartdiff", "worker", "--profile", self.profile, "--gpus", "none"),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def worker_id(self) -> str:
        return f"{socket.gethostname()}-{self.pid}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def farm_env(redis_url: str, s3_endpoint: str, checkpoint_root: Path, work_dir: Path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTDIFF_", "AWS_"))}
    env.update(
        {
            "SMARTDIFF_BROKER_URL": redis_url,
            "SMARTDIFF_S3_ENDPOINT": s3_endpoint,
            "SMARTDIFF_S3_BUCKET": "farm-test",
            "SMARTDIFF_CHECKPOINT_ROOT": str(checkpoint_root),
            "SMARTDIFF_WORK_DIR": str(work_dir),
            "SMARTDIFF_LEASE_SECONDS": "4",
            "SMARTDIFF_REAPER_SECONDS": "1",
            "SMARTDIFF_WORKER_TTL_SECONDS": "5",
            "AWS_ACCESS_KEY_ID": "farm-test-key-id",
            "AWS_SECRET_ACCESS_KEY": "farm-test-secret-7f3a9c",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
            # Several CPU workers share two cores in CI: one thread each avoids oversubscription.
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def join_as_client(env: dict, monkeypatch) -> FarmSettings:
    """This test process as a client of the farm whose workers run with ``env`` (see ``farm_env``):
    their S3 credentials and checkpoint root exported here, and the settings they read."""
    exported = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    for name in (*exported, "SMARTDIFF_CHECKPOINT_ROOT"):
        monkeypatch.setenv(name, env[name])
    return FarmSettings(
        broker_url=env["SMARTDIFF_BROKER_URL"],
        redis_url=env["SMARTDIFF_BROKER_URL"],
        s3_endpoint=env["SMARTDIFF_S3_ENDPOINT"],
        s3_public_endpoint=env["SMARTDIFF_S3_ENDPOINT"],
        s3_bucket=env["SMARTDIFF_S3_BUCKET"],
        lease_seconds=int(env["SMARTDIFF_LEASE_SECONDS"]),
        reaper_seconds=int(env["SMARTDIFF_REAPER_SECONDS"]),
        worker_ttl_seconds=int(env["SMARTDIFF_WORKER_TTL_SECONDS"]),
    )


LONG = {"size": "128x128", "frames": 33, "steps": 600}  # about 10 s on a CPU: long enough to interrupt


class Farm:
    """One private Redis, a bucket, and worker processes started on demand."""

    def __init__(self, tmp_path, s3_endpoint, checkpoint_root, monkeypatch):
        self.tmp = tmp_path
        self.redis_server = RedisServer(tmp_path)
        self.redis_server.start()
        self.s3_endpoint = s3_endpoint
        self.bucket = f"farm-{uuid.uuid4().hex[:10]}"
        self.env = farm_env(
            self.redis_server.url,
            s3_endpoint,
            checkpoint_root,
            tmp_path / "work",
            SMARTDIFF_S3_BUCKET=self.bucket,
        )
        self.settings = join_as_client(self.env, monkeypatch)
        self.video_store = VideoStore(self.settings)
        self.video_store.ensure_bucket()
        self.client = Client(self.settings)
        self.redis = redis.Redis.from_url(self.redis_server.url, decode_responses=True)
        self.workers: list[WorkerProcess] = []

    def worker(self, **extra_env) -> WorkerProcess:
        index = len(self.workers)
        process = WorkerProcess(self.env, self.tmp / f"worker{index}.log", extra_env=extra_env).start()
        self.workers.append(process)
        wait_for(
            lambda: (
                any(w["id"] == process.worker_id() for w in self.client.workers("tiny"))
                or not process.alive()
            ),
            90,
            "the worker to announce itself",
        )
        assert process.alive(), process.log()[-3000:]
        return process

    def submit(self, **params):
        params.setdefault("prompt", "a red ball moving left")
        return self.client.submit("tiny", **params)

    def wait_running(self, job, min_step: int = 5) -> dict:
        return wait_for(
            lambda: (
                lambda r: (
                    r
                    if r["state"] == "RUNNING" and r["stage"] == "denoise" and r["step"] >= min_step
                    else None
                )
            )(job.status()),
            60,
            "the job to run",
        )

    def objects(self) -> list[str]:
        listed = self.video_store.client.list_objects_v2(Bucket=self.bucket)
        return sorted(o["Key"] for o in listed.get("Contents", []))

    def logs(self) -> str:
        return "".join(w.log() for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis_server.stop()
