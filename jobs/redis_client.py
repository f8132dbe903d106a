"""Redis clients with bounded I/O, for the service (deployments/) and the job queue alike.

Every call waits at most `timeout_s` to connect and `timeout_s` per reply, so a Redis that hangs (rather
than refusing) fails the call instead of hanging it. Idempotent commands are re-sent by redis-py's own
`Retry` with exponential backoff; a command that must not run twice (XADD of a prompt event or a job,
HINCRBY of attempts, INCR of a rate counter, XREADGROUP) goes through a client that never re-sends it.
redis-py retries every command 3 times by default, so the no-retry client says so explicitly.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

RETRIES = 2
BACKOFF = ExponentialBackoff(cap=0.2, base=0.05)  # 0.05 s, 0.1 s: retries fit in a request's budget


def retry_policy(idempotent: bool) -> Retry:
    return Retry(BACKOFF, RETRIES) if idempotent else Retry(NoBackoff(), 0)


def sync_client(url: str, timeout_s: float, idempotent: bool = True, decode: bool = True) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry_policy(idempotent),
    )


def async_client(url: str, timeout_s: float, idempotent: bool = True) -> aioredis.Redis:
    return aioredis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry_policy(idempotent),
    )
