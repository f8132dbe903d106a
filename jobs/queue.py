"""The job queue: Redis Streams with a consumer group (at-least-once delivery).

`jobs` holds one entry per attempt; workers of the group `workers` read it with XREADGROUP. A worker
keeps a long job claimed by XCLAIM ... JUSTID (its heartbeat); a dead worker's entry idles until
another worker takes it over with XAUTOCLAIM and redoes the job. The job's record (`job:{id}`) counts
attempts: past `max_attempts` the job goes to the dead-letter stream `jobs:dead` with its last error.
An idempotency key belongs to its client: it maps to the first job that client submitted under it and
that body's digest (`job:key:{client}:{key}`); the same key with another body is refused.
Admission counts the jobs no worker has claimed yet, in all (`jobs:queued`) and per client
(`jobs:queued:{client}`), in the submit's Lua step; a job leaves the count once (its record's `queued`
flag) when it is claimed, cancelled or ends. The stream is trimmed (MAXLEN ~) well above the admission
bound, so only entries long consumed are dropped.

Every call may raise `UNREACHABLE` while Redis is away (down, restarting, loading its append-only file):
the worker retries those (jobs/worker.py) instead of failing the job. Socket timeouts bound how long a
call waits on a Redis that does not answer. Commands are re-sent by redis-py's Retry only where that is
safe: a submit is one Lua step keyed by its job id (sent twice, it queues the job once), a claim sets
`attempts` to the value it read plus one instead of incrementing it, and XAUTOCLAIM and XREADGROUP,
which a re-send would make skip an entry, are never re-sent (jobs/redis_client.py).

A cancel takes effect in the record at once (state "cancelled"), whoever holds the job: a job no worker
runs (queued, given back by a preempted worker, or held by a dead one) is never run again (a later claim
only acknowledges its entry), and a running job's worker sees it at its next heartbeat, after each block,
and removes what it made. Once a job has ended its record takes no more writes from workers.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

import redis

from longlive_client.schemas import SubmitJob

from .redis_client import sync_client

STREAM, GROUP, DEAD = "jobs", "workers", "jobs:dead"
JOB = "job:{}"
KEY = "job:key:{}:{}"  # client digest, idempotency key -> hash: job_id, body (its digest)
QUEUED = "jobs:queued"  # jobs not yet claimed (the admission count)
QUEUED_BY = "jobs:queued:{}"  # the same per client digest (its name is also built in _UPDATE)
STREAM_SLACK = 10_000  # stream entries kept beyond the queued bound: running, pending, cancelled ones
RECORD_TTL_S = 7 * 24 * 3600
ENDED = ("done", "failed", "cancelled")
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError is a ConnectionError
ID_FORMAT = re.compile(r"[A-Za-z0-9_-]{22}")  # what secrets.token_urlsafe(16) makes
# Submit: the job's record and its queue entry, once even when sent again (a lost reply, redis-py's
# retry: the record exists then). An idempotency key (KEYS[2], "" for none) that names an earlier job
# answers it, or 'reused' for another body; then the admission bounds, all queued jobs (ARGV[4]) and the
# client's (ARGV[5]). Returns {outcome, job id}.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'queued', ARGV[1]} end
if KEYS[2] ~= '' then
  local first = redis.call('HMGET', KEYS[2], 'job_id', 'body')
  if first[1] then
    if first[2] ~= ARGV[3] then return {'reused', first[1]} end
    return {'duplicate', first[1]}
  end
end
if tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[4]) then return {'queue_full', ''} end
if tonumber(redis.call('GET', KEYS[5]) or '0') >= tonumber(ARGV[5]) then return {'client_full', ''} end
if KEYS[2] ~= '' then
  redis.call('HSET', KEYS[2], 'job_id', ARGV[1], 'body', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('INCR', KEYS[4])
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'job_id', ARGV[1])
return {'queued', ARGV[1]}
"""
# A job's record changes only while it has not ended: a cancel wins over a worker's late write (its
# heartbeat, a release, a "done"). A write that takes the job out of "queued" (a claim, a cancel, an
# end) takes it out of the admission counts, once. Returns whether it wrote.
_UPDATE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'done' or state == 'failed' or state == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' and redis.call('HDEL', KEYS[1], 'queued') == 1 then
  redis.call('DECR', KEYS[2])
  local by_client = 'jobs:queued:' .. (redis.call('HGET', KEYS[1], 'client') or '')
  if redis.call('DECR', by_client) <= 0 then redis.call('DEL', by_client) end
end
return 1
"""


class QueueFull(Exception):
    """As many jobs are queued as the service takes (max_queued_jobs)."""


class ClientQueueFull(Exception):
    """The client has as many jobs queued as it may (max_queued_jobs_per_client)."""


class KeyReused(Exception):
    """The idempotency key names the client's earlier job, submitted with another body."""


@dataclass(frozen=True)
class QueueLimits:
    queued: int = 1000  # jobs not yet claimed, all clients together
    queued_per_client: int = 10


def body_digest(request: SubmitJob) -> str:
    """The canonical body (pydantic's JSON of the validated request) that an idempotency key is bound to."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


def valid_job_id(value: str) -> bool:
    """Checked before an id goes into a key name (`key:x` must not reach `job:key:x`)."""
    return ID_FORMAT.fullmatch(value) is not None


@dataclass(frozen=True)
class Claimed:
    job_id: str
    entry_id: str
    request: SubmitJob
    attempt: int


class JobQueue:
    def __init__(
        self,
        redis_url: str,
        max_attempts: int = 3,
        stale_after_s: float = 60.0,
        timeout_s: float = 15.0,
        limits: QueueLimits = QueueLimits(),  # noqa: B008 - frozen: one shared default is fine
    ):
        self.redis = sync_client(redis_url, timeout_s)
        self.once = sync_client(
            redis_url, timeout_s, idempotent=False
        )  # XAUTOCLAIM, XREADGROUP: never re-sent
        self._update = self.redis.register_script(_UPDATE)
        self._submit = self.redis.register_script(_SUBMIT)
        self.max_attempts = max_attempts
        self.limits = limits
        self.stale_after_ms = int(stale_after_s * 1000)
        try:
            self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    # -- clients -----------------------------------------------------------------------------------
    def submit(
        self, request: SubmitJob, frames_total: int, token_sha256: str = "", client: str = "-"
    ) -> tuple[str, bool]:
        """Queue a job for `client` (a digest: it goes into key names); returns (job id, duplicate). The
        client's known idempotency key returns its first job. Raises QueueFull, ClientQueueFull, KeyReused
        (nothing written)."""
        job_id = secrets.token_urlsafe(16)
        record = {
            "request": request.model_dump_json(),
            "state": "queued",
            "queued": 1,
            "client": client,
            "frames_done": 0,
            "frames_total": frames_total,
            "fps": 0.0,
            "attempts": 0,
            "submitted_at": time.time(),
            "token_sha256": token_sha256,
        }
        key = KEY.format(client, request.idempotency_key) if request.idempotency_key is not None else ""
        fields = [item for pair in record.items() for item in pair]
        limits = [self.limits.queued, self.limits.queued_per_client, self.limits.queued + STREAM_SLACK]
        outcome, first = self._submit(
            keys=[JOB.format(job_id), key, STREAM, QUEUED, QUEUED_BY.format(client)],
            args=[job_id, RECORD_TTL_S, body_digest(request), *limits, *fields],
        )
        if outcome == "queue_full":
            raise QueueFull()
        if outcome == "client_full":
            raise ClientQueueFull()
        if outcome == "reused":
            raise KeyReused(first)
        return first, outcome == "duplicate"

    def get(self, job_id: str) -> dict | None:
        return self.redis.hgetall(JOB.format(job_id)) or None

    def update(self, job_id: str, **fields: str | int | float) -> bool:
        """Write fields of a job that has not ended; False (nothing written) once it has."""
        args = [item for pair in fields.items() for item in pair]
        return bool(self._update(keys=[JOB.format(job_id), QUEUED], args=args))

    def cancel(self, job_id: str) -> bool:
        """Cancel the job now (its worker, if any, stops at its next block); False if it had ended."""
        return self.update(job_id, state="cancelled", finished_at=time.time())

    # -- workers -----------------------------------------------------------------------------------
    def claim(self, consumer: str, block_ms: int = 1000) -> Claimed | None:
        """The next job for `consumer`: a dead worker's stale one first, else a new one."""
        # Redis 7 answers [next, entries, deleted], 6.2 [next, entries]: take the entries.
        stale = self.once.xautoclaim(STREAM, GROUP, consumer, self.stale_after_ms, "0-0", count=1)[1]
        entries = stale or [
            entry
            for _, found in (self.once.xreadgroup(GROUP, consumer, {STREAM: ">"}, 1, block_ms) or [])
            for entry in found
        ]
        for entry_id, fields in entries:
            job_id = fields["job_id"]
            record = self.get(job_id) or {}
            if not record or record.get("state") in ENDED:
                self.redis.xack(STREAM, GROUP, entry_id)  # expired, cancelled or ended: never run again
                return None
            attempt = int(record.get("attempts", 0)) + 1  # set, not incremented: safe to send again
            if attempt > self.max_attempts:
                self.dead_letter(job_id, entry_id, record.get("error") or "worker died")
                return None
            if not self.update(job_id, state="running", consumer=consumer, attempts=attempt):
                self.redis.xack(STREAM, GROUP, entry_id)  # cancelled this very moment
                return None
            return Claimed(job_id, entry_id, SubmitJob.model_validate_json(record["request"]), attempt)
        return None

    def heartbeat(
        self,
        claimed: Claimed,
        consumer: str,
        frames_done: int,
        fps: float | None = None,
        state: str | None = None,
    ) -> bool:
        """Keep the entry ours (resets its idle time) and publish progress (and `state`, e.g. "uploading");
        False once the job was cancelled (or ended elsewhere)."""
        self.redis.xclaim(STREAM, GROUP, consumer, 0, [claimed.entry_id], justid=True)
        fields = {"frames_done": frames_done, "fps": None if fps is None else round(fps, 2), "state": state}
        return self.update(claimed.job_id, **{k: v for k, v in fields.items() if v is not None})

    def finish(self, job_id: str, entry_id: str, state: str, **fields: str) -> bool:
        """End the job and acknowledge its entry; False when it had ended already (e.g. cancelled while
        its video was uploading: the caller removes the video)."""
        written = self.update(job_id, state=state, finished_at=time.time(), **fields)
        self.redis.xack(STREAM, GROUP, entry_id)
        return written

    def release(self, claimed: Claimed) -> None:
        """Give a preempted job back: pending, it is taken over once idle for `stale_after_s`. Preemption
        is not a failure: the attempt is taken back (set, not decremented: safe to send again)."""
        self.update(claimed.job_id, state="queued", attempts=claimed.attempt - 1)

    def fail(self, claimed: Claimed, error: str) -> None:
        """Record the error; the entry stays pending, so it is retried after `stale_after_s`. Nothing is
        written once the job has ended (another worker finished it, or it was cancelled)."""
        self.update(claimed.job_id, state="queued", error=error[:2000])

    def dead_letter(self, job_id: str, entry_id: str, error: str) -> None:
        self.redis.xadd(DEAD, {"job_id": job_id, "error": error[:2000]})
        self.finish(job_id, entry_id, "failed", error=error[:2000])
