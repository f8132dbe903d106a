"""Replicas that calls from this process found gone, before Serve's health checks tell the router.

The ingress reports the replica of a session whose call failed (ActorDiedError, ActorUnavailableError, a
broken stream); the SessionRouter, which runs in the same process, stops routing to it, so the session
moves at its next request. Its own module, read through the module at call time: Serve pickles the router
class by value, and a module is pickled by reference, so both sides share this one registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

GONE_FOR_S = 60.0  # longer than Serve takes to drop a dead replica from the candidates itself


class GoneReplicas:
    """Replicas found gone by calls from this process, each for GONE_FOR_S. Written by the ingress's
    request tasks, read on the router's own event loop (another thread): one lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}

    def report(self, replica_id: str) -> None:
        with self._lock:
            self._since[replica_id] = self._clock()

    def recent(self) -> set[str]:
        with self._lock:
            now = self._clock()
            self._since = {rid: t for rid, t in self._since.items() if now - t < GONE_FOR_S}
            return set(self._since)


GONE = GoneReplicas()
