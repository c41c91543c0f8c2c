"""The farm end to end: a real Redis (AOF, private), a real S3 endpoint on loopback (moto), real
worker processes on the tiny model, the Python client. Killing, stopping and breaking things."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import urllib.request
import uuid

import pytest
from farm_helpers import LONG, Farm, wait_for
from kombu import Connection, Producer
from s3_server import FlakyProxy

from smartdiff.cli import python_module_command
from smartdiff.farm.records import REJECTED_LIST, job_key
from smartdiff.farm.wire import TASK_NAME
from smartdiff.pipeline.video import read_mp4
from smartdiff.producer import FarmError

pytestmark = pytest.mark.timeout(300)

SECRET = "farm-test-secret-7f3a9c"
KEY_ID = "farm-test-key-id"


def download(record) -> bytes:
    with urllib.request.urlopen(record["result"]["url"]) as response:
        return response.read()


def check_video(record, expected_frames: int) -> None:
    data = download(record)
    assert hashlib.sha256(data).hexdigest() == record["result"]["sha256"]
    assert len(data) == record["result"]["size"]
    path = record["id"] + ".mp4"
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / path).write_bytes(data)
        frames, meta = read_mp4(Path(folder) / path)
    assert frames.shape[0] == expected_frames and meta["codec"] == "h264"


def successes_in_logs(farm: Farm, job_id: str) -> int:
    return sum(1 for line in farm.logs().splitlines() if job_id in line and '"msg": "job SUCCEEDED"' in line)


def test_eight_jobs_over_two_workers(farm):
    first, second = farm.worker(), farm.worker()
    jobs = [farm.submit(seed=i, steps=150, frames=9 + 4 * (i % 3)) for i in range(8)]
    seen_steps = {job.id: set() for job in jobs}
    records = {}
    deadline = time.monotonic() + 180
    while len(records) < len(jobs) and time.monotonic() < deadline:
        for job in jobs:
            if job.id in records:
                continue
            record = job.status()
            if record["state"] == "RUNNING" and record["stage"] == "denoise":
                seen_steps[job.id].add(record["step"])
            if record["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                records[job.id] = record
        time.sleep(0.02)
    assert all(r["state"] == "SUCCEEDED" for r in records.values()), [
        r["error_message"] for r in records.values()
    ]
    assert len(records) == 8
    # Exactly one object per job, under its own key.
    assert farm.objects() == sorted(f"videos/{job.id}.mp4" for job in jobs)
    for i, job in enumerate(jobs):
        record = records[job.id]
        check_video(record, 9 + 4 * (i % 3))
        assert record["result"]["seed"] == i and record["result"]["profile"] == "tiny"
        assert set(record["seconds"]) == {"text_encode", "denoise", "vae_decode", "encode", "upload"}
        assert record["result"]["cache"] == {
            "strategy": "none",
            "computed": 300,
            "reused": 0,
            "peak_cache_bytes": 0,
        }
        assert record["attempt"] == 1 and record["step"] == record["steps"] == 150
    # Progress was visible and rising while jobs ran.
    rising = [sorted(s) for s in seen_steps.values() if len(s) >= 2]
    assert rising, "no job was seen at two different steps"
    # Both workers took jobs.
    assert {r["worker"] for r in records.values()} == {first.worker_id(), second.worker_id()}


def test_priorities_order_the_queue(farm):
    farm.worker()
    blocker = farm.submit(**LONG)
    farm.wait_running(blocker, 1)
    low = [farm.submit(priority=1, seed=i) for i in range(2)]
    high = farm.submit(priority=9, seed=5)
    blocker.cancel()
    for job in [*low, high]:
        job.wait(timeout=60)
    started = {job.id: job.status()["started_at"] for job in [*low, high]}
    assert started[high.id] < min(started[j.id] for j in low)


def test_cancel_mid_job_and_while_queued(farm):
    farm.worker()
    running = farm.submit(**LONG)
    queued = farm.submit(seed=7)
    farm.wait_running(running)
    assert queued.cancel() == "CANCELLED"  # queued: at once
    assert running.cancel() == "RUNNING"  # running: at the next step
    with pytest.raises(FarmError) as info:
        running.wait(timeout=10)
    record = info.value.record
    assert record["state"] == "CANCELLED" and "cancelled during denoise" in record["error_message"]
    assert record["step"] < LONG["steps"]
    assert queued.status()["state"] == "CANCELLED" and queued.status()["started_at"] == 0
    assert farm.objects() == []
    # The worker serves on.
    assert farm.submit(seed=1).wait(timeout=60)["state"] == "SUCCEEDED"


def test_sigkill_mid_job_finishes_once_elsewhere_within_the_bound(farm):
    victim = farm.worker()
    job = farm.submit(**LONG)
    farm.wait_running(job)
    assert job.status()["worker"] == victim.worker_id()
    survivor = farm.worker()
    # A duplicate delivery while it runs elsewhere is not run a second time.
    farm.client.app.send_task(
        TASK_NAME, kwargs={"profile": "tiny", "params": job.status()["params"]}, task_id=job.id, queue="tiny"
    )
    wait_for(
        lambda: f'"job_id": "{job.id}"' in survivor.log() and "not running: busy" in survivor.log(),
        30,
        "the survivor to refuse the duplicate",
    )
    victim.signal(signal.SIGKILL)
    killed_at = time.time()
    record = job.wait(timeout=120)
    assert record["state"] == "SUCCEEDED" and record["worker"] == survivor.worker_id()
    assert record["attempt"] == 2
    bound = farm.settings.lease_seconds + farm.settings.reaper_seconds
    assert record["started_at"] - killed_at <= bound + 3
    assert farm.objects() == [f"videos/{job.id}.mp4"]
    check_video(record, LONG["frames"])
    assert successes_in_logs(farm, job.id) == 1
    # A redelivered finished job returns its record and runs nothing.
    farm.client.app.send_task(
        TASK_NAME, kwargs={"profile": "tiny", "params": record["params"]}, task_id=job.id, queue="tiny"
    )
    wait_for(lambda: "not running: finished" in survivor.log(), 30, "the redelivery to be refused")
    assert job.status()["finished_at"] == record["finished_at"]
    assert successes_in_logs(farm, job.id) == 1


def test_sigterm_drain_finishes_the_job_then_exits(farm):
    worker = farm.worker(SMARTDIFF_SHUTDOWN="drain")
    job = farm.submit(**LONG)
    farm.wait_running(job)
    worker.signal(signal.SIGTERM)
    assert worker.wait(120) == 0
    record = job.status()
    assert (
        record["state"] == "SUCCEEDED" and record["worker"] == worker.worker_id() and record["attempt"] == 1
    )


def test_sigterm_requeue_hands_the_job_back_at_once(farm):
    leaving = farm.worker(SMARTDIFF_SHUTDOWN="requeue")
    job = farm.submit(**LONG)
    farm.wait_running(job)
    staying = farm.worker()
    start = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(30) == 0
    assert time.monotonic() - start < 10  # stopped at its next step, not after the job
    record = job.wait(timeout=120)
    assert record["worker"] == staying.worker_id()
    assert record["attempt"] == 1  # a clean hand-back costs no attempt
    assert successes_in_logs(farm, job.id) == 1


def test_redis_restart_mid_job(farm):
    worker = farm.worker()
    job = farm.submit(**LONG)
    farm.wait_running(job)
    farm.redis_server.restart(down_seconds=1.0)
    record = job.wait(timeout=120)
    assert record["state"] == "SUCCEEDED" and record["attempt"] == 1
    assert worker.alive()
    assert farm.submit(seed=3).wait(timeout=60)["state"] == "SUCCEEDED"
    assert successes_in_logs(farm, job.id) == 1


def test_s3_failing_the_first_uploads_is_retried_without_regenerating(farm):
    with FlakyProxy(farm.s3_endpoint) as proxy:
        proxy.set_failures(2, ("PUT",), path_contains="/videos/")
        worker = farm.worker(SMARTDIFF_S3_ENDPOINT=proxy.url, SMARTDIFF_S3_PUBLIC_ENDPOINT=farm.s3_endpoint)
        job = farm.submit(seed=11)
        record = job.wait(timeout=120)
        assert proxy.injected == 2
    # Claimed once (attempt 1) and finished once: the video was made once, only the upload repeated.
    assert record["state"] == "SUCCEEDED" and record["attempt"] == 1
    assert successes_in_logs(farm, job.id) == 1
    assert "farm-test-secret" not in worker.log()
    check_video(record, 9)


def test_a_storage_outage_during_the_upload_costs_no_compute(farm):
    with FlakyProxy(farm.s3_endpoint) as proxy:
        worker = farm.worker(SMARTDIFF_S3_ENDPOINT=proxy.url, SMARTDIFF_S3_PUBLIC_ENDPOINT=farm.s3_endpoint)
        proxy.outage(20.0, "reset")  # connections reset for 20 s, as while a storage restarts
        job = farm.submit(seed=11)
        wait_for(lambda: job.status()["stage"] == "upload", 30, "the upload to start")
        record = job.wait(timeout=120)
        assert proxy.outage_requests >= 2
    # Generated once, uploaded once the storage was back; the lease held all along (attempt 1).
    assert record["state"] == "SUCCEEDED" and record["attempt"] == 1 and record["seconds"]["upload"] > 10
    assert successes_in_logs(farm, job.id) == 1 and worker.alive()
    check_video(record, 9)


def test_past_the_upload_budget_the_video_waits_on_its_worker(farm):
    with FlakyProxy(farm.s3_endpoint) as proxy:
        worker = farm.worker(
            SMARTDIFF_S3_ENDPOINT=proxy.url,
            SMARTDIFF_S3_PUBLIC_ENDPOINT=farm.s3_endpoint,
            SMARTDIFF_UPLOAD_BUDGET_SECONDS=3,
            SMARTDIFF_S3_TIMEOUT_SECONDS=1,
        )
        proxy.outage(15.0, "hang")  # the storage hangs for longer than the budget
        job = farm.submit(seed=12)
        parked = wait_for(
            lambda: (lambda r: r if r["upload_pending"] else None)(job.status()),
            60,
            "the upload to be postponed",
        )
        assert parked["state"] == "RUNNING" and parked["stage"] == "upload"
        assert f"kept by worker {worker.worker_id()}" in parked["upload_pending"]
        record = job.wait(timeout=120)  # the worker offers it to the storage again until it answers
    assert record["state"] == "SUCCEEDED" and record["attempt"] == 1 and record["upload_pending"] == ""
    assert successes_in_logs(farm, job.id) == 1
    check_video(record, 9)
    assert list((farm.tmp / "work" / "upload-pending").glob("*")) == []


# --- bad input ------------------------------------------------------------------------------

CLIENT_CASES = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": "x", "size": "832x480"}, "size"),
    ({"prompt": "x", "size": "nonsense"}, "size"),
    ({"prompt": "x", "frames": 10}, "frames"),
    ({"prompt": "x", "frames": 10**9}, "frames"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 10**12}, "steps"),
    ({"prompt": "x", "steps": "many"}, "steps"),
    ({"prompt": "x", "guidance": 1e9}, "guidance"),
    ({"prompt": "x", "shift": -1}, "shift"),
    ({"prompt": "x", "seed": -5}, "seed"),
    ({"prompt": "x", "solver": "ddim"}, "solver"),
    ({"prompt": "x", "wings": True}, "wings"),
    ({"prompt": "x", "priority": 12}, "priority"),
    ({"prompt": "x", "priority": "high"}, "priority"),
    ({"prompt": "x", "job_id": "../../etc"}, "job_id"),
]


@pytest.mark.parametrize(("params", "field"), CLIENT_CASES)
def test_bad_input_through_the_client(farm, params, field):
    with pytest.raises(FarmError) as info:
        farm.client.submit("tiny", queue_anyway=True, **params)
    assert info.value.code == "INVALID_INPUT" and info.value.message.startswith(field)
    assert farm.redis.keys("smartdiff:job:*") == []  # nothing recorded, nothing queued
    assert farm.redis.llen("tiny") == 0


def test_unknown_profile_and_no_live_worker(farm):
    with pytest.raises(FarmError, match="UNKNOWN_PROFILE: unknown profile 'nope'"):
        farm.client.submit("nope", "a cat")
    with pytest.raises(FarmError, match="NO_WORKER: no live worker serves profile 'tiny'"):
        farm.client.submit("tiny", "a cat")
    with pytest.raises(FarmError, match="flexcache: 'teacache' is not allowed on this profile"):
        farm.client.submit("wan2.1-1.3b-lossless", "a cat", queue_anyway=True, flexcache="teacache")
    with pytest.raises(FarmError, match="cfg_cache_interval: the CFG cache is not allowed on profile"):
        farm.client.submit("wan2.1-1.3b-lossless", "a cat", queue_anyway=True, cfg_cache_interval=2)
    # PAB with the CFG cache over the whole schedule: the tiny model's 4 steps reuse the
    # unconditional branch at steps 1 and 3.
    cfg_cache = {"cfg_cache_interval": 2, "cfg_cache_start": 0, "cfg_cache_end": 1000}
    queued = farm.client.submit("tiny", "a cat", queue_anyway=True, flexcache="pab", **cfg_cache)
    assert queued.status()["state"] == "QUEUED"
    worker = farm.worker()  # a worker started later takes the waiting job
    record = queued.wait(timeout=60)
    assert record["worker"] == worker.worker_id()
    cache = record["result"]["cache"]
    assert (cache["strategy"], cache["computed"], cache["uncond_reused"]) == ("pab", 6, 2)


def raw_publish(farm, body, *, serializer="json", task=TASK_NAME, job_id=None, content_type=None):
    job_id = job_id or uuid.uuid4().hex
    headers = {"task": task, "id": job_id, "lang": "py"}
    with Connection(farm.redis_server.url) as conn:
        kwargs = (
            {"serializer": serializer}
            if content_type is None
            else {"content_type": content_type, "content_encoding": "utf-8"}
        )
        Producer(conn).publish(body, routing_key="tiny", headers=headers, declare=[], **kwargs)
    return job_id


RAW_CASES = [
    # (body, publish options, expected words in the job's error message)
    ([[], {"profile": "tiny", "params": {"prompt": "x"}}, {}], {"serializer": "pickle"}, "untrusted content"),
    ("{not json", {"content_type": "application/json"}, "could not be decoded"),
    ([[], {"profile": "tiny"}, {}], {}, "params: missing"),
    ([[], {"params": {"prompt": "x"}}, {}], {}, "reached a 'tiny' worker"),
    ([[], {"profile": "other", "params": {"prompt": "x"}}, {}], {}, "'other'"),
    ([[], {"profile": "tiny", "params": "prompt=x"}, {}], {}, "params: missing, or not a JSON object"),
    ([[], {"profile": "tiny", "params": {"prompt": "x", "steps": "ten"}}, {}], {}, "steps: must be a number"),
    ([[], {"profile": "tiny", "params": {"prompt": "x", "frames": 12}}, {}], {}, "frames: must be 4n+1"),
    ([[], {"profile": "tiny", "params": {"prompt": "x" * 100_000}}, {}], {}, "the limit is"),
    ([[], {"profile": "tiny", "params": {"prompt": "x", "size": "99999x99999"}}, {}], {}, "not supported"),
    ([[], {"profile": "tiny", "params": {"prompt": "x", "seed": 2**80}}, {}], {}, "seed"),
    ([[], {"profile": "tiny", "params": {}}, {}], {}, "prompt: is required"),
    ([["a", "b"], {"profile": "tiny", "params": {"prompt": "x"}}, {}], {}, "positional arguments"),
    ([[], {"profile": "tiny", "params": {"prompt": "x"}, "evil": 1}, {}], {}, "unknown message fields: evil"),
    (
        [[], {"profile": "tiny", "params": {"prompt": "x"}}, {}],
        {"task": "os.system"},
        "unknown task 'os.system'",
    ),
    # Celery's own tasks are not run either: the worker registers only ours.
    ([[], {}, {}], {"task": "celery.backend_cleanup"}, "unknown task 'celery.backend_cleanup'"),
]


def test_bad_raw_messages_pushed_into_redis(farm):
    worker = farm.worker()
    ids = []
    for body, options, _ in RAW_CASES:
        task = options.get("task", TASK_NAME)
        publish = {k: v for k, v in options.items() if k != "task"}
        ids.append(raw_publish(farm, body, task=task, **publish))
    # Entries that are not even kombu envelopes, straight into the queue's list.
    farm.redis.lpush("tiny", "garbage \x00\x01")
    farm.redis.lpush("tiny", json.dumps({"body": "%%%", "headers": {}, "properties": {}}))
    farm.redis.lpush("tiny", json.dumps([1, 2, 3]))
    for job_id, (_, _, words) in zip(ids, RAW_CASES):
        record = wait_for(
            lambda job_id=job_id: (lambda r: r if r and r.state == "FAILED" else None)(
                farm.client.store.get(job_id)
            ),
            30,
            f"job {job_id} to be refused",
        )
        assert record.error_code in ("INVALID_INPUT", "INVALID_MESSAGE")
        assert words in record.error_message, (words, record.error_message)

    def dropped() -> int:
        rejected = [json.loads(e) for e in farm.redis.lrange(REJECTED_LIST, 0, -1)]
        return sum("unreadable queue entry dropped" in e["reason"] for e in rejected)

    wait_for(lambda: dropped() == 3, 30, "the three unreadable entries to be dropped and noted")
    assert farm.redis.llen("tiny") == 0
    assert worker.alive()
    # Nothing else lost: a good job still runs, once.
    assert farm.submit(seed=2).wait(timeout=60)["state"] == "SUCCEEDED"
    assert len(CLIENT_CASES) + len(RAW_CASES) + 3 >= 30


def test_oom_fails_the_job_with_advice_and_the_worker_serves_on(farm):
    from smartdiff.farm.celery_app import make_celery
    from smartdiff.pipeline.config import load_profile
    from smartdiff.pipeline.params import validate_params
    from smartdiff.worker.service import WorkerService

    class OutOfMemoryPipeline:
        def generate(self, params, progress):
            import torch

            progress("denoise", 1, params.steps)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    profile = load_profile("tiny")
    service = WorkerService(
        farm.settings, profile, make_celery(farm.settings), pipeline=OutOfMemoryPipeline()
    )
    params = validate_params({"prompt": "x", "seed": 1}, profile.model_config)
    outcome = service.execute("oomjob0001", [], {"profile": "tiny", "params": params.to_dict()})
    assert outcome["state"] == "FAILED"
    record = farm.client.store.get("oomjob0001")
    assert record.error_code == "GPU_OUT_OF_MEMORY"
    assert "smaller size or fewer frames" in record.error_message and "64x64x9" in record.error_message
    assert "higher low_mem_level (this one runs level 0)" in record.error_message

    # A job the estimate says cannot fit is refused before it starts, with the same advice.
    class TightGpu(OutOfMemoryPipeline):
        def estimate_job_bytes(self, params):
            return 30 * 2**30

    service.pipeline = TightGpu()
    service.free_device_bytes = lambda: 8 * 2**30
    assert (
        service.execute("bigjob0001", [], {"profile": "tiny", "params": params.to_dict()})["state"]
        == "FAILED"
    )
    record = farm.client.store.get("bigjob0001")
    assert record.error_code == "WOULD_NOT_FIT" and record.stage != "denoise"
    assert "needs about 30.0 GiB" in record.error_message and "8.0 GiB are free" in record.error_message
    # The same service takes the next job.
    del service.free_device_bytes
    service.pipeline = None
    service.load()
    assert (
        service.execute("okjob00001", [], {"profile": "tiny", "params": params.to_dict()})["state"]
        == "SUCCEEDED"
    )


def test_credentials_never_in_records_messages_or_logs(farm):
    farm.worker()
    job = farm.submit(seed=4)
    job.wait(timeout=60)
    failed = raw_publish(farm, [[], {"profile": "tiny", "params": {"prompt": "x", "frames": 2}}, {}])
    wait_for(lambda: farm.client.store.get(failed) is not None, 30, "the bad job's record")
    everything = [farm.logs()]
    for key in farm.redis.keys("smartdiff:*"):
        kind = farm.redis.type(key)
        if kind == "hash":
            everything.append(json.dumps(farm.redis.hgetall(key)))
        elif kind == "string":
            everything.append(farm.redis.get(key))
        elif kind == "list":
            everything += farm.redis.lrange(key, 0, -1)
    # A message as it travels: queued for a profile no worker here serves, so it stays readable.
    farm.client.submit("wan2.1-1.3b-lossless", "a cat", queue_anyway=True, seed=9)
    for key in farm.redis.keys("*"):
        if farm.redis.type(key) == "list":
            everything += farm.redis.lrange(key, 0, -1)
    text = "\n".join(everything)
    assert SECRET not in text and KEY_ID not in text
    assert job.id in text  # the capture is not empty
    assert farm.redis.exists(job_key(job.id))


def test_metrics_and_structured_logs(farm):
    from farm_helpers import free_port

    port = free_port()
    worker = farm.worker(SMARTDIFF_METRICS_PORT=port)
    job = farm.submit(seed=6)
    job.wait(timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        metrics = response.read().decode()
    assert 'smartdiff_jobs_total{profile="tiny",state="SUCCEEDED"} 1.0' in metrics
    assert 'smartdiff_stage_seconds_count{profile="tiny",stage="upload"} 1.0' in metrics
    assert 'smartdiff_stage_seconds_bucket{le="3600.0",profile="tiny",stage="denoise"} 1.0' in metrics
    assert 'smartdiff_queue_wait_seconds_count{profile="tiny"} 1.0' in metrics
    # Every line the worker logged about the job is JSON and carries the job id.
    lines = [
        json.loads(line) for line in worker.log().splitlines() if line.startswith("{") and job.id in line
    ]
    assert len(lines) >= 2 and all(entry["job_id"] == job.id for entry in lines)
    assert {"ts", "level", "logger", "msg", "process"} <= set(lines[-1])


def test_command_line_submit_status_wait_cancel(farm):
    import subprocess

    farm.worker()

    def smartdiff(*args):
        done = subprocess.run(
            python_module_command("smartdiff", *args),
            env=farm.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])

    code, record = smartdiff(
        "submit", "--profile", "tiny", "--prompt", "a cat", "--seed", "3", "--wait", "--json"
    )
    assert (
        code == 0 and record["state"] == "SUCCEEDED" and record["result"]["url"].startswith(farm.s3_endpoint)
    )
    code, status = smartdiff("status", record["id"], "--json")
    assert code == 0 and status["result"]["sha256"] == record["result"]["sha256"]
    code, waited = smartdiff("wait", record["id"], "--json")
    assert code == 0 and waited["id"] == record["id"]
    code, error = smartdiff("submit", "--profile", "tiny", "--prompt", "a cat", "--frames", "6", "--json")
    assert code == 1 and error["error"]["code"] == "INVALID_INPUT" and "frames" in error["error"]["message"]
    code, queued = smartdiff(
        "submit", "--profile", "wan2.1-1.3b-lossless", "--prompt", "x", "--queue-anyway", "--json"
    )
    assert code == 0 and queued["state"] == "QUEUED"
    code, cancelled = smartdiff("cancel", queued["id"], "--json")
    assert code == 0 and cancelled["state"] == "CANCELLED"
    code, missing = smartdiff("status", "0123456789abcdef", "--json")
    assert code == 1 and missing["error"]["code"] == "NOT_FOUND"


def test_producer_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, smartdiff, smartdiff.producer, smartdiff.producer.cli, smartdiff.producer.api, "
        "smartdiff.producer.apikeys, smartdiff.producer.webhooks, "
        "smartdiff.farm.records, smartdiff.farm.storage, smartdiff.farm.celery_app; "
        "from smartdiff import Client; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_cpu_workers_share_the_hosts_cores(monkeypatch):
    import os

    import torch

    from smartdiff.farm.celery_app import make_celery
    from smartdiff.farm.settings import FarmSettings
    from smartdiff.pipeline.config import load_profile
    from smartdiff.worker.service import WorkerService

    def threads_chosen(settings: FarmSettings) -> list[int]:
        service = WorkerService(settings, load_profile("tiny"), make_celery(settings), video_store=object())
        peers = [{"device": "cpu"}] * 3 + [{"device": "cuda:0"}]  # this host's live workers
        monkeypatch.setattr(service.registry, "on_node", lambda node: peers)
        chosen: list[int] = []
        monkeypatch.setattr(torch, "set_num_threads", chosen.append)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 0)
        service.share_cpu()
        return chosen

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_chosen(FarmSettings()) == [2]  # 8 cores among 3 CPU workers
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert threads_chosen(FarmSettings()) == [1]  # never below one
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_chosen(FarmSettings()) == [3]  # the operator's choice
    assert threads_chosen(FarmSettings(cpu_threads=5)) == [5]  # SMARTDIFF_CPU_THREADS first
