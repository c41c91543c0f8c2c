"""A worker group end to end (worker/group.py): profile tiny-cfg2 runs each job on two CPU ranks
(gloo, CFG parallel) under the launcher, a real process, with a private Redis and S3 (moto).

The tests share one group and run in order: the video, a cancel, a SIGKILL of rank 1 (the group
restarts), then SIGTERM of the launcher.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from farm_helpers import RedisServer, WorkerProcess, farm_env, join_as_client, wait_for

from smartdiff.farm.storage import VideoStore
from smartdiff.pipeline.video import read_mp4
from smartdiff.producer import Client, FarmError
from smartdiff.world.evaluate import psnr

pytestmark = pytest.mark.timeout(240)

PROFILE = "tiny-cfg2"
LONG = {"size": "128x128", "frames": 33, "steps": 600}  # about 10 s on two CPU ranks


class GroupFarm:
    """One private Redis, a bucket, and ``smartdiff worker --profile tiny-cfg2 --gpus none``."""

    def __init__(self, tmp: Path, s3_endpoint: str, checkpoint_root: Path, env: pytest.MonkeyPatch):
        self.redis_server = RedisServer(tmp)
        self.redis_server.start()
        bucket = f"group-{uuid.uuid4().hex[:10]}"
        self.env = farm_env(
            self.redis_server.url, s3_endpoint, checkpoint_root, tmp / "work", SMARTDIFF_S3_BUCKET=bucket
        )
        # This process talks to S3 and loads the single-process reference model too.
        self.settings = join_as_client(self.env, env)
        self.video_store = VideoStore(self.settings)
        self.video_store.ensure_bucket()
        self.client = Client(self.settings)
        self.redis = redis.Redis.from_url(self.redis_server.url, decode_responses=True)
        self.launcher = WorkerProcess(self.env, tmp / "group.log", profile=PROFILE).start()

    def rank_pids(self) -> list[int]:
        """The pids of the current group's ranks, in rank order, as the launcher logged them."""
        started = re.findall(r"worker group started: pids \[([\d, ]+)\]", self.launcher.log())
        assert started, self.launcher.log()[-3000:]
        return [int(pid) for pid in started[-1].split(",")]

    def wait_group(self, pids_before: list[int] | None = None) -> str:
        """Wait for a group (other than ``pids_before``) to serve; returns its worker id (rank 0's)."""

        def ready():
            assert self.launcher.alive(), self.launcher.log()[-3000:]
            started = re.findall(r"worker group started", self.launcher.log())
            if not started or self.rank_pids() == pids_before:
                return None
            worker_id = f"{socket.gethostname()}-{self.rank_pids()[0]}"
            return worker_id if any(w["id"] == worker_id for w in self.client.workers(PROFILE)) else None

        return wait_for(ready, 90, "the worker group to announce itself")

    def submit(self, **params):
        params.setdefault("prompt", "a red ball moving left")
        return self.client.submit(PROFILE, **params)

    def wait_running(self, job, min_step: int) -> dict:
        def running():
            record = job.status()
            ok = record["state"] == "RUNNING" and record["stage"] == "denoise" and record["step"] >= min_step
            return record if ok else None

        return wait_for(running, 60, "the job to run")

    def objects(self) -> list[str]:
        listed = self.video_store.client.list_objects_v2(Bucket=self.settings.s3_bucket)
        return sorted(o["Key"] for o in listed.get("Contents", []))

    def close(self) -> None:
        self.launcher.stop()
        self.redis_server.stop()


@pytest.fixture(scope="module")
def farm(tmp_path_factory, s3_endpoint, tiny_checkpoint):
    with pytest.MonkeyPatch.context() as env:
        group = None
        try:
            group = GroupFarm(tmp_path_factory.mktemp("group"), s3_endpoint, tiny_checkpoint.parent, env)
            group.worker_id = group.wait_group()
            yield group
        finally:
            if group is not None:
                group.close()


def frames_of(farm: GroupFarm, job_id: str) -> np.ndarray:
    """The frames of a job's stored video (videos/<job id>.mp4)."""
    body = farm.video_store.client.get_object(Bucket=farm.settings.s3_bucket, Key=f"videos/{job_id}.mp4")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "video.mp4"
        path.write_bytes(body["Body"].read())
        return read_mp4(path)[0]


def successes_in_logs(farm: GroupFarm, job_id: str) -> int:
    lines = farm.launcher.log().splitlines()
    return sum(1 for line in lines if job_id in line and '"msg": "job SUCCEEDED"' in line)


def single_process_record(farm: GroupFarm, params: dict) -> dict:
    """The same job on a one-process worker (profile tiny), run in this process."""
    import torch

    from smartdiff.farm.celery_app import make_celery
    from smartdiff.pipeline.config import load_profile
    from smartdiff.worker.service import WorkerService

    service = WorkerService(farm.settings, load_profile("tiny"), make_celery(farm.settings))
    service.load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1): the same summation order
    try:
        outcome = service.execute("single0001", [], {"profile": "tiny", "params": params})
    finally:
        torch.set_num_threads(threads)
    assert outcome["state"] == "SUCCEEDED", farm.client.store.get("single0001")
    return farm.client.store.get("single0001").to_dict()


def test_group_video_equals_the_single_process_video(farm):
    job = farm.submit(seed=3, steps=8, guidance=5.0)
    record = job.wait(timeout=60)
    assert record["worker"] == farm.worker_id and record["attempt"] == 1
    assert record["result"]["profile"] == PROFILE
    # Rank 0 evaluated one branch per step (its partner the other): the job ran CFG parallel.
    assert record["result"]["cache"]["computed"] == 8
    assert set(record["seconds"]) == {"text_encode", "denoise", "vae_decode", "encode", "upload"}
    single = single_process_record(farm, record["params"])
    assert single["result"]["cache"]["computed"] == 16
    group_frames, single_frames = frames_of(farm, job.id), frames_of(farm, "single0001")
    assert group_frames.shape == single_frames.shape == (9, 64, 64, 3)
    # The ranks and this process sum in different orders; H.264 can turn a one-level difference into
    # a few levels within one block (seen: 0.1% of values differ, by at most 5). Nearly all are equal.
    assert np.mean(group_frames != single_frames) < 0.01 and psnr(group_frames, single_frames) > 50
    assert np.ptp(group_frames) > 0  # a real picture, not a constant


def test_cancel_mid_job_stops_every_rank_and_the_group_serves_on(farm):
    pids = farm.rank_pids()
    job = farm.submit(**LONG)
    farm.wait_running(job, 3)
    assert job.cancel() == "RUNNING"
    with pytest.raises(FarmError) as info:
        job.wait(timeout=20)
    record = info.value.record
    assert record["state"] == "CANCELLED" and "cancelled during denoise" in record["error_message"]
    assert record["step"] < LONG["steps"]
    wait_for(lambda: "rank 0 stopped the job" in farm.launcher.log(), 10, "rank 1 to leave the job")
    # The same group, in step, takes the next job.
    assert farm.submit(seed=1, steps=4).wait(timeout=60)["worker"] == farm.worker_id
    assert farm.rank_pids() == pids and farm.launcher.alive()
    assert f"videos/{job.id}.mp4" not in farm.objects()


def test_sigkill_of_rank_1_requeues_the_job_and_restarts_the_group(farm):
    old_pids = farm.rank_pids()
    job = farm.submit(**{**LONG, "steps": 300})
    farm.wait_running(job, 3)
    os.kill(old_pids[1], signal.SIGKILL)
    killed_at = time.time()
    new_worker = farm.wait_group(old_pids)
    record = job.wait(timeout=120)
    # Requeued by the new rank 0's reaper once the lease ran out, then finished once, by the new group.
    assert record["state"] == "SUCCEEDED" and record["attempt"] == 2
    assert record["worker"] == new_worker != farm.worker_id
    assert record["started_at"] > killed_at
    assert farm.objects().count(f"videos/{job.id}.mp4") == 1
    assert successes_in_logs(farm, job.id) == 1
    assert re.search(
        r"the group ended \(exit codes by rank: \{0: -?\d+, 1: -9\}\); restarting it", farm.launcher.log()
    )
    for pid in old_pids:  # the whole old group is gone, rank 0 included
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()
    farm.worker_id = new_worker


def test_sigterm_stops_the_whole_group(farm):
    pids = farm.rank_pids()
    farm.launcher.signal(signal.SIGTERM)
    assert farm.launcher.wait(60) == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    assert "Traceback" not in farm.launcher.log().split("worker group started")[-1]
