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
        super().__init__(f"that frame is gone; the oldest frame kept is {oldest_frame}")
        self.oldest_frame = oldest_frame
