"""The blocking client: `Client(url)`, its `sessions` (live video) and `jobs` (batch MP4s)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from .common import Schedule, StreamState, job_body, job_token, stream_over
from .errors import JobFailed, SessionNotFound
from .http import Retries, SyncHttp, bearer, headers_for, new_key
from .schemas import JobCancelled, JobCreated, JobStatus, PromptPosted, SessionCreated, SessionStatus
from .video import Frame

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """url: the service's base URL; api_key: its X-API-Key (default: the env LONGLIVE_API_KEY); headers:
    more headers for every request; retries: on connection errors and 503 (http.py)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        retries: Retries = Retries(),  # noqa: B008 - frozen: one shared default is fine
        timeout_s: float = 30.0,
        headers: dict[str, str] | None = None,
    ):
        self.http = SyncHttp(url, headers_for(api_key, headers), retries, timeout_s)
        self.sessions = Sessions(self)
        self.jobs = Jobs(self)

    @property
    def url(self) -> str:
        return self.http.url

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sessions:
    def __init__(self, client: Client):
        self.client = client

    def create(self, prompt: str, *, max_seconds: float | None = None, seed: int = 0) -> LiveSession:
        """Start a live session; it streams from now on (`LiveSession.frames`, `.save`)."""
        body = {"prompt": prompt, "max_seconds": max_seconds, "seed": seed}
        response = self.client.http.request("POST", "/v1/sessions", "new session", {}, json=body)
        return LiveSession(self.client, SessionCreated.model_validate_json(response.content))

    def attach(self, session_id: str, token: str) -> LiveSession:
        """A session made elsewhere (its id and token), e.g. by another process."""
        base = self.client.url
        created = SessionCreated(
            session_id=session_id,
            token=token,
            stream_url=f"{base}/v1/sessions/{session_id}/video.mp4",
            websocket_url=f"{base.replace('http', 'ws', 1)}/v1/sessions/{session_id}/stream",
            replica="",
        )
        return LiveSession(self.client, created)


class LiveSession:
    """A live session; as a context manager, it ends the session on exit."""

    def __init__(self, client: Client, created: SessionCreated):
        self.client, self.created = client, created
        self.id, self.token = created.session_id, created.token
        self.path = f"/v1/sessions/{self.id}"
        self.what = f"session {self.id}"

    def _call(self, method: str, path: str = "", headers: dict[str, str] | None = None, **kwargs):
        auth = {**bearer(self.token), **(headers or {})}
        return self.client.http.request(method, self.path + path, self.what, auth, **kwargs)

    def prompt(self, text: str) -> PromptPosted:
        """The next prompt; it takes effect at a block boundary (see `status().prompts`). Sent with an
        Idempotency-Key, so a retry after a lost reply is applied once."""
        key = {"Idempotency-Key": new_key()}
        response = self._call("POST", "/prompts", key, json={"prompt": text})
        return PromptPosted.model_validate_json(response.content)

    def status(self) -> SessionStatus:
        return SessionStatus.model_validate_json(self._call("GET").content)

    def close(self) -> None:
        """End the session (idempotent: an ended or expired one is left as it is)."""
        try:
            self._call("DELETE")
        except SessionNotFound:
            pass

    def frames(
        self, from_frame: int = 0, *, prompts: bool = True, record: Path | None = None
    ) -> Iterator[Frame]:
        """The session's frames from `from_frame` on, decoded, until it ends; a dropped connection is
        resumed at the next frame (indices stay contiguous). prompts: each frame's prompt from the status
        timeline (a status call per block); record: also write the video to this MP4 as it comes."""
        state = StreamState(from_frame, prompts, record, self.client.http.retries)
        try:
            while True:
                try:
                    yield from self._stream(state)
                    ended = self._ended()
                    if ended:
                        return
                    why = "the stream ended before the session"
                except (httpx.TransportError, httpx.StreamError) as err:
                    why = str(err) or type(err).__name__
                time.sleep(state.dropped(why))
        finally:
            state.close()

    def _stream(self, state: StreamState) -> Iterator[Frame]:
        params = {"from_frame": state.next_frame}
        with self.client.http.stream(
            "GET", f"{self.path}/video.mp4", self.what, bearer(self.token), params=params
        ) as response:
            for chunk in response.iter_bytes():
                for fragment in state.reader.feed(chunk):
                    if state.needs_status(fragment):
                        state.status = self.status()
                    yield from state.frames(fragment)

    def _ended(self) -> bool:
        try:
            return stream_over(self.status())
        except SessionNotFound as gone:
            return stream_over(gone)

    def save(self, path: Path | str) -> int:
        """Write the video from its first frame to an MP4 until the session ends; returns the frames."""
        return sum(1 for _ in self.frames(prompts=False, record=Path(path)))

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Jobs:
    def __init__(self, client: Client):
        self.client = client

    def submit(
        self,
        schedule: Schedule,
        *,
        seconds: float,
        seed: int = 0,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a batch job: `schedule` is a list of {at, prompt} or a YAML/JSON schedule file. Sent with
        an Idempotency-Key (yours, or a fresh one), so a retry queues it once."""
        body = job_body(schedule, seconds, seed, callback_url)
        key = {"Idempotency-Key": idempotency_key or new_key()}
        response = self.client.http.request("POST", "/v1/jobs", "new job", key, json=body)
        created = JobCreated.model_validate_json(response.content)
        return Job(self.client, created.job_id, job_token(created))

    def attach(self, job_id: str, token: str) -> Job:
        return Job(self.client, job_id, token)


class Job:
    def __init__(self, client: Client, job_id: str, token: str):
        self.client, self.id, self.token = client, job_id, token
        self.path, self.what = f"/v1/jobs/{job_id}", f"job {job_id}"

    def status(self) -> JobStatus:
        response = self.client.http.request("GET", self.path, self.what, bearer(self.token))
        return JobStatus.model_validate_json(response.content)

    def wait(self, progress: bool = False, poll_s: float = 0.5, timeout_s: float | None = None) -> JobStatus:
        """Poll until the job is done (progress: a tqdm bar on frames_done). Raises JobFailed when it
        failed or was cancelled, TimeoutError past timeout_s."""
        from tqdm import tqdm

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = None
        try:
            while True:
                status = self.status()
                if progress:
                    bar = bar or tqdm(
                        total=status.frames_total, unit="frame", desc=self.what, dynamic_ncols=True
                    )
                    bar.update(status.frames_done - bar.n)
                if status.state == "done":
                    return status
                if status.state in ("failed", "cancelled"):
                    raise JobFailed(f"{self.what} {status.state}: {status.error or 'no error given'}")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self.what} is still {status.state} after {timeout_s} s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()

    def download(self, path: Path | str) -> Path:
        """The finished job's MP4 to `path` (from the service, or its presigned S3 URL)."""
        status = self.status()
        if status.result_url is None:
            raise JobFailed(f"{self.what} is {status.state}: no video yet")
        http, path = self.client.http, Path(path)
        if status.result_url.startswith(http.url + "/"):  # the local store's route: it checks the token
            video = http.stream("GET", status.result_url[len(http.url) :], self.what, bearer(self.token))
        else:  # a presigned S3 URL is its own credential: the service's headers stay here
            video = http.stream_elsewhere(status.result_url, self.what)
        with video as response, path.open("wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
        return path

    def cancel(self) -> bool:
        """Cancel the job; False when it had ended already."""
        response = self.client.http.request("DELETE", self.path, self.what, bearer(self.token))
        return JobCancelled.model_validate_json(response.content).cancelled
