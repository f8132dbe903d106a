"""Bounded inbound WebSocket traffic. The video WebSocket takes nothing from the client, but Ray's proxy
reads whatever arrives into a queue of its own, and the ingress replica fetches it into another, whether
the app reads or not: 100 messages of 8 MiB held 3.5 GiB between them. So the limits are kept twice, with
the same tally: in the proxy, by an ASGI middleware (`proxy_middlewares`), which closes the connection
before a message past them is passed on; and in the ingress, whose reader drops what comes in.

Ray Serve 2.60 has no setting for the proxy's uvicorn options: `ray/serve/_private/http_util.py` builds
its `uvicorn.Config` from host, port, root path, keep-alive and TLS only, so `ws_max_size` would stay at
uvicorn's 16 MiB and every message up to that size would be read whole before anyone sees it (a client
sending 8 MiB messages still had the proxy at +94 MiB while its close was on the way). Serve's one hook
into the proxy's process is the env `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, called before the proxy
starts uvicorn: set to `deployments.inbound:proxy_middlewares`, it installs the middleware and lowers
uvicorn's `ws_max_size` default in that process to `max_message_bytes` (a larger frame is refused with
1009 from its header, unread). The proxy's process must have the env when it starts; the limits come from
the env `LONGLIVE_WEBSOCKET_INBOUND` (InboundLimits as JSON; unset: the defaults).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, MutableMapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware import Middleware

Message = MutableMapping[str, Any]
PROXY_HOOK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_HOOK = "deployments.inbound:proxy_middlewares"
LIMITS_ENV = "LONGLIVE_WEBSOCKET_INBOUND"


class InboundLimits(BaseModel):
    """What a client may send on a WebSocket of the service: past `max_message_bytes` in one message the
    connection is closed with 1009, past the totals with 1008."""

    model_config = ConfigDict(extra="forbid")

    max_message_bytes: int = Field(4096, ge=1, le=1 << 20, description="one message; larger: close 1009")
    max_bytes: int = Field(64 * 1024, ge=1, description="all messages of one connection; more: close 1008")
    max_messages: int = Field(256, ge=1, description="messages of one connection; more: close 1008")


class Tally:
    """One connection's inbound messages against the limits."""

    def __init__(self, limits: InboundLimits):
        self.limits, self.messages, self.bytes = limits, 0, 0

    def over(self, message: Message) -> tuple[int, str] | None:
        """Count a `websocket.receive` message; the close code and reason once past a limit."""
        size = len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
        self.messages, self.bytes = self.messages + 1, self.bytes + size
        if size > self.limits.max_message_bytes:
            return 1009, f"messages over {self.limits.max_message_bytes} bytes"
        if self.bytes > self.limits.max_bytes or self.messages > self.limits.max_messages:
            return 1008, "this stream takes no input"
        return None


class InboundGuard:
    """Pure ASGI middleware for Ray's proxy: a WebSocket past its limits is closed there, and the app
    behind it (the replica) gets a disconnect instead of the message."""

    def __init__(self, app: Callable, limits: InboundLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: Message, receive: Callable, send: Callable) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        tally, closed = Tally(self.limits), None

        async def bounded_receive() -> Message:
            nonlocal closed
            if closed is not None:
                return {"type": "websocket.disconnect", "code": closed}
            message = await receive()
            if message["type"] == "websocket.receive" and (over := tally.over(message)):
                closed = over[0]
                await send({"type": "websocket.close", "code": over[0], "reason": over[1]})
                return {"type": "websocket.disconnect", "code": closed}
            return message

        async def guarded_send(message: Message) -> None:
            if closed is None:  # after the guard's close, the app's messages have nowhere to go
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)


def proxy_limits() -> InboundLimits:
    configured = os.environ.get(LIMITS_ENV)
    return InboundLimits.model_validate_json(configured) if configured else InboundLimits()


def limit_uvicorn(max_size: int) -> None:
    """uvicorn.Config's ws_max_size default, in this process only (see the module docstring)."""
    import uvicorn

    init = uvicorn.Config.__init__
    if getattr(init, "longlive_ws_max_size", None) is not None:
        init = init.__wrapped__  # configured again: replace, not stack

    @functools.wraps(init)
    def limited(self, *args, **kwargs) -> None:
        kwargs.setdefault("ws_max_size", max_size)
        init(self, *args, **kwargs)

    limited.longlive_ws_max_size = max_size
    uvicorn.Config.__init__ = limited


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy hook (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): called once in each proxy, before
    its uvicorn starts."""
    limits = proxy_limits()
    limit_uvicorn(limits.max_message_bytes)
    return [Middleware(InboundGuard, limits=limits)]


def proxy_env(limits: InboundLimits) -> dict[str, str]:
    """What a process that starts Ray's proxies sets in their environment."""
    return {PROXY_HOOK_ENV: PROXY_HOOK, LIMITS_ENV: limits.model_dump_json()}
