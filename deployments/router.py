"""Sticky sessions: every request of a session goes to the replica that holds its KV cache.

A custom Ray Serve RequestRouter with an explicit session -> replica table in Redis (hard pins), chosen
over `ConsistentHashRouter`, which moves sessions to a new replica when one is added (their caches would
be lost). When a session's replica is gone, the router moves the session to the least-loaded replica,
which restores it from its checkpoint. A session's first request (create) goes to the replica with the
most free session slots (each replica publishes its load in Redis), not where a hash puts it. The router
runs in every process that holds a handle to the Generator (each ingress replica); they share the table.

A replica that a call from this process found gone (reported by the ingress: deployments/gone_replicas.py)
counts as gone at once: its sessions move at their next request, not after Serve's health checks drop it
(a killed replica first fails calls with ActorUnavailableError, which Ray's own router does not act on).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from redis.exceptions import RedisError

from jobs.repeats import Repeats

from . import gone_replicas
from .store import SessionStore

OWNER_CACHE_SIZE = 100_000  # sessions whose owner this process remembers without asking Redis
logger = logging.getLogger("ray.serve.longlive.router")


class SessionRouter(RequestRouter):
    # The base routing loop can pop a pending request and exit without routing it when requests are
    # pinned one-to-one; Ray's ConsistentHashRouter overrides the loop for exactly that: reuse it.
    _fulfill_pending_requests = ConsistentHashRouter._fulfill_pending_requests

    def initialize_state(self, redis_url: str = "redis://127.0.0.1:6379/0") -> None:
        self.redis_url = redis_url
        self._store: SessionStore | None = None  # made on the router's own event loop
        self._owners: OrderedDict[str, str] = OrderedDict()  # session -> replica id, recently used last
        self._unreachable = Repeats(logger, "routing without the session table")

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            self._store = SessionStore(self.redis_url)
        return self._store

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        session_id = pending_request.metadata.session_id if pending_request is not None else None
        if not session_id:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        gone = gone_replicas.GONE.recent()
        # A replica found gone is no candidate, unless nothing else is (the call fails again at once and
        # is retried, until Serve's replacement is up).
        by_id = {rid: r for rid, r in by_id.items() if r.actor_id.hex() not in gone} or by_id
        candidate_replicas = list(by_id.values())
        # Never raise here: an exception ends Ray's routing loop and the request would hang unrouted.
        # (The store's client re-sends these idempotent reads and compare-and-sets itself.)
        try:
            owner = await self._owner(session_id, by_id)
        except RedisError as err:  # Redis away: the pins this router knows
            self._unreachable.failed(err)
            owner = self._owners.get(session_id)
            return [[by_id[owner]]] if owner in by_id else [candidate_replicas]
        self._unreachable.ok()
        self._owners[session_id] = owner
        self._owners.move_to_end(session_id)
        if len(self._owners) > OWNER_CACHE_SIZE:
            self._owners.popitem(last=False)
        return [[by_id[owner]]] if owner in by_id else [candidate_replicas]

    async def _owner(self, session_id: str, by_id: dict[str, RunningReplica]) -> str | None:
        owner = self._owners.get(session_id)
        if owner not in by_id:  # not known here, or its replica is gone: ask the table
            owner = await self.store.owner(session_id)
        if owner is None:
            owner = await self.store.claim(session_id, await self._least_loaded(by_id))
        elif owner not in by_id:
            # Its replica died or was removed: move it to the least-loaded one, which restores it from its
            # checkpoint (unless another router moved it first: then follow that move).
            owner = await self.store.move(session_id, owner, await self._least_loaded(by_id))
        return owner

    async def _least_loaded(self, by_id: dict[str, RunningReplica]) -> str:
        """The replica with the most free slots (replicas of any size); ties spread at random."""
        free = await self.store.free_slots()
        most = max(free.get(rid, 0) for rid in by_id)
        return random.choice([rid for rid in by_id if free.get(rid, 0) == most])
