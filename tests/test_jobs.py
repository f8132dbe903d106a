"""Batch jobs: Redis Streams queue, workers on a LiveHost, fMP4 multipart uploads to a real S3 endpoint
(moto's server mode), a killed worker's job reclaimed, cancel, dead letters, idempotency."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from pydantic import ValidationError

from jobs.queue import DEAD, JobQueue
from jobs.schemas import SubmitJob
from jobs.storage import S3Store
from jobs.worker import JobWorker, frames_total, video_key
from longlive_core.live import LiveHost
from longlive_core.pipeline import LongLivePipeline
from tests.serving import redis_server

ROOT = Path(__file__).resolve().parents[1]
SIZE = (48, 32)
BUCKET = "longlive-videos"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


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


def start_worker(pipe, queue, store, consumer: str) -> JobWorker:
    host = LiveHost(pipe, max_sessions=1, size=SIZE)
    worker = JobWorker(host, queue, store, consumer, drive_engine=True)
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


@pytest.fixture
def callback_server():
    """A real HTTP endpoint that records the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/done", received
    server.shutdown()


def test_a_60_s_job_with_three_switches_lands_in_s3(pipe, redis_url, s3, callback_server):
    queue, store = JobQueue(redis_url), S3Store(BUCKET, s3)
    callback_url, callbacks = callback_server
    request = job(60, callback_url=callback_url)
    job_id, duplicate = queue.submit(request, frames_total(60))
    assert not duplicate
    worker = start_worker(pipe, queue, store, "w-60")
    try:
        record = wait_state(queue, job_id, {"done", "failed"}, timeout=300)
    finally:
        worker.stop.set()
    assert record["state"] == "done" and int(record["frames_done"]) == int(record["frames_total"]) == 969
    url = store.url(record["key"])
    data = httpx.get(url, timeout=30).content  # the presigned URL serves it
    assert count_frames(data) == 969
    assert not open_uploads(store)
    deadline = time.monotonic() + 10
    while not callbacks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert callbacks == [{"job_id": job_id, "state": "done"}]


def test_idempotency_key_returns_the_first_job(redis_url):
    queue = JobQueue(redis_url)
    first = queue.submit(job(5, idempotency_key="order-17"), frames_total(5))
    again = queue.submit(job(9, idempotency_key="order-17"), frames_total(9))
    assert again == (first[0], True)
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
        worker.stop.set()
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
        worker.stop.set()
    assert int(record["frames_done"]) - at_cancel <= 12  # at most the block in flight
    assert not store.exists(video_key(job_id)) and not open_uploads(store)
    assert not queue.cancel(job_id)  # ended


def test_a_job_that_keeps_failing_goes_to_the_dead_letter_stream(pipe, redis_url, s3):
    queue = JobQueue(redis_url, max_attempts=2, stale_after_s=0.2)
    store = S3Store("no-such-bucket", s3)  # every upload fails
    job_id, _ = queue.submit(job(2), frames_total(2))
    worker = start_worker(pipe, queue, store, "w-dead")
    try:
        record = wait_state(queue, job_id, {"failed"}, timeout=60)
    finally:
        worker.stop.set()
    assert "NoSuchBucket" in record["error"]
    dead = [fields for _, fields in queue.redis.xrange(DEAD)]
    assert {"job_id": job_id, "error": record["error"]} in dead
