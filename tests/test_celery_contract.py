"""The farm as Celery users know it: Celery's own tools, and other services' producers following the
wire contract (docs/WIRE.md), against a real Redis and real worker processes."""

from __future__ import annotations

import base64
import inspect
import json
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer
from farm_helpers import LONG, Farm, wait_for
from kombu import Connection
from kombu.transport import redis as kombu_redis

from smartdiff.farm.wire import TASK_NAME, UNACKED_HASH, priority_list
from smartdiff.producer import FarmError
from smartdiff.worker.transport import Transport

pytestmark = pytest.mark.timeout(300)


def celery(farm: Farm, *args: str) -> subprocess.CompletedProcess:
    """``celery -A smartdiff.farm.celery_app ARGS`` against the farm, as an operator runs it."""
    command = [sys.executable, "-P", "-m", "celery", "-A", "smartdiff.farm.celery_app", *args]
    return subprocess.run(command, env=farm.env, capture_output=True, text=True, timeout=60)


def wire_message(job_id: str, profile: str, params: dict, priority: int) -> str:
    """A job as a service with no Celery writes it straight into Redis, following docs/WIRE.md."""
    body = json.dumps([[], {"profile": profile, "params": params}, {}])
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": TASK_NAME, "id": job_id, "root_id": job_id, "retries": 0},
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_mode": 2,
                "priority": priority,
                "delivery_info": {"exchange": "", "routing_key": profile},
            },
        }
    )


def finished(farm: Farm, job_id: str, timeout: float = 120) -> dict:
    try:
        return farm.client.job(job_id).wait(timeout=timeout)
    except FarmError as error:
        return error.record


# --- the overrides Celery and kombu settings cannot replace -----------------------------------


def test_the_overridden_kombu_and_celery_methods_are_the_ones_written_against():
    """worker/transport.py and worker/consumer.py override these; a release that renames or
    reshapes one must fail here, not in production."""
    expected = {
        (kombu_redis.Channel, "_brpop_read"): "(self, **options)",
        (kombu_redis.Channel, "_brpop_start"): "(self, timeout=None)",
        (kombu_redis.Channel, "priority"): "(self, n)",
        (kombu_redis.Transport, "_deliver"): "(self, message, queue)",
        (CeleryConsumer, "on_decode_error"): "(self, message, exc)",
    }
    for (cls, name), signature in expected.items():
        assert str(inspect.signature(getattr(cls, name))) == signature, f"{cls.__name__}.{name}"
    # BRPOP reads the lists in the order of priority_steps, which our channel reverses.
    assert "for pri in self.priority_steps" in inspect.getsource(kombu_redis.Channel._brpop_start)


def test_workers_read_the_most_urgent_list_first(tmp_path):
    from farm_helpers import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        for priority in (0, 5, 9, 3):
            client.lpush(priority_list("q", priority), wire_message(f"job-{priority}", "q", {}, priority))
        options = {"priority_steps": list(range(10))}
        with Connection(server.url, transport=Transport, transport_options=options) as conn:
            channel = conn.default_channel
            assert channel.priority_steps == list(range(9, -1, -1))
            assert [channel._q_for_pri("q", p) for p in (0, 5)] == ["q", priority_list("q", 5)]
            order = [channel._get("q")["headers"]["id"] for _ in range(4)]
        assert order == ["job-9", "job-5", "job-3", "job-0"]
    finally:
        server.stop()


# --- Celery's own tools -----------------------------------------------------------------------


def test_inspect_ping_active_and_revoke_work_against_busy_workers(farm):
    worker = farm.worker()
    # The worker announces itself once its model is loaded; Celery's consumer starts a moment later.
    ping = wait_for(
        lambda: (lambda done: done if done.returncode == 0 else None)(
            celery(farm, "inspect", "ping", "--timeout", "2")
        ),
        60,
        "the worker to answer ping",
    )
    assert "pong" in ping.stdout and worker.worker_id() in ping.stdout, ping
    running = farm.submit(**{**LONG, "steps": 1000})  # about 17 s: several commands' time
    queued = farm.submit(seed=3)
    farm.wait_running(running)
    # Answered while the job runs (the job has a thread of its own).
    active = celery(farm, "inspect", "active", "--json", "--timeout", "10")
    assert active.returncode == 0 and running.id in active.stdout, active
    # revoke is our cancel: the queued job ends when a worker meets it, the running one at its next step.
    revoke = celery(farm, "control", "revoke", queued.id, running.id)
    assert revoke.returncode == 0, revoke
    record = finished(farm, running.id, 60)
    assert record["state"] == "CANCELLED" and record["error_message"] == "revoked during denoise"
    assert record["step"] < 1000
    record = finished(farm, queued.id, 60)
    assert record["state"] == "CANCELLED" and record["error_message"] == "revoked before it started"
    assert farm.objects() == [] and worker.alive()
    stats = celery(farm, "inspect", "stats", "--json", "--timeout", "10")
    assert stats.returncode == 0 and '"pool"' in stats.stdout, stats


def test_purged_messages_end_their_records(farm):
    farm.worker()  # serves tiny; its reaper looks after every queued job
    job = farm.client.submit("tiny-cfg2", prompt="a red ball", queue_anyway=True)  # no worker serves it
    purge = celery(farm, "purge", "-f", "-Q", "tiny-cfg2")
    assert purge.returncode == 0 and "1 message" in purge.stdout, purge
    record = finished(farm, job.id, 90)
    assert record["state"] == "CANCELLED" and record["error_code"] == "PURGED"
    assert "purged from the queue" in record["error_message"]


# --- other services' producers ----------------------------------------------------------------


def test_plain_celery_and_raw_redis_producers_at_every_priority(farm):
    farm.worker()
    blocker = farm.submit(**LONG)
    farm.wait_running(blocker, 1)
    plain = Celery(broker=farm.redis_server.url)  # a default Celery app: nothing of ours
    sent = {}
    for priority in (0, 5, 9):
        params = {"prompt": "a red ball moving left", "seed": priority}
        job = plain.send_task(
            TASK_NAME, kwargs={"profile": "tiny", "params": params}, queue="tiny", priority=priority
        )
        sent[job.id] = priority
        job_id = f"raw-{uuid.uuid4().hex}"
        farm.redis.lpush(priority_list("tiny", priority), wire_message(job_id, "tiny", params, priority))
        sent[job_id] = priority
    # Visible to status from the moment it is queued, with the priority it was sent with.
    for job_id, priority in sent.items():
        record = farm.client.record(job_id)
        assert (record["state"], record["priority"], record["profile"]) == ("QUEUED", priority, "tiny")
    blocker.cancel()
    records = {job_id: finished(farm, job_id) for job_id in sent}
    assert all(r["state"] == "SUCCEEDED" for r in records.values()), records
    assert all(records[job_id]["priority"] == priority for job_id, priority in sent.items())
    started = sorted(sent, key=lambda job_id: records[job_id]["started_at"])
    assert [sent[job_id] for job_id in started] == [9, 9, 5, 5, 0, 0]  # most urgent first


def test_a_job_id_with_colons_is_requeued_after_sigkill_and_leaves_no_stale_delivery(farm):
    victim = farm.worker()
    job_id = f"billing:{uuid.uuid4().hex[:12]}"
    plain = Celery(broker=farm.redis_server.url)
    plain.send_task(
        TASK_NAME, kwargs={"profile": "tiny", "params": {"prompt": "x", **LONG}}, task_id=job_id, queue="tiny"
    )
    wait_for(
        lambda: (r := farm.client.store.get(job_id)) and r.state == "RUNNING" and r.step >= 5,
        60,
        "the job to run",
    )
    survivor = farm.worker()
    victim.signal(signal.SIGKILL)
    record = finished(farm, job_id)
    assert (
        record["state"] == "SUCCEEDED" and record["worker"] == survivor.worker_id() and record["attempt"] == 2
    )
    # The victim's delivery was forgotten when the job was sent again: kombu will not bring it back.
    stale = [e for e in farm.redis.hvals(UNACKED_HASH) if job_id in e]
    assert stale == []


def test_a_cancel_pending_when_the_worker_dies_ends_the_job(farm):
    victim = farm.worker()
    job = farm.submit(**LONG)
    farm.wait_running(job)
    victim.signal(signal.SIGSTOP)  # frozen mid-step: it never sees the cancel
    assert job.cancel() == "RUNNING"
    victim.signal(signal.SIGKILL)
    farm.worker()  # its reaper finds the lease run out
    record = finished(farm, job.id, 60)
    assert record["state"] == "CANCELLED" and record["attempt"] == 1
    assert (
        record["error_message"] == "cancelled during denoise; its worker stopped before it could end the job"
    )


def test_flower_shows_the_live_workers_and_their_tasks(farm):
    import httpx
    from farm_helpers import free_port

    worker = farm.worker()
    port = free_port()
    command = [sys.executable, "-P", "-m", "celery", "-A", "smartdiff.farm.celery_app", "flower"]
    command += [f"--port={port}", "--address=127.0.0.1"]
    env = {**farm.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"

        def answer(path: str):
            try:
                response = httpx.get(url + path, timeout=5)
            except httpx.HTTPError:
                return None
            return response.json() if response.status_code == 200 else None

        workers = wait_for(lambda: answer("/api/workers?refresh=1"), 60, "Flower to list the workers")
        assert any(worker.worker_id() in name for name in workers), workers
        # Tasks come from the events the workers send: one more job, now that Flower listens.
        job = farm.submit(seed=5)
        job.wait(timeout=60)
        tasks = wait_for(lambda: (answer("/api/tasks") or {}).get(job.id), 60, "Flower to see the task")
        assert tasks["name"] == TASK_NAME and tasks["state"] == "SUCCESS", tasks
    finally:
        flower.terminate()
        flower.wait(10)


def test_records_in_another_database_than_the_queues(farm):
    """SMARTDIFF_REDIS_URL apart from the broker: the queues are still read where they are."""
    from smartdiff.producer import Client

    records = farm.redis_server.url.rsplit("/", 1)[0] + "/3"
    farm.env["SMARTDIFF_REDIS_URL"] = records
    client = farm.client = Client(farm.settings.model_copy(update={"redis_url": records}))
    farm.worker()  # serves tiny; its reaper looks after every queued job
    ours = client.submit("tiny-cfg2", prompt="a red ball", queue_anyway=True)  # no worker serves it
    plain = Celery(broker=farm.redis_server.url)
    theirs = plain.send_task(
        TASK_NAME, kwargs={"profile": "tiny-cfg2", "params": {"prompt": "x"}}, queue="tiny-cfg2"
    )
    assert client.record(theirs.id)["state"] == "QUEUED"  # found in the broker, recorded in db 3
    assert farm.redis.exists(f"smartdiff:job:{ours.id}") == 0  # not in the broker's database
    time.sleep(3 * farm.settings.lease_seconds + 6 * farm.settings.reaper_seconds)  # past two sweeps
    assert {client.record(job_id)["state"] for job_id in (ours.id, theirs.id)} == {"QUEUED"}
    assert celery(farm, "purge", "-f", "-Q", "tiny-cfg2").returncode == 0
    wait_for(lambda: client.record(ours.id)["error_code"] == "PURGED", 90, "the purge to be noticed")
