"""Redis clients with bounded I/O, for the service (deployments/) and the job queue alike.

Every call waits at most `timeout_s` to connect and `timeout_s` per reply, so a Redis that hangs (rather
than refusing) fails the call instead of hanging it. Idempotent commands are re-sent by redis-py's own
`Retry` with exponential backoff. The others are made idempotent before they go through it (a prompt's
XADD and a job's submit carry an id that a second send finds; a claim sets `attempts` rather than
incrementing it), or go through the client that never re-sends (XREADGROUP, XAUTOCLAIM). redis-py
retries every command 3 times by default, so the no-retry client says so explicitly. (redis.asyncio's
pool hands out a connection that a Redis restart closed: only a client with retries hides that.)

The password comes from the URL or, when the URL has none, from the env LONGLIVE_REDIS_PASSWORD: config
args (URLs included) are printed in Serve's logs, the environment is not (`longlive serve` passes its
private Redis's password so).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

PASSWORD_ENV = "LONGLIVE_REDIS_PASSWORD"
RETRIES = 1  # with the ingress's 0.5 s timeout, a call that fails takes ~1.05 s: a 503 well within 2 s
BACKOFF = ExponentialBackoff(cap=0.2, base=0.05)


RETRIED = [redis.ConnectionError, redis.TimeoutError]  # redis.asyncio re-sends only what is listed


def retry_policy(idempotent: bool, kind: type[Retry] | type[AsyncRetry] = Retry) -> Retry | AsyncRetry:
    """redis.asyncio needs its own Retry class: the sync one would not catch an awaited command's error."""
    return kind(BACKOFF, RETRIES) if idempotent else kind(NoBackoff(), 0)


def password(url: str) -> str | None:
    """None when the URL carries its own (redis-py takes the URL's)."""
    return None if urlsplit(url).password else os.environ.get(PASSWORD_ENV) or None


def sync_client(url: str, timeout_s: float, idempotent: bool = True, decode: bool = True) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry_policy(idempotent),
        retry_on_error=RETRIED if idempotent else [],
        password=password(url),
    )


def async_options(url: str, timeout_s: float, idempotent: bool = True) -> dict:
    """redis.asyncio's client options (also what the ingress's rate limiter builds its client with)."""
    return dict(
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry_policy(idempotent, AsyncRetry),
        retry_on_error=RETRIED if idempotent else [],
        password=password(url),
    )


def async_client(url: str, timeout_s: float, idempotent: bool = True) -> aioredis.Redis:
    return aioredis.from_url(url, decode_responses=True, **async_options(url, timeout_s, idempotent))
