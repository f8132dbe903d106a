"""What a Generator replica raises to the Ingress. Torch-free: the CPU ingress imports them."""

from __future__ import annotations


class SessionNotHere(Exception):
    """The session is not on this replica (unknown, or its replica is gone)."""


class ReplicaFull(Exception):
    """This replica runs its maximum number of sessions."""


class SessionMoved(Exception):
    """Another replica took the session over (this one was presumed gone): continue the stream there."""


class FramesGone(Exception):
    """The frame a stream asked to resume at has left the session's ring of retained blocks."""

    def __init__(self, oldest_frame: int):
        super().__init__(oldest_frame)  # args round-trip through pickle (Ray sends it to the ingress)
        self.oldest_frame = oldest_frame

    def __str__(self) -> str:
        return f"that frame is no longer kept; the oldest frame kept is {self.oldest_frame}"


class TooManyStreams(Exception):
    """The session has as many open streams as it allows."""
