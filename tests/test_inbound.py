"""The WebSocket inbound limits (deployments/inbound.py) in-process, on Starlette's real WebSocket: the
ingress's reader alone closes with 1009 / 1008, the proxy's guard closes before the app behind it sees the
message, and the proxy's uvicorn gets the same message size."""

from __future__ import annotations

import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from deployments.inbound import InboundGuard, InboundLimits, limit_uvicorn, proxy_middlewares
from deployments.ingress import drain_inbound

LIMITS = InboundLimits(max_message_bytes=1000, max_bytes=3000, max_messages=5)


def draining_app() -> tuple[FastAPI, dict]:
    """An app that drains like the ingress's video WebSocket; `seen` gets what its reader returned."""
    app, seen = FastAPI(), {}

    @app.websocket("/ws")
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_bytes(b"video")
        seen["result"] = await drain_inbound(ws, LIMITS)
        if seen["result"] is not None:
            await ws.close(*seen["result"])

    return app, seen


def close_code(app, messages: list[bytes | str]) -> int:
    with TestClient(app).websocket_connect("/ws") as ws:
        assert ws.receive_bytes() == b"video"
        for message in messages:
            ws.send_bytes(message) if isinstance(message, bytes) else ws.send_text(message)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
    return closed.value.code


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([b"x" * 1001], 1009),  # one message too large
        (["é" * 501], 1009),  # text counts its UTF-8 bytes
        ([b"x" * 900] * 4, 1008),  # the connection's bytes
        ([b"x"] * 6, 1008),  # the connection's messages
    ],
)
def test_the_ingress_reader_closes_past_a_limit(messages, code):
    app, seen = draining_app()
    assert close_code(app, messages) == code
    assert seen["result"][0] == code


def test_the_proxy_guard_closes_before_the_app_sees_the_message():
    app, seen = draining_app()
    assert close_code(InboundGuard(app, LIMITS), [b"x" * 10, b"x" * 1001]) == 1009
    assert seen["result"] is None  # the app got a disconnect, not the message


def test_the_proxy_hook_sets_uvicorn_s_message_size(monkeypatch):
    monkeypatch.setattr(uvicorn.Config, "__init__", uvicorn.Config.__init__)  # restored afterwards
    monkeypatch.setenv("LONGLIVE_WEBSOCKET_INBOUND", LIMITS.model_dump_json())
    assert uvicorn.Config(app=None).ws_max_size == 16 * 1024 * 1024  # uvicorn's own default
    (middleware,) = proxy_middlewares()
    assert middleware.cls is InboundGuard and middleware.kwargs["limits"] == LIMITS
    assert uvicorn.Config(app=None).ws_max_size == 1000
    limit_uvicorn(2000)  # configured again: replaced, not stacked
    assert uvicorn.Config(app=None).ws_max_size == 2000
    assert uvicorn.Config(app=None, ws_max_size=10).ws_max_size == 10  # an explicit size wins
