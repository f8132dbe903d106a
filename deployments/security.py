"""The ingress's guard against bad input and unauthorised use (installed on the FastAPI app by `install`).

One pure ASGI middleware, for HTTP and WebSocket alike, checks in this order:
1. rate limit per client (a moving 1-minute window in Redis, the `limits` library's: shared by all ingress
   replicas, and no burst of twice the limit across a window's edge) -> 429;
2. the service-wide API key (`X-API-Key`, when any key is configured; a WebSocket may give it as `?api_key=`,
   browsers cannot send its headers) -> 401 (WebSocket: close 4401); the web page's files need none;
3. the request body's size (Content-Length, and the bytes actually streamed) -> 413;
and answers any exception the app did not handle with a 500 that names a request id, never a traceback.
Exception handlers: Redis down -> 503 with Retry-After; a bad body -> 422 listing loc + msg per error only;
a route's ApiError and Starlette's own 404/405 -> their status. Every refusal is a problem body with a
machine-readable `code` (deployments/problems.py).
Per-session and per-job bearer tokens stay with the routes (ingress.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse
from fastapi.websockets import WebSocket
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.redis_client import async_options
from jobs.repeats import Repeats

from .config import ServiceConfig
from .problems import HTTP_CODES, ApiError, problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("longlive.security")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/openapi.json", "/"})  # no API key needed
PUBLIC_PREFIXES = ("/web/",)  # the web page's assets (it holds no secret; it sends the key typed into it)
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz"})  # probes: not rate limited, answer with Redis down
RATE_PREFIX = "ratelimit"  # the limiter's keys: ratelimit:LIMITER/{client digest}/{limit}/{window}/second
WINDOW_S = 60
FORWARDED = "forwarded"  # the one client of requests whose address a proxy took from X-Forwarded-For
API_KEYS_ENV = "LONGLIVE_API_KEYS"
STORAGE_DOWN = "storage unavailable, retry later"
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)  # redis.asyncio's too
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def api_key_digests(configured: list[str]) -> list[str]:
    """SHA-256 digests of the configured keys (`sha256:<hex>` entries are digests already); the env
    LONGLIVE_API_KEYS (comma separated, same forms) when the config lists none."""
    keys = configured or [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return [k[len("sha256:") :].lower() if k.startswith("sha256:") else key_digest(k) for k in keys]


def client_digest(client: str) -> str:
    """The client as it goes into Redis key names (quotas, idempotency keys, the rate limit)."""
    return hashlib.sha256(client.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def rate_item(limit: int, window_s: int = WINDOW_S) -> RateLimitItem:
    return RateLimitItemPerSecond(limit, window_s)


def rate_key(client: str, limit: int, window_s: int = WINDOW_S) -> str:
    """The Redis list of a client's admitted requests' times (newest first, at most `limit`)."""
    return f"{RATE_PREFIX}:{rate_item(limit, window_s).key_for(client_digest(client))}"


def request_id(scope: Scope) -> str:
    """Ray Serve's proxy puts its request id into the headers (and answers with it as X-Request-ID)."""
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            value = value.decode("latin-1")
            if _REQUEST_ID.match(value):
                return value
    return uuid.uuid4().hex


def header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return value.decode("latin-1")
    return None


def query_param(scope: Scope, wanted: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(wanted)
    return values[0] if values else None


def public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class Guard:
    """The checks' settings and Redis client; `configure` is called by the Ingress's constructor."""

    window_s = WINDOW_S  # rate_limit_per_minute's window (tests shorten it)

    def __init__(self) -> None:
        self.config: ServiceConfig | None = None
        self.digests: list[str] = []
        self.limiter: MovingWindowRateLimiter | None = None
        self.storage = Repeats(logger, "Redis unavailable")  # one line per outage, not one per request

    def configure(self, config: ServiceConfig) -> None:
        self.digests = api_key_digests(config.api_keys)
        # A re-send of the limiter's one Lua step after a lost reply counts a request twice in its window,
        # which costs the client one request of its budget; not re-sending turns the first request after
        # every Redis restart into a 503. Errors are not wrapped: Redis away is the usual 503.
        options = async_options(config.redis_url, config.redis_timeout_s)
        storage = RedisStorage(
            f"async+{config.redis_url}", implementation="redispy", key_prefix=RATE_PREFIX, **options
        )
        self.limiter = MovingWindowRateLimiter(storage)
        self.config = config

    @property
    def retry_after(self) -> str:
        return str(self.config.retry_after_s if self.config else 5)

    def client(self, scope: Scope) -> str:
        """Whom the rate limit and the quotas count: the API key (its digest) when keys are configured and
        it is one of them (a wrong key is no new client: its address is), else the address."""
        if self.digests and self.key_ok(scope):
            return f"key:{key_digest(self.given_key(scope))}"
        return self.address(scope)

    def address(self, scope: Scope) -> str:
        """The TCP peer; X-Forwarded-For's first entry only with trust_forwarded_for. A uvicorn started
        without FORWARDED_ALLOW_IPS (Ray's proxy on a Ray we did not start) has already put a loopback
        peer's X-Forwarded-For entry in its place: such requests are one client, not one per header."""
        forwarded = [h.strip() for h in (header(scope, b"x-forwarded-for") or "").split(",") if h.strip()]
        if self.config.trust_forwarded_for and forwarded:
            return forwarded[0][:64]
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        return FORWARDED if peer in forwarded else peer

    def given_key(self, scope: Scope) -> str | None:
        given = header(scope, b"x-api-key")
        if given is None and scope["type"] == "websocket":
            given = query_param(scope, "api_key")  # a browser cannot send headers on a WebSocket
        return given

    def key_ok(self, scope: Scope) -> bool:
        if not self.digests:
            return True
        given = self.given_key(scope)
        digest = key_digest(given) if given else ""
        found = False
        for expected in self.digests:  # no early exit: the time does not tell which key matched
            found |= hmac.compare_digest(expected, digest)
        return found

    async def over_limit(self, scope: Scope) -> int | None:
        """Counts this request; returns Retry-After seconds when the client is over its limit: until the
        oldest request of the last window leaves it."""
        limit = self.config.rate_limit_per_minute
        if limit == 0 or scope["path"] in UNLIMITED_PATHS:
            return None
        item, client = rate_item(limit, self.window_s), client_digest(self.client(scope))
        if await self.limiter.hit(item, client):
            return None
        stats = await self.limiter.get_window_stats(item, client)
        return max(1, math.ceil(stats.reset_time - time.time()))


class GuardMiddleware:
    """Rate limit, API key, body size and the last-resort 500 (see the module docstring)."""

    def __init__(self, app: Callable, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        guard, rid = self.guard, request_id(scope)
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.close"):
                started = True
            await send(message)

        async def refuse(
            status: int, code: str, detail: str, headers: dict | None = None, ws_code: int = 4400, **extra
        ) -> None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": ws_code, "reason": detail[:100]})
            else:
                await problem(status, code, detail, headers, **extra)(scope, receive, send)

        # 1. Rate limit (Redis; down -> 503 like every other route that needs it).
        if guard.config is None:
            await refuse(503, "starting", "starting, retry later", {"Retry-After": "1"}, 1013)
            return
        try:
            retry = await guard.over_limit(scope)
        except REDIS_DOWN as err:
            guard.storage.failed(err)
            await refuse(503, "storage_unavailable", STORAGE_DOWN, {"Retry-After": guard.retry_after}, 1013)
            return
        if guard.config.rate_limit_per_minute and scope["path"] not in UNLIMITED_PATHS:
            guard.storage.ok()  # Redis answered the rate limit: an outage it logged is over
        if retry is not None:
            await refuse(429, "rate_limited", "rate limit exceeded", {"Retry-After": str(retry)}, 4429)
            return
        # 2. API key.
        if not public(scope["path"]) and not guard.key_ok(scope):
            await refuse(401, "api_key_required", "missing or wrong X-API-Key", ws_code=4401)
            return
        # 3. Body size: the declared length first, then the bytes actually sent (chunked bodies).
        if scope["type"] == "http":
            limit = guard.config.max_body_bytes
            declared = header(scope, b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                if declared.isdigit():
                    await refuse(413, "body_too_large", f"body over {limit} bytes")
                else:
                    await refuse(400, "bad_content_length", "bad Content-Length")
                return
            receive = await self._bounded_body(receive, limit)
            if receive is None:
                await refuse(413, "body_too_large", f"body over {limit} bytes")
                return
        # 4. The app; anything it did not handle becomes a 500 naming the request id.
        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            logger.exception(
                "request %s %s failed (request id %s)", scope.get("method", "WS"), scope["path"], rid
            )
            if started:
                raise  # mid-response: only aborting the connection tells the client
            await refuse(500, "internal_error", "internal error", ws_code=1011, request_id=rid)

    @staticmethod
    async def _bounded_body(receive: Receive, limit: int) -> Receive | None:
        """Reads the body (at most `limit` bytes) and returns a receive that replays it, then goes on
        with the connection's own (for disconnects); None when the body is larger."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)  # a disconnect: the app sees it
                break
            size += len(message.get("body", b""))
            if size > limit:
                return None
            chunks.append(message)
            if not message.get("more_body", False):
                break
        if len(chunks) == 1:
            replay = [chunks[0]]
        else:
            body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
            replay = [{"type": "http.request", "body": body, "more_body": False}]
            replay += [m for m in chunks if m["type"] != "http.request"]

        async def bounded() -> Message:
            return replay.pop(0) if replay else await receive()

        return bounded


def _text(value: object, limit: int) -> str:
    """Cut short, and what is not UTF-8 (lone surrogates) escaped: always encodable."""
    return str(value)[:limit].encode("utf-8", "backslashreplace").decode()


def validation_errors(exc: RequestValidationError) -> list[dict]:
    """loc + msg per error: never the input (pydantic's `input` and `ctx` are dropped)."""
    return [
        {
            "loc": [p if isinstance(p, int) else _text(p, 64) for p in e.get("loc", ())],
            "msg": _text(e.get("msg", ""), 300),
        }
        for e in exc.errors()
    ]


def install(app: FastAPI) -> Guard:
    """Adds the middleware and the exception handlers to `app`; returns the guard to `configure`."""
    guard = Guard()
    app.add_middleware(GuardMiddleware, guard=guard)

    async def storage_down(request: Request, exc: Exception) -> JSONResponse:
        guard.storage.failed(exc)
        return problem(503, "storage_unavailable", STORAGE_DOWN, {"Retry-After": guard.retry_after})

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, "invalid_request", validation_errors(exc))

    async def refused(request: Request, exc: ApiError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, exc.headers, **exc.extra)

    async def starlette_refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return problem(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def invalid_ws(websocket: WebSocket, exc: WebSocketRequestValidationError) -> None:
        await websocket.close(code=1008, reason="invalid request")

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # The middleware answers first; this covers a failure in the middleware itself.
        rid = request_id(request.scope)
        logger.error("request failed (request id %s)", rid, exc_info=exc)
        return problem(500, "internal_error", "internal error", request_id=rid)

    for exc_class in REDIS_DOWN:
        app.add_exception_handler(exc_class, storage_down)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ApiError, refused)
    app.add_exception_handler(StarletteHTTPException, starlette_refused)
    app.add_exception_handler(WebSocketRequestValidationError, invalid_ws)
    app.add_exception_handler(Exception, internal)
    return guard
