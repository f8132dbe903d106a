"""Batch jobs: Redis Streams queue, workers on a StreamingRuntime, fMP4 spooled then multipart-uploaded to
a real S3 endpoint (moto's server mode), a killed worker's job reclaimed, cancel, dead letters, idempotency;
S3 down at upload time, Redis killed and restarted mid-job, a restarted worker uploading its spool."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from pydantic import ValidationError

from jobs.callbacks import CallbackPolicy
from jobs.queue import DEAD, GROUP, STREAM, JobQueue, KeyReused
from jobs.storage import S3Store
from jobs.worker import JobWorker, video_key
from longlive_client.schemas import SubmitJob
from longlive_core.live import StreamingRuntime
from longlive_core.pipeline import LongLivePipeline
from longlive_core.schedule import frames_total
from tests.serving import RedisServer, callback_server, free_port, redis_server

ROOT = Path(__file__).resolve().parents[1]
SIZE = (48, 32)
BUCKET = "longlive-videos"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
LOOPBACK_CALLBACKS = CallbackPolicy(allow=["127.0.0.1"], deadline_s=5)  # the tests' callback servers


@pytest.fixture(scope="module")
def redis_server_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_url(redis_server_url):
    """An empty database per test: no test's jobs are left in the next one's queue."""
    import redis

    redis.Redis.from_url(redis_server_url).flushdb()
    return redis_server_url


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    for name, value in CREDENTIALS.items():
        monkeypatch_module.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def pipe() -> LongLivePipeline:
    return LongLivePipeline.from_pretrained("tiny-random", device="cpu")


def job(seconds: float, **extra) -> SubmitJob:
    schedule = [{"at": 0, "prompt": "a red robot in a rainy city"}]
    schedule += [{"at": t, "prompt": f"scene {i}"} for i, t in enumerate((15, 30, 45)) if t < seconds]
    return SubmitJob(schedule=schedule, seconds=seconds, **extra)


def start_worker(pipe, queue, store, consumer: str, spool_dir: Path | None = None, **options) -> JobWorker:
    """A standalone worker, its own spool directory unless given; options: retry_s, retry_max_s, callbacks."""
    host = StreamingRuntime(pipe, max_sessions=1, size=SIZE)
    spool_dir = spool_dir or Path(tempfile.mkdtemp(prefix="spool-"))
    worker = JobWorker(host, queue, store, consumer, drive_engine=True, spool_dir=spool_dir, **options)
    worker.start()
    return worker


def wait_state(queue: JobQueue, job_id: str, states: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (record := queue.get(job_id))["state"] not in states:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    return record


def count_frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def open_uploads(store: S3Store) -> list:
    return store.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


def test_a_60_s_job_with_three_switches_lands_in_s3(pipe, redis_url, s3):
    queue, store = JobQueue(redis_url), S3Store(BUCKET, s3)
    with callback_server() as (recorder, port):
        request = job(60, callback_url=f"http://127.0.0.1:{port}/done")
        job_id, duplicate = queue.submit(request, frames_total(60))
        assert not duplicate
        worker = start_worker(pipe, queue, store, "w-60", callbacks=LOOPBACK_CALLBACKS)
        try:
            record = wait_state(queue, job_id, {"done", "failed"}, timeout=300)
            deadline = time.monotonic() + 10
            while not recorder.received and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            worker.shutdown()
    assert record["state"] == "done" and int(record["frames_done"]) == int(record["frames_total"]) == 969
    url = store.url(record["key"])
    data = httpx.get(url, timeout=30).content  # the presigned URL serves it
    assert count_frames(data) == 969
    assert not open_uploads(store)
    assert recorder.received == [(f"127.0.0.1:{port}", {"job_id": job_id, "state": "done"})]


def test_a_trickling_callback_server_does_not_delay_the_next_job(pipe, redis_url, s3):
    # The callback server answers a byte a second: the first job's callback holds a callback thread up to
    # its deadline, never the claim loop, so the second job is taken as soon as the first is done.
    queue, store = JobQueue(redis_url), S3Store(BUCKET, s3)
    with callback_server(trickle_s=1.0) as (recorder, port):
        first, _ = queue.submit(job(2, callback_url=f"http://127.0.0.1:{port}/slow"), frames_total(2))
        second, _ = queue.submit(job(2, seed=1), frames_total(2))
        worker = start_worker(pipe, queue, store, "w-trickle", callbacks=LOOPBACK_CALLBACKS)
        try:
            wait_state(queue, first, {"done"})
            done_at = time.monotonic()
            wait_state(queue, second, {"running", "uploading", "done"}, timeout=30)
            taken_after = time.monotonic() - done_at
            assert wait_state(queue, second, {"done", "failed"})["state"] == "done"
            assert recorder.received == [(f"127.0.0.1:{port}", {"job_id": first, "state": "done"})]
        finally:
            worker.shutdown()
    assert taken_after < 1.0 < LOOPBACK_CALLBACKS.deadline_s


def test_idempotency_key_returns_the_first_job(redis_url):
    queue = JobQueue(redis_url)
    first = queue.submit(job(5, idempotency_key="order-17"), frames_total(5))
    again = queue.submit(job(5, idempotency_key="order-17"), frames_total(5))
    assert again == (first[0], True)
    with pytest.raises(KeyReused):  # the same key with another body (tests/test_abuse_limits.py: clients)
        queue.submit(job(9, idempotency_key="order-17"), frames_total(9))
    assert queue.submit(job(5, idempotency_key="order-18"), 1)[0] != first[0]


def test_bad_schedules_are_rejected_naming_the_entry():
    with pytest.raises(ValidationError, match=r"schedule\[1\].*sorted"):
        SubmitJob(schedule=[{"at": 0, "prompt": "a"}, {"at": 0, "prompt": "b"}], seconds=10)
    with pytest.raises(ValidationError, match=r"schedule\[1\].*within the 10"):
        SubmitJob(schedule=[{"at": 0, "prompt": "a"}, {"at": 12, "prompt": "b"}], seconds=10)
    with pytest.raises(ValidationError, match="empty"):
        SubmitJob(schedule=[{"at": 0, "prompt": "  "}], seconds=10)


def test_a_killed_worker_s_job_is_redone_and_lands_exactly_once(pipe, redis_url, s3, tmp_path):
    queue, store = JobQueue(redis_url, stale_after_s=1.0), S3Store(BUCKET, s3)
    job_id, _ = queue.submit(job(20), frames_total(20))
    command = [
        sys.executable,
        "-m",
        "jobs.worker",
        "--redis",
        redis_url,
        "--bucket",
        BUCKET,
        "--endpoint-url",
        s3,
        "--consumer",
        "doomed",
        "--size",
        *map(str, SIZE),
        "--stale-after",
        "1",
        "--spool-dir",
        str(tmp_path / "spool-doomed"),
    ]
    doomed = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **CREDENTIALS}, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while int(queue.get(job_id)["frames_done"]) == 0:
            assert time.monotonic() < deadline and doomed.poll() is None
            time.sleep(0.05)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    assert queue.get(job_id)["state"] == "running" and not store.exists(video_key(job_id))
    worker = start_worker(pipe, queue, store, "rescuer")
    try:
        record = wait_state(queue, job_id, {"done", "failed"}, timeout=300)
    finally:
        worker.shutdown()
    assert record["state"] == "done" and record["consumer"] == "rescuer" and int(record["attempts"]) == 2
    listing = store.client.list_objects_v2(Bucket=BUCKET, Prefix=f"videos/{job_id}")
    assert [o["Key"] for o in listing["Contents"]] == [video_key(job_id)]
    body = store.client.get_object(Bucket=BUCKET, Key=video_key(job_id))["Body"].read()
    assert count_frames(body) == frames_total(20) and not open_uploads(store)


def test_cancel_stops_within_a_block_and_leaves_nothing(pipe, redis_url, s3):
    queue, store = JobQueue(redis_url), S3Store(BUCKET, s3)
    job_id, _ = queue.submit(job(60), frames_total(60))
    worker = start_worker(pipe, queue, store, "w-cancel")
    try:
        while int(queue.get(job_id)["frames_done"]) == 0:
            time.sleep(0.02)
        assert queue.cancel(job_id)
        at_cancel = int(queue.get(job_id)["frames_done"])
        record = wait_state(queue, job_id, {"cancelled"}, timeout=30)
    finally:
        worker.shutdown()
    assert int(record["frames_done"]) - at_cancel <= 12  # at most the block in flight
    assert not store.exists(video_key(job_id)) and not open_uploads(store)
    assert not queue.cancel(job_id)  # ended


def test_a_cancel_of_a_job_no_worker_runs_takes_effect_at_once_and_it_never_runs_again(pipe, redis_url, s3):
    # The slow cancel of issue 21: a job given back by a preempted worker (or held by a dead one) waits,
    # pending, for a stale re-claim; its cancel waited with it (60 s by default), and the re-claim counted
    # a second attempt. Here the re-claim comes after 3 s: the cancel must not wait for it.
    queue, store = JobQueue(redis_url, stale_after_s=3.0), S3Store(BUCKET, s3)
    job_id, _ = queue.submit(job(60), frames_total(60))
    worker = start_worker(pipe, queue, store, "w-preempted")
    try:
        wait_until(lambda: int(queue.get(job_id)["frames_done"]) > 0, 60)
        worker.preempt.set()  # a live session takes the slot: the job goes back, pending
        wait_state(queue, job_id, {"queued"}, timeout=30)
        started = time.monotonic()
        assert queue.cancel(job_id)
        record = wait_state(queue, job_id, {"cancelled"}, timeout=10)
        assert time.monotonic() - started < 1.0  # at once, not at the re-claim
        worker.preempt.clear()
        # The worker re-claims the stale entry and only acknowledges it: no attempt, no frame.
        wait_until(lambda: not queue.redis.xpending_range(STREAM, GROUP, "-", "+", 10), 30)
    finally:
        worker.shutdown()
    after = queue.get(job_id)
    assert after["state"] == "cancelled" and after["attempts"] == record["attempts"] == "0"
    assert after["frames_done"] == record["frames_done"]
    assert not store.exists(video_key(job_id)) and not open_uploads(store)


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_job_that_keeps_failing_goes_to_the_dead_letter_stream(pipe, redis_url, s3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="longlive.jobs")
    queue = JobQueue(redis_url, max_attempts=2, stale_after_s=0.2)
    store = S3Store("no-such-bucket", s3)  # every upload fails, and no retry would help
    spool = tmp_path / "spool"
    job_id, _ = queue.submit(job(2), frames_total(2))
    worker = start_worker(pipe, queue, store, "w-dead", spool, retry_s=0.05, retry_max_s=0.2)
    try:
        record = wait_state(queue, job_id, {"failed"}, timeout=60)
        wait_for(lambda: not list(spool.iterdir()), 10, "the dead job's spool file stays")
    finally:
        worker.shutdown()
    assert "NoSuchBucket" in record["error"]
    assert not messages(caplog, f"job {job_id}: upload failed")  # not taken for an outage
    assert messages(caplog, f"job {job_id}: its video is spooled already")  # the retry reused it
    dead = [fields for _, fields in queue.redis.xrange(DEAD)]
    assert {"job_id": job_id, "error": record["error"]} in dead


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_s3_down_when_a_job_ends_it_waits_uploading_and_lands_once_s3_is_back(
    pipe, redis_url, s3, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="longlive.jobs")
    port = free_port()  # no S3 listens here yet: S3 is down
    queue = JobQueue(redis_url, stale_after_s=2.0)
    store = S3Store(BUCKET, f"http://127.0.0.1:{port}", max_attempts=1)
    spool = tmp_path / "spool"
    job_id, _ = queue.submit(job(5), frames_total(5))
    worker = start_worker(pipe, queue, store, "w-s3-down", spool, retry_s=0.05, retry_max_s=0.2)
    rival, revived = None, None
    try:
        record = wait_state(queue, job_id, {"uploading", "done", "failed"}, timeout=60)
        assert record["state"] == "uploading" and int(record["frames_done"]) == frames_total(5)
        assert [p.name for p in spool.iterdir()] == [f"{job_id}.mp4"]  # complete, waiting for S3
        # A rival with a working S3 would take the job over if it went 2 s without a heartbeat.
        rival = start_worker(pipe, JobQueue(redis_url, stale_after_s=2.0), S3Store(BUCKET, s3), "w-rival")
        time.sleep(3.0)
        failures = messages(caplog, f"job {job_id}: upload failed")
        assert len(failures) >= 5 and "EndpointConnectionError" in failures[0]
        pending = queue.redis.xpending_range(STREAM, GROUP, "-", "+", 10)
        assert [(p["consumer"], p["time_since_delivered"] < 2000) for p in pending] == [("w-s3-down", True)]
        assert queue.get(job_id)["state"] == "uploading"
        revived = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # S3 is back
        revived.start()
        record = wait_state(queue, job_id, {"done", "failed"}, timeout=60)
    finally:
        worker.shutdown()
        if rival is not None:
            rival.shutdown()
        if revived is not None:
            revived.stop()
    assert record["state"] == "done" and record["consumer"] == "w-s3-down" and int(record["attempts"]) == 1
    reader = S3Store(BUCKET, s3)  # the same moto state, served on the module's port
    body = reader.client.get_object(Bucket=BUCKET, Key=video_key(job_id))["Body"].read()
    assert count_frames(body) == frames_total(5)
    assert not list(spool.iterdir()) and not open_uploads(reader)


def test_cancel_while_uploading_stops_the_retries_and_deletes_the_spool_file(pipe, redis_url, s3, tmp_path):
    port = free_port()  # S3 down
    queue = JobQueue(redis_url)
    store = S3Store(BUCKET, f"http://127.0.0.1:{port}", max_attempts=1)
    spool = tmp_path / "spool"
    job_id, _ = queue.submit(job(2), frames_total(2))
    worker = start_worker(pipe, queue, store, "w-cancel-upload", spool, retry_s=0.05, retry_max_s=0.2)
    try:
        wait_state(queue, job_id, {"uploading"}, timeout=60)
        assert (spool / f"{job_id}.mp4").is_file()
        assert queue.cancel(job_id)
        record = wait_state(queue, job_id, {"cancelled", "done", "failed"}, timeout=30)
        wait_for(lambda: worker.running is None, 10, "the worker is still on the job")
    finally:
        worker.shutdown()
    assert record["state"] == "cancelled" and not list(spool.iterdir())
    assert not S3Store(BUCKET, s3).exists(video_key(job_id)) and not queue.cancel(job_id)
    assert not queue.redis.xpending(STREAM, GROUP)["pending"]


def test_a_restarted_worker_uploads_the_spooled_video_instead_of_generating_it(
    pipe, redis_url, s3, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="longlive.jobs")
    queue = JobQueue(redis_url, stale_after_s=0.5)
    spool = tmp_path / "spool"
    job_id, _ = queue.submit(job(5), frames_total(5))
    down = S3Store(BUCKET, f"http://127.0.0.1:{free_port()}", max_attempts=1)
    first = start_worker(pipe, queue, down, "w-first", spool, retry_s=0.05, retry_max_s=0.2)
    try:
        wait_state(queue, job_id, {"uploading"}, timeout=60)
    finally:
        first.shutdown()  # shut down while S3 is away: the job is released, its video stays spooled
    wait_for(lambda: first.running is None, 10, "the first worker did not let go")
    assert queue.get(job_id)["state"] == "queued" and (spool / f"{job_id}.mp4").is_file()
    store = S3Store(BUCKET, s3)
    second = start_worker(pipe, queue, store, "w-second", spool)
    try:
        record = wait_state(queue, job_id, {"done", "failed"}, timeout=60)
    finally:
        second.shutdown()
    assert record["state"] == "done" and record["consumer"] == "w-second" and int(record["attempts"]) == 1
    assert messages(caplog, f"job {job_id}: its video is spooled already")
    assert not second.host.snapshot()  # it opened no session: nothing was generated again
    body = store.client.get_object(Bucket=BUCKET, Key=video_key(job_id))["Body"].read()
    assert count_frames(body) == frames_total(5) and not list(spool.iterdir())


def test_redis_killed_and_restarted_mid_job_the_job_still_lands_whole(pipe, s3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="longlive.jobs")
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")  # its own: fsync on every write, SIGKILLed below
    server.start()
    try:
        queue, store = JobQueue(server.url), S3Store(BUCKET, s3)
        job_id, _ = queue.submit(job(10), frames_total(10))
        worker = start_worker(pipe, queue, store, "w-redis", retry_s=0.05, retry_max_s=0.2)
        try:
            wait_for(lambda: int(queue.get(job_id)["frames_done"]) > 0, 60, "the job did not start")
            server.stop(kill=True)
            wait_for(lambda: messages(caplog, f"job {job_id}: heartbeat failed"), 10, "no failed heartbeat")
            time.sleep(0.5)
            assert worker.running is not None and worker.running.job_id == job_id  # still on it
            server.start()
            record = wait_state(queue, job_id, {"done", "failed"}, timeout=120)
        finally:
            worker.shutdown()
        total = frames_total(10)
        assert record["state"] == "done" and record["consumer"] == "w-redis" and int(record["attempts"]) == 1
        assert int(record["frames_done"]) == int(record["frames_total"]) == total
        (back,) = messages(caplog, f"job {job_id}: heartbeat back at frame")
        assert int(back.rsplit(" ", 1)[1]) < total  # progress resumed while it was still generating
        body = store.client.get_object(Bucket=BUCKET, Key=video_key(job_id))["Body"].read()
        assert count_frames(body) == total
        assert queue.redis.xlen(STREAM) == 1 and queue.redis.xpending(STREAM, GROUP)["pending"] == 0
        assert queue.redis.xlen(DEAD) == 0
    finally:
        server.stop()
