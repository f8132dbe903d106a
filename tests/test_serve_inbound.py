"""What a client sends on the video WebSocket, on the real service: small messages are read and dropped
while the video goes on, too many close the stream with 1008, and 100 messages of 8 MiB close it with
1009 while the ingress and Ray's proxy stay within +64 MiB."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from deployments.inbound import InboundLimits
from tests.service_fixture import created

LIMITS = InboundLimits()  # the fixture's defaults
MIB = 1 << 20
BOUND = 64 * MIB


def serve_rss() -> dict[str, int]:
    """RSS of the Ingress replicas and the proxy (their process titles name them)."""
    found: dict[str, int] = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        role = (
            "proxy"
            if "ProxyActor" in title
            else "ingress"
            if "ServeReplica:longlive:Ingress" in title
            else None
        )
        if role is not None:
            try:
                found[role] = found.get(role, 0) + proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return found


def stream_url(service: dict, session: dict) -> str:
    base = service["base"].replace("http", "ws", 1)
    return f"{base}/v1/sessions/{session['session_id']}/stream?token={session['token']}"


def close_code(ws, sending) -> int:
    """Run `sending(ws)`, then read until the server closes; the code of the close frame it sent."""
    with pytest.raises(ConnectionClosed) as closed:
        sending(ws)
        while True:
            ws.recv(timeout=20)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code


def test_small_messages_are_dropped_and_too_many_close_the_stream(service):
    session = created(service["base"], max_seconds=60)
    with connect(stream_url(service, session), open_timeout=30, close_timeout=5) as ws:
        assert ws.recv(timeout=30)  # the init segment
        for _ in range(10):
            ws.send("x" * 100)
        pieces = [ws.recv(timeout=30) for _ in range(3)]  # the video goes on
        assert all(isinstance(p, bytes) and p for p in pieces)

        def flood(ws) -> None:
            for _ in range(LIMITS.max_messages):
                ws.send("x" * 100)

        assert close_code(ws, flood) == 1008


def test_100_messages_of_8_mib_close_the_stream_and_memory_stays_bounded(service):
    session = created(service["base"], max_seconds=60)
    before = serve_rss()
    assert set(before) == {"proxy", "ingress"}, before
    peak, stop = dict(before), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for role, rss in serve_rss().items():
                peak[role] = max(peak[role], rss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    payload, sent = bytes(8 * MIB), []
    try:
        with connect(stream_url(service, session), open_timeout=30, close_timeout=5, max_size=None) as ws:
            assert ws.recv(timeout=30)

            def flood(ws) -> None:
                for _ in range(100):
                    ws.send(payload)
                    sent.append(1)

            started = time.monotonic()
            assert close_code(ws, flood) == 1009
            assert time.monotonic() - started < 20
        time.sleep(2)  # what is still held once the connection is gone
        after = serve_rss()
    finally:
        stop.set()
        sampler.join()
    grown = {role: peak[role] - before[role] for role in before}
    assert sum(grown.values()) <= BOUND, {r: g / MIB for r, g in grown.items()}
    assert sum(after.values()) - sum(before.values()) <= BOUND
    assert len(sent) < 100  # closed while the client was still sending
