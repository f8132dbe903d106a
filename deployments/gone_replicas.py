"""Replicas that calls from this process found gone, before Serve's health checks tell the router.

The ingress reports the actor that a session's call failed on (ActorDiedError, ActorUnavailableError, a
broken stream: the error names the actor, so a session another request moved meanwhile is not mistaken
for it); the SessionRouter, which runs in the same process, stops routing to that replica, so the session
moves at its next request. Its own module, read through the module at call time: Serve pickles the router
class by value, and a module is pickled by reference, so both sides share this one registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

GONE_FOR_S = 60.0  # longer than Serve takes to drop a dead replica from the candidates itself


class GoneReplicas:
    """Replica actors (ids in hex) found gone by calls from this process, each for GONE_FOR_S. Written by
    the ingress's request tasks, read on the router's own event loop (another thread): one lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}

    def report(self, actor_id: str) -> None:
        with self._lock:
            self._since[actor_id] = self._clock()

    def recent(self) -> set[str]:
        with self._lock:
            now = self._clock()
            self._since = {actor: t for actor, t in self._since.items() if now - t < GONE_FOR_S}
            return set(self._since)


GONE = GoneReplicas()
