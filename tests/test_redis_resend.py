"""What redis-py's Retry may send twice (a reply lost after Redis ran the command) must not happen twice:
a prompt post and a job submit sent again write nothing new. A real redis-server; the second send is the
same call with the same arguments, as the Retry would make it. Also: a restarted Redis costs the
retrying clients no failed call."""

from __future__ import annotations

import asyncio

import pytest

from deployments.store import EVENTS, POSTED, SESSION, SessionStore, new_id
from jobs.queue import JOB, KEY, QUEUED, QUEUED_BY, RECORD_TTL_S, STREAM, JobQueue, body_digest
from jobs.redis_client import async_client, sync_client
from longlive_client.schemas import SubmitJob
from tests.serving import running_redis


@pytest.fixture
def server(tmp_path):
    with running_redis(tmp_path) as server:
        yield server


def test_a_prompt_post_sent_twice_is_one_event(server):
    async def post_twice() -> tuple[list, list]:
        store = SessionStore(server.url)
        sid = new_id()
        await store.create(sid, "token", 0)
        keys = [SESSION.format(sid), EVENTS.format(sid), POSTED.format(sid, new_id())]
        args = [1000, "a prompt", "1.0", 300, 3600, "ab12"]
        first, again = await store._post(keys=keys, args=args), await store._post(keys=keys, args=args)
        other = await store.post_prompt(sid, "another")  # a new post is a new event
        return [first, again, other], await store.redis.xrange(EVENTS.format(sid))

    (first, again, other), events = asyncio.run(post_twice())
    assert first == again == ["posted", first[1]]
    assert [event_id for event_id, _ in events] == [first[1], other]


def test_a_submit_sent_twice_queues_one_job(server):
    queue = JobQueue(server.url)
    request = SubmitJob(schedule=[{"at": 0, "prompt": "a cat"}], seconds=1, idempotency_key="k-1")
    job_id = new_id()
    keys = [JOB.format(job_id), KEY.format("-", "k-1"), STREAM, QUEUED, QUEUED_BY.format("-")]
    limits = [10, 10, 100]
    args = [
        job_id,
        RECORD_TTL_S,
        body_digest(request),
        *limits,
        "state",
        "queued",
        "queued",
        1,
        "client",
        "-",
    ]
    assert queue._submit(keys=keys, args=args) == queue._submit(keys=keys, args=args) == ["queued", job_id]
    assert queue.redis.xlen(STREAM) == 1 and queue.redis.get(QUEUED) == "1"  # counted once
    assert queue.submit(request, 33) == (job_id, True)  # the key names the first job
    assert queue.redis.xlen(STREAM) == 1


def test_after_a_redis_restart_the_retrying_clients_fail_no_call(server):
    retrying = sync_client(server.url, 0.5)
    assert retrying.ping()
    server.stop(kill=True)
    server.start()
    assert retrying.set("k", "v")

    async def async_side() -> str:
        client = async_client(server.url, 0.5)
        await client.ping()
        server.stop(kill=True)
        server.start()
        return await client.get("k")  # its pooled connection died with Redis: the call still answers

    # No control with a non-retrying client: whether its first call after a restart fails depends on
    # whether redis-py notices the dead pooled connection as it takes it (it did on one CI run and not on
    # another), so that comparison is not one that fails reliably.
    assert asyncio.run(async_side()) == "v"
