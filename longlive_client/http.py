"""HTTP with bounded retries, sync and async (httpx). A call is retried with backoff on a connection error
and on a 503 only where sending it again is safe: a GET or DELETE, a POST that carries an Idempotency-Key
(the service applies it once), or any request that never reached the service (the connection was not
made). Every other refusal is raised at once as its typed exception (errors.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import httpx

from .errors import ServiceUnreachable, api_error, retry_after

API_KEY_ENV = "LONGLIVE_API_KEY"
logger = logging.getLogger("longlive.client")


@dataclass(frozen=True)
class Retries:
    """attempts: tries in all (1: never retry); the wait doubles from backoff_s up to max_wait_s, or is
    what a 503's Retry-After says (also at most max_wait_s)."""

    attempts: int = 4
    backoff_s: float = 0.5
    max_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_wait_s < 0:
            raise ValueError(f"attempts must be >= 1 and the waits >= 0, got {self}")

    def wait(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait after failed try `attempt` (1-based)."""
        said = retry_after(response) if response is not None else None
        wait = said if said is not None else self.backoff_s * 2 ** (attempt - 1)
        return min(wait, self.max_wait_s)


def new_key() -> str:
    """A fresh Idempotency-Key: one per logical POST, the same on each of its retries."""
    return str(uuid.uuid4())


def headers_for(api_key: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    """The service's API key (the argument, else LONGLIVE_API_KEY) and the caller's own headers."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {**({"X-API-Key": key} if key else {}), **(extra or {})}


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def safe_to_resend(method: str, headers: dict[str, str]) -> bool:
    return method in ("GET", "DELETE") or "Idempotency-Key" in headers


def retried(method: str, headers: dict[str, str], error: httpx.TransportError) -> bool:
    """A connection that was never made carried nothing: any request may go again."""
    return isinstance(error, httpx.ConnectError | httpx.ConnectTimeout) or safe_to_resend(method, headers)


class SyncHttp:
    def __init__(self, url: str, headers: dict[str, str], retries: Retries, timeout_s: float):
        self.url, self.retries = url.rstrip("/"), retries
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, what: str, headers: dict[str, str], **kwargs) -> httpx.Response:
        """The response of a 2xx; a refusal raises its typed exception, no answer ServiceUnreachable."""
        with self.stream(method, path, what, headers, **kwargs) as response:
            response.read()
            return response

    @contextmanager
    def stream(
        self, method: str, path: str, what: str, headers: dict[str, str], **kwargs
    ) -> Iterator[httpx.Response]:
        """The open response of a 2xx, its body unread (a live video); retried as `request`. An error while
        the caller reads the body is the caller's (it knows where to resume)."""
        request = self.client.build_request(method, path, headers=headers, **kwargs)
        for attempt in range(1, self.retries.attempts + 1):
            last = attempt == self.retries.attempts
            try:
                response = self.client.send(request, stream=True)
                if not response.is_success:
                    response.read()
                    response.close()
            except httpx.TransportError as err:
                if last or not retried(method, headers, err):
                    raise ServiceUnreachable(self.url, describe(err)) from None
                wait = self.retries.wait(attempt)
            else:
                if response.is_success:
                    try:
                        yield response
                    finally:
                        response.close()
                    return
                if response.status_code != 503 or last or not safe_to_resend(method, headers):
                    raise api_error(response, what)
                wait = self.retries.wait(attempt, response)
            logger.info("%s %s: retrying in %.1f s (try %d)", method, path, wait, attempt + 1)
            time.sleep(wait)

    @contextmanager
    def stream_elsewhere(self, url: str, what: str) -> Iterator[httpx.Response]:
        """A GET of a URL outside the service (a presigned S3 URL), without the service's headers."""
        try:
            with httpx.stream("GET", url, timeout=self.client.timeout) as response:
                if not response.is_success:
                    response.read()
                    raise api_error(response, what)
                yield response
        except httpx.ConnectError as err:
            raise ServiceUnreachable(url.split("?")[0], describe(err)) from None

    def close(self) -> None:
        self.client.close()


class AsyncHttp:
    def __init__(self, url: str, headers: dict[str, str], retries: Retries, timeout_s: float):
        self.url, self.retries = url.rstrip("/"), retries
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s)

    async def request(
        self, method: str, path: str, what: str, headers: dict[str, str], **kwargs
    ) -> httpx.Response:
        async with self.stream(method, path, what, headers, **kwargs) as response:
            await response.aread()
            return response

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, what: str, headers: dict[str, str], **kwargs
    ) -> AsyncIterator[httpx.Response]:
        request = self.client.build_request(method, path, headers=headers, **kwargs)
        for attempt in range(1, self.retries.attempts + 1):
            last = attempt == self.retries.attempts
            try:
                response = await self.client.send(request, stream=True)
                if not response.is_success:
                    await response.aread()
                    await response.aclose()
            except httpx.TransportError as err:
                if last or not retried(method, headers, err):
                    raise ServiceUnreachable(self.url, describe(err)) from None
                wait = self.retries.wait(attempt)
            else:
                if response.is_success:
                    try:
                        yield response
                    finally:
                        await response.aclose()
                    return
                if response.status_code != 503 or last or not safe_to_resend(method, headers):
                    raise api_error(response, what)
                wait = self.retries.wait(attempt, response)
            logger.info("%s %s: retrying in %.1f s (try %d)", method, path, wait, attempt + 1)
            await asyncio.sleep(wait)

    @asynccontextmanager
    async def stream_elsewhere(self, url: str, what: str) -> AsyncIterator[httpx.Response]:
        try:
            async with httpx.AsyncClient(timeout=self.client.timeout) as other:
                async with other.stream("GET", url) as response:
                    if not response.is_success:
                        await response.aread()
                        raise api_error(response, what)
                    yield response
        except httpx.ConnectError as err:
            raise ServiceUnreachable(url.split("?")[0], describe(err)) from None

    async def aclose(self) -> None:
        await self.client.aclose()


def describe(error: httpx.TransportError) -> str:
    """One line for a transport error (httpx's own message can be empty, e.g. for a read timeout)."""
    return str(error) or type(error).__name__
