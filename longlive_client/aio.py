"""The asyncio client: the blocking client's calls, awaited (`AsyncClient(url)`, `sessions`, `jobs`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from .client import DEFAULT_URL
from .common import Schedule, StreamState, job_body, job_token, stream_over
from .errors import JobFailed, SessionNotFound
from .http import AsyncHttp, Retries, bearer, headers_for, new_key
from .schemas import JobCancelled, JobCreated, JobStatus, PromptPosted, SessionCreated, SessionStatus
from .video import Frame


class AsyncClient:
    """As `Client`; `async with AsyncClient(url) as client:` closes its connections."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        retries: Retries = Retries(),  # noqa: B008 - frozen: one shared default is fine
        timeout_s: float = 30.0,
        headers: dict[str, str] | None = None,
    ):
        self.http = AsyncHttp(url, headers_for(api_key, headers), retries, timeout_s)
        self.sessions = AsyncSessions(self)
        self.jobs = AsyncJobs(self)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncSessions:
    def __init__(self, client: AsyncClient):
        self.client = client

    async def create(
        self, prompt: str, *, max_seconds: float | None = None, seed: int = 0
    ) -> AsyncLiveSession:
        body = {"prompt": prompt, "max_seconds": max_seconds, "seed": seed}
        response = await self.client.http.request("POST", "/v1/sessions", "new session", {}, json=body)
        return AsyncLiveSession(self.client, SessionCreated.model_validate_json(response.content))


class AsyncLiveSession:
    """As `LiveSession`; `async with` ends the session on exit."""

    def __init__(self, client: AsyncClient, created: SessionCreated):
        self.client, self.created = client, created
        self.id, self.token = created.session_id, created.token
        self.path, self.what = f"/v1/sessions/{self.id}", f"session {self.id}"

    async def _call(self, method: str, path: str = "", headers: dict[str, str] | None = None, **kwargs):
        auth = {**bearer(self.token), **(headers or {})}
        return await self.client.http.request(method, self.path + path, self.what, auth, **kwargs)

    async def prompt(self, text: str) -> PromptPosted:
        key = {"Idempotency-Key": new_key()}
        response = await self._call("POST", "/prompts", key, json={"prompt": text})
        return PromptPosted.model_validate_json(response.content)

    async def status(self) -> SessionStatus:
        return SessionStatus.model_validate_json((await self._call("GET")).content)

    async def close(self) -> None:
        try:
            await self._call("DELETE")
        except SessionNotFound:
            pass

    async def frames(
        self, from_frame: int = 0, *, prompts: bool = True, record: Path | None = None
    ) -> AsyncIterator[Frame]:
        """As `LiveSession.frames` (a fragment is decoded on the event loop: a block's worth, ~ms)."""
        state = StreamState(from_frame, prompts, record, self.client.http.retries)
        try:
            while True:
                try:
                    async for frame in self._stream(state):
                        yield frame
                    if await self._ended():
                        return
                    why = "the stream ended before the session"
                except (httpx.TransportError, httpx.StreamError) as err:
                    why = str(err) or type(err).__name__
                await asyncio.sleep(state.dropped(why))
        finally:
            state.close()

    async def _stream(self, state: StreamState) -> AsyncIterator[Frame]:
        params, auth = {"from_frame": state.next_frame}, bearer(self.token)
        async with self.client.http.stream(
            "GET", f"{self.path}/video.mp4", self.what, auth, params=params
        ) as response:
            async for chunk in response.aiter_bytes():
                for fragment in state.reader.feed(chunk):
                    if state.needs_status(fragment):
                        state.status = await self.status()
                    for frame in state.frames(fragment):
                        yield frame

    async def _ended(self) -> bool:
        try:
            return stream_over(await self.status())
        except SessionNotFound as gone:
            return stream_over(gone)

    async def save(self, path: Path | str) -> int:
        return sum([1 async for _ in self.frames(prompts=False, record=Path(path))])

    async def __aenter__(self) -> AsyncLiveSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncJobs:
    def __init__(self, client: AsyncClient):
        self.client = client

    async def submit(
        self,
        schedule: Schedule,
        *,
        seconds: float,
        seed: int = 0,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        body = job_body(schedule, seconds, seed, callback_url)
        key = {"Idempotency-Key": idempotency_key or new_key()}
        response = await self.client.http.request("POST", "/v1/jobs", "new job", key, json=body)
        created = JobCreated.model_validate_json(response.content)
        return AsyncJob(self.client, created.job_id, job_token(created))


class AsyncJob:
    def __init__(self, client: AsyncClient, job_id: str, token: str):
        self.client, self.id, self.token = client, job_id, token
        self.path, self.what = f"/v1/jobs/{job_id}", f"job {job_id}"

    async def status(self) -> JobStatus:
        response = await self.client.http.request("GET", self.path, self.what, bearer(self.token))
        return JobStatus.model_validate_json(response.content)

    async def wait(self, poll_s: float = 0.5, timeout_s: float | None = None) -> JobStatus:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := await self.status()).state != "done":
            if status.state in ("failed", "cancelled"):
                raise JobFailed(f"{self.what} {status.state}: {status.error or 'no error given'}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.what} is still {status.state} after {timeout_s} s")
            await asyncio.sleep(poll_s)
        return status

    async def download(self, path: Path | str) -> Path:
        status = await self.status()
        if status.result_url is None:
            raise JobFailed(f"{self.what} is {status.state}: no video yet")
        http, path = self.client.http, Path(path)
        if status.result_url.startswith(http.url + "/"):  # the local store's route: it checks the token
            video = http.stream("GET", status.result_url[len(http.url) :], self.what, bearer(self.token))
        else:  # a presigned S3 URL is its own credential: the service's headers stay here
            video = http.stream_elsewhere(status.result_url, self.what)
        async with video as response:
            with path.open("wb") as out:
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
        return path

    async def cancel(self) -> bool:
        response = await self.client.http.request("DELETE", self.path, self.what, bearer(self.token))
        return JobCancelled.model_validate_json(response.content).cancelled
