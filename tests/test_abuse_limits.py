"""Quotas, idempotency keys per client, the rate limiter and what ended sessions and dead replicas leave in
Redis: the parts below the Ray service, against a real redis-server (tests/test_serve_quotas.py has the
same on the running service). The rate limiter runs behind a real uvicorn, started the way Ray's proxy
starts it (proxy headers on, FORWARDED_ALLOW_IPS from the env)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI

from deployments.config import FORWARDED_ALLOW_IPS, ServiceConfig
from deployments.security import Guard, install, rate_key
from deployments.store import (
    CHECKPOINT,
    ENDED_TTL_S,
    EVENTS,
    LOAD,
    LOAD_SEEN,
    REPLICA_TTL_S,
    SESSION,
    SESSIONS_OF,
    ReplicaEvents,
    SessionStore,
    TooManySessions,
    new_id,
)
from jobs.queue import QUEUED, QUEUED_BY, ClientQueueFull, JobQueue, KeyReused, QueueFull, QueueLimits
from longlive_client.schemas import SubmitJob
from tests.serving import free_port, running_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    return client


def job(seconds: float = 1, key: str | None = None) -> SubmitJob:
    return SubmitJob(schedule=[{"at": 0, "prompt": "a cat"}], seconds=seconds, idempotency_key=key)


def submitted(queue: JobQueue, client: str, request: SubmitJob | None = None) -> str:
    """'ok', or the refusal's name."""
    try:
        queue.submit(request or job(), 17, client=client)
    except (QueueFull, ClientQueueFull) as refused:
        return type(refused).__name__
    return "ok"


# -- job quotas ---------------------------------------------------------------------------------------------
def test_concurrent_submits_admit_exactly_the_clients_and_the_queues_bound(redis_url, client):
    queue = JobQueue(redis_url, limits=QueueLimits(queued=7, queued_per_client=3))
    with ThreadPoolExecutor(8) as pool:
        one_client = list(pool.map(lambda _: submitted(queue, "a"), range(12)))
        many = list(pool.map(lambda i: submitted(queue, f"c{i}"), range(12)))
    assert one_client.count("ok") == 3 and one_client.count("ClientQueueFull") == 9
    assert many.count("ok") == 4 and many.count("QueueFull") == 8  # 3 + 4 = 7 queued in all
    assert int(client.get(QUEUED)) == 7 and int(client.get(QUEUED_BY.format("a"))) == 3
    assert client.xlen("jobs") == 7


def test_a_job_leaves_the_counts_once_when_claimed_cancelled_or_ended(redis_url, client):
    queue = JobQueue(redis_url, limits=QueueLimits(queued=2, queued_per_client=2))
    first, _ = queue.submit(job(), 17, client="a")
    second, _ = queue.submit(job(), 17, client="a")
    assert submitted(queue, "b") == "QueueFull"
    claimed = queue.claim("worker", block_ms=10)
    assert claimed.job_id == first and int(client.get(QUEUED)) == 1
    queue.heartbeat(claimed, "worker", 3)  # running, heartbeating, then done: counted out only once
    assert queue.finish(first, claimed.entry_id, "done")
    assert int(client.get(QUEUED)) == 1 and int(client.get(QUEUED_BY.format("a"))) == 1
    assert queue.cancel(second)
    assert int(client.get(QUEUED)) == 0 and client.get(QUEUED_BY.format("a")) is None
    assert queue.claim("worker", block_ms=10) is None  # the cancelled one is only acknowledged
    assert int(client.get(QUEUED)) == 0
    assert [submitted(queue, "b"), submitted(queue, "b"), submitted(queue, "b")] == ["ok", "ok", "QueueFull"]


# -- idempotency keys ---------------------------------------------------------------------------------------
def test_an_idempotency_key_is_its_clients_and_bound_to_its_body(redis_url, client):
    queue = JobQueue(redis_url)
    first, duplicate = queue.submit(job(key="order-17"), 17, client="a")
    assert not duplicate
    assert queue.submit(job(key="order-17"), 17, client="a") == (first, True)
    theirs, duplicate = queue.submit(job(key="order-17"), 17, client="b")  # another client: a new job
    assert theirs != first and not duplicate
    with pytest.raises(KeyReused):
        queue.submit(job(seconds=2, key="order-17"), 33, client="a")
    assert client.xlen("jobs") == 2 and int(client.get(QUEUED)) == 2  # the refusal wrote nothing


# -- session quotas and what an ended session leaves ------------------------------------------------------
def test_concurrent_creates_admit_exactly_the_quota_and_an_end_gives_a_slot_back(redis_url, client):
    async def run() -> tuple[list, list[str]]:
        store = SessionStore(redis_url)
        ids = [new_id() for _ in range(10)]
        results = await asyncio.gather(
            *(store.create(sid, "t", 0, "a", 3) for sid in ids), return_exceptions=True
        )
        admitted = [sid for sid, result in zip(ids, results, strict=True) if result is None]
        await store.mark_ended(admitted[0])  # DELETE
        await store.create(new_id(), "t", 0, "a", 3)
        with pytest.raises(TooManySessions):
            await store.create(new_id(), "t", 0, "a", 3)
        await store.create(new_id(), "t", 0, "b", 3)  # another client is still admitted
        client.delete(SESSION.format(admitted[1]))  # expired without an end: not counted any more
        await store.create(new_id(), "t", 0, "a", 3)
        return results, admitted

    results, admitted = asyncio.run(run())
    assert len(admitted) == 3 and sum(isinstance(r, TooManySessions) for r in results) == 7
    assert client.scard(SESSIONS_OF.format("a")) == 3


def test_an_ended_sessions_keys_expire_and_a_dead_replica_leaves_the_load_table(redis_url, client):
    store, events, ids = SessionStore(redis_url), ReplicaEvents(redis_url, "live"), [new_id(), new_id()]

    async def run() -> dict[str, int]:
        for sid in ids:
            await store.create(sid, "t", 0, "a", 5)
            await store.post_prompt(sid, "the robot walks into a forest")
            client.hset(CHECKPOINT.format(sid), "meta", "{}")
        await store.mark_ended(ids[0])  # by its client
        events.mark_ended(ids[1])  # on its own, by its replica
        return await store.free_slots()

    ReplicaEvents(redis_url, "dead").set_free_slots(2)
    client.zadd(LOAD_SEEN, {"dead": time.time() - REPLICA_TTL_S - 1})  # its last heartbeat, long ago
    events.set_free_slots(3)
    assert asyncio.run(run()) == {"live": 3}
    assert client.hgetall(LOAD) == {"live": "3"} and client.zrange(LOAD_SEEN, 0, -1) == ["live"]
    for sid in ids:
        for key in (SESSION.format(sid), EVENTS.format(sid)):
            assert 0 < client.ttl(key) <= ENDED_TTL_S, key
        assert not client.exists(CHECKPOINT.format(sid))
    assert client.scard(SESSIONS_OF.format("a")) == 0


# -- the rate limiter ---------------------------------------------------------------------------------------
def guarded_app(**config) -> tuple[FastAPI, Guard]:
    app = FastAPI()
    guard = install(app)

    @app.get("/ping")
    async def ping() -> dict:
        return {"pong": True}

    guard.configure(ServiceConfig(**config))
    return app, guard


def test_a_burst_across_a_window_edge_gets_at_most_the_limit_through(redis_url, client):
    _, guard = guarded_app(redis_url=redis_url, rate_limit_per_minute=5)
    guard.window_s = 2
    scope = {"type": "http", "path": "/ping", "headers": [], "client": ("192.0.2.1", 1)}

    async def burst() -> list[int | None]:
        while time.time() % 2 < 1.6:  # just before a fixed window's edge
            await asyncio.sleep(0.01)
        before = [await guard.over_limit(scope) for _ in range(5)]
        while time.time() % 2 >= 1.6:  # just after it
            await asyncio.sleep(0.01)
        return before + [await guard.over_limit(scope) for _ in range(5)]

    answers = asyncio.run(burst())
    assert answers[:5] == [None] * 5  # the limit, all admitted
    assert all(retry is not None and 1 <= retry <= 2 for retry in answers[5:])  # a fixed window let 10 in
    assert client.llen(rate_key("192.0.2.1", 5, 2)) == 5


def serve_in_thread(app: FastAPI) -> tuple[uvicorn.Server, str]:
    """uvicorn as Ray's proxy runs it: default proxy headers, FORWARDED_ALLOW_IPS read from the env."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("env", ["matching", "uvicorn's default"])
def test_rotating_forwarded_for_from_loopback_is_one_client_unless_trusted(
    redis_url, client, monkeypatch, env
):
    app, guard = guarded_app(redis_url=redis_url, rate_limit_per_minute=5)
    if env == "matching":  # what `longlive serve` and the test service start Ray with
        monkeypatch.setenv(FORWARDED_ALLOW_IPS, guard.config.forwarded_allow_ips)
    else:  # a Ray started without it: uvicorn puts the header's entry in the loopback peer's place
        monkeypatch.delenv(FORWARDED_ALLOW_IPS, raising=False)
    server, base = serve_in_thread(app)
    try:
        answers = [
            httpx.get(f"{base}/ping", headers={"x-forwarded-for": f"198.51.100.{i}"}).status_code
            for i in range(10)
        ]
    finally:
        server.should_exit = True
    assert answers == [200] * 5 + [429] * 5
    assert len(client.keys("ratelimit:*")) == 1  # one bucket, not one per header
