"""Ingress: the session API on FastAPI (CPU). Parses, checks the token, calls the Generator's handle
with the session id (the router pins it to its replica), encodes; prompt events go to Redis only.

Ids are checked against their format before they touch Redis (a malformed one is a 404), and every
refusal is a problem body with a `code` (deployments/problems.py)."""

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.handle import DeploymentHandle
from redis.exceptions import RedisError

from jobs.queue import ClientQueueFull, KeyReused, QueueFull, valid_job_id
from jobs.storage import LocalStore
from longlive_client.schemas import (
    IDEMPOTENCY_KEY,
    CreateSession,
    JobCancelled,
    JobCreated,
    JobStatus,
    PostPrompt,
    Problem,
    PromptPosted,
    Ready,
    ReplicasView,
    SessionCreated,
    SessionStatus,
    SubmitJob,
)
from longlive_core.schedule import frames_total

from .config import FORWARDED_ALLOW_IPS, ServiceConfig
from .errors import FramesGone, ReplicaFull, SessionMoved, SessionNotHere, TooManyStreams
from .gone_replicas import GONE
from .inbound import InboundLimits, Tally
from .metrics import log, metrics
from .problems import ApiError, not_found, problem
from .security import client_digest, install
from .store import (
    PromptKeyReused,
    SessionEnded,
    SessionStore,
    TooManySessions,
    UnknownSession,
    new_id,
    token_digest,
    token_matches,
    valid_id,
)
from .webpage import web_file

app = FastAPI(title="longlive", description="Real-time interactive long text-to-video (LongLive)")
guard = install(app)  # rate limit, API key, body size, error handlers (deployments/security.py)
ADMISSION_ATTEMPTS = 8
ADMISSION_BACKOFF_S = 0.1
FAILOVER_BACKOFF_S = 0.5
READY_TIMEOUT_S = 0.8  # /readyz answers within 1 s whatever the replicas do
REPLICA_GONE = (RayActorError, ActorUnavailableError)  # its replica died or is being replaced
logger = logging.getLogger("longlive.ingress")
ERRORS = {code: {"model": Problem} for code in (401, 403, 404, 409, 410, 413, 422, 429, 503)}
# A POST sent again with the same key (a client's retry after a lost reply) is applied once.
IDEMPOTENCY_HEADER = Header(
    None,
    alias="Idempotency-Key",
    min_length=1,
    max_length=200,
    pattern=IDEMPOTENCY_KEY,
    description="letters, digits, . _ : -; the same key again answers the first post's result",
)


async def drain_inbound(ws: WebSocket, limits: InboundLimits) -> tuple[int, str] | None:
    """Read and drop what the client sends on the video WebSocket until it goes (None) or passes a limit
    (the close code and reason): unread, it would pile up in this replica (deployments/inbound.py)."""
    tally = Tally(limits)
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        if over := tally.over(message):
            return over


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=500)
@serve.ingress(app)
class Ingress:
    def __init__(self, generator: DeploymentHandle, config: dict):
        self.generator = generator
        self.config = ServiceConfig(**config)
        guard.configure(self.config)
        self.metrics, self.log = metrics(), log("longlive.ingress")
        self.store = SessionStore(self.config.redis_url, self.config.redis_timeout_s)
        self.jobs = self.config.job_queue(self.config.redis_timeout_s)
        self.videos = self.config.video_store()
        # uvicorn in Ray's proxy rewrites the peer from X-Forwarded-For for the peers this env names
        # (127.0.0.1 and ::1 unless set): only the Ray start can set it (`longlive serve` does).
        proxy_trusts = os.environ.get(FORWARDED_ALLOW_IPS, "127.0.0.1,::1")
        if proxy_trusts != self.config.forwarded_allow_ips:
            logger.warning(
                "Ray's proxy trusts X-Forwarded-For from %r; start Ray with %s=%r to match "
                "trust_forwarded_for (meanwhile such requests count as one client)",
                proxy_trusts,
                FORWARDED_ALLOW_IPS,
                self.config.forwarded_allow_ips,
            )

    def _client(self, request: Request) -> str:
        """The quotas' and idempotency keys' client (security.Guard.client), as a digest for key names."""
        return client_digest(guard.client(request.scope))

    def _busy(self, status: int, code: str, detail: str) -> ApiError:
        return ApiError(status, code, detail, {"Retry-After": str(self.config.retry_after_s)})

    def _check_limits(self, prompts: list[str], seconds: float | None = None, kind: str = "session") -> None:
        if errors := self.config.limit_errors(prompts, seconds, kind):
            raise ApiError(422, "invalid_request", errors)  # the shape of pydantic's 422

    def _session(self, session_id: str, stream: bool = False) -> DeploymentHandle:
        return self.generator.options(session_id=session_id, stream=stream)

    async def _call(self, session_id: str, method: str, *args):
        """A Generator call for the session; while its replica is gone, retried until the router has moved
        the session to a live replica (which restores it), for up to failover_timeout_s."""
        deadline = time.monotonic() + self.config.failover_timeout_s
        while True:
            try:
                return await getattr(self._session(session_id), method).remote(session_id, *args)
            except REPLICA_GONE as err:
                if time.monotonic() > deadline:
                    self.metrics.error("ingress", "failover_timeout")
                    raise ApiError(
                        503, "replica_gone", "the session's replica is gone and no other took it over"
                    ) from None
                await self._replica_gone(err)

    @staticmethod
    async def _replica_gone(err: RayActorError) -> None:
        """A call failed on the actor the error names: the router moves the session off it at its next
        request (GONE), without waiting for Serve's health checks. The first retry goes at once, later ones
        back off (with one replica, until Serve's replacement is up)."""
        actor = err.actor_id
        if actor is not None and actor not in GONE.recent():
            GONE.report(actor)
            return
        await asyncio.sleep(FAILOVER_BACKOFF_S)

    async def _pieces(self, session_id: str, fmt: str, from_frame: int) -> AsyncIterator[bytes]:
        """The session's video from `from_frame` on. If its replica dies mid-stream, the stream goes on
        from the next frame on the replica the session moves to: the client sees a pause, not an end."""
        next_frame, send_init = from_frame, True
        deadline = None
        while True:
            try:
                handle = self._session(session_id, stream=True)
                async for first, frames, data in handle.stream.remote(session_id, fmt, next_frame, send_init):
                    yield data
                    next_frame, send_init, deadline = first + frames, False, None
                return
            except (*REPLICA_GONE, SessionMoved) as err:
                deadline = deadline or time.monotonic() + self.config.failover_timeout_s
                if time.monotonic() > deadline:
                    self.metrics.error("ingress", "failover_timeout")
                    return
                self.log.warning(
                    "replica gone at frame %d, resuming elsewhere",
                    next_frame,
                    extra={"session_id": session_id},
                )
                if isinstance(err, SessionMoved):  # moved by another router: follow it
                    await asyncio.sleep(FAILOVER_BACKOFF_S)
                else:
                    await self._replica_gone(err)
            except SessionNotHere:
                return

    async def _opened(self, session_id: str, fmt: str, from_frame: int) -> AsyncIterator[bytes]:
        """The stream with its first piece fetched already, so that a refusal (the frame asked for is no
        longer kept, too many streams) answers as a status, not as a broken stream."""
        pieces = self._pieces(session_id, fmt, from_frame)
        try:
            first = [await anext(pieces)]
        except StopAsyncIteration:
            first = []
        except FramesGone as gone:
            oldest = getattr(gone, "cause", gone).oldest_frame  # Ray's wrapper keeps the cause
            raise ApiError(
                410, "frames_gone", f"frame {from_frame} is no longer kept", oldest_frame=oldest
            ) from None
        except TooManyStreams:
            limit = self.config.max_streams_per_session
            raise ApiError(
                429,
                "too_many_streams",
                f"the session has its {limit} streams open: close one first",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from None

        async def chained() -> AsyncIterator[bytes]:
            for piece in first:
                yield piece
            async for piece in pieces:
                yield piece

        return chained()

    async def _authorize(self, session_id: str, token: str | None) -> dict:
        if not valid_id(session_id):
            raise not_found("session")  # never reaches Redis: `x:events` names no other key
        record = await self.store.get(session_id)
        if record is None:
            raise not_found("session")
        if not token_matches(record, token):
            raise ApiError(403, "wrong_token", "wrong or missing session token")
        return record

    @app.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return web_file()  # the web page (deployments/web/)

    @app.get("/web/{name}", include_in_schema=False)
    async def page_asset(self, name: str) -> FileResponse:
        return web_file(name)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Problem}})
    async def readyz(self) -> Ready | JSONResponse:
        # Generator replicas are only routed to once their constructor (load + warm-up) finished; while
        # none is (start-up, a failover) the call would wait: bounded, so probes get an answer in time.
        try:
            info = await asyncio.wait_for(self._readiness(), READY_TIMEOUT_S)
        except TimeoutError:
            return problem(503, "not_ready", "no answer from Redis and a Generator within 1 s")
        except (RedisError, RayError) as err:  # Redis away, no Generator (yet)
            return problem(503, "not_ready", f"not ready: {type(err).__name__}")
        except Exception as err:  # noqa: BLE001 - a bug: logged as one, and the service is not ready
            logger.exception("readiness check failed (a bug)")
            return problem(503, "not_ready", f"not ready: {type(err).__name__}")
        return Ready(status="ready", **info)

    async def _readiness(self) -> dict:
        await self.store.ping()
        return await self.generator.info.remote()

    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated, responses=ERRORS)
    async def create(self, body: CreateSession, request: Request) -> SessionCreated:
        self._check_limits([body.prompt], body.max_seconds)
        # The router sends a new session to the least-loaded replica; if that one filled up meanwhile,
        # try again under a fresh id (the router then sees the updated loads).
        client, quota = self._client(request), self.config.max_sessions_per_client
        for _ in range(ADMISSION_ATTEMPTS):
            session_id, token = new_id(), secrets.token_urlsafe(24)
            try:
                await self.store.create(session_id, token, body.seed, client, quota)
            except TooManySessions:
                raise self._busy(
                    429, "client_sessions", f"this client has its {quota} sessions open: end one first"
                ) from None
            try:
                result = await self._session(session_id).create.remote(
                    session_id, body.prompt, body.seed, body.max_seconds
                )
                break
            except ReplicaFull:
                await self.store.delete(session_id)
                await asyncio.sleep(ADMISSION_BACKOFF_S)
            except Exception:
                with contextlib.suppress(RedisError):  # ended: it holds none of its client's quota
                    await self.store.mark_ended(session_id)
                raise
        else:
            self.metrics.error("ingress", "capacity")
            raise self._busy(503, "at_capacity", "every replica is at capacity")
        base = str(request.base_url).rstrip("/")
        return SessionCreated(
            session_id=session_id,
            token=token,
            stream_url=f"{base}/v1/sessions/{session_id}/video.mp4",
            websocket_url=f"{base.replace('http', 'ws', 1)}/v1/sessions/{session_id}/stream",
            replica=result["replica"],
        )

    @app.get("/v1/sessions/{session_id}", response_model=SessionStatus, responses=ERRORS)
    async def status(self, session_id: str, authorization: str | None = Header(None)) -> SessionStatus:
        await self._authorize(session_id, bearer(authorization))
        # The replica's times are Unix seconds: the model makes them ISO 8601 UTC.
        return SessionStatus.model_validate(await self._running(session_id))

    async def _running(self, session_id: str) -> dict:
        try:
            return await self._call(session_id, "status")
        except SessionNotHere:
            raise ApiError(404, "session_not_running", "the session is not running any more") from None

    @app.post(
        "/v1/sessions/{session_id}/prompts", status_code=202, response_model=PromptPosted, responses=ERRORS
    )
    async def post_prompt(
        self,
        session_id: str,
        body: PostPrompt,
        authorization: str | None = Header(None),
        idempotency_key: str | None = IDEMPOTENCY_HEADER,
    ) -> PromptPosted:
        self._check_limits([body.prompt])
        await self._authorize(session_id, bearer(authorization))
        try:
            event_id = await self.store.post_prompt(session_id, body.prompt, idempotency_key)
        except UnknownSession:
            raise not_found("session") from None
        except SessionEnded:
            raise ApiError(409, "session_ended", "the session has ended: it takes no more prompts") from None
        except PromptKeyReused:
            raise ApiError(
                422, "idempotency_key_reused", "this idempotency key was used with another prompt"
            ) from None
        return PromptPosted(event_id=event_id)

    @app.delete("/v1/sessions/{session_id}", status_code=204, responses=ERRORS)
    async def end(self, session_id: str, authorization: str | None = Header(None)) -> None:
        await self._authorize(session_id, bearer(authorization))
        await self.store.mark_ended(session_id)  # first: no replica restores it from now on
        try:
            await self._call(session_id, "end")
        except SessionNotHere:
            pass  # already gone: ending is idempotent

    @app.get("/v1/sessions/{session_id}/video.mp4", responses=ERRORS)
    async def video(
        self,
        session_id: str,
        authorization: str | None = Header(None),
        token: str | None = Query(None),
        from_frame: int = Query(0, ge=0, description="resume: the first video frame still needed"),
    ) -> StreamingResponse:
        """The live video as one chunked fragmented MP4 (a fragment per block; decode times count from the
        session's first frame, so a resumed stream continues the old one's timeline), from exactly frame
        `from_frame` on: 410 with the oldest frame kept when the session no longer has it, 429 past the
        session's open streams."""
        await self._authorize(session_id, bearer(authorization) or token)
        await self._running(session_id)
        pieces = await self._opened(session_id, "mp4", from_frame)
        return StreamingResponse(pieces, media_type="video/mp4")

    @app.websocket("/v1/sessions/{session_id}/stream")
    async def websocket(
        self,
        ws: WebSocket,
        session_id: str,
        token: str | None = None,
        format: str = "mp4",
        from_frame: int = 0,
    ):
        record = await self.store.get(session_id) if valid_id(session_id) else None
        valid = format in ("mp4", "jpeg") and from_frame >= 0
        if record is None or not token_matches(record, token) or not valid:
            await ws.close(code=4403 if record is not None else 4404)
            return
        await ws.accept()
        try:
            pieces = await self._opened(session_id, format, from_frame)
        except ApiError as refused:  # 4410: the frame is no longer kept, 4429: too many streams
            await ws.close(code=4000 + refused.status, reason=f"{refused.code}: {refused.extra}"[:120])
            return
        await self._stream_to(ws, pieces)

    async def _stream_to(self, ws: WebSocket, pieces: AsyncIterator[bytes]) -> None:
        """Send the video while a reader task drains (and bounds) what the client sends."""

        async def send_all() -> None:
            async for chunk in pieces:
                await ws.send_bytes(chunk)

        sender = asyncio.create_task(send_all())
        reader = asyncio.create_task(drain_inbound(ws, self.config.websocket_inbound))
        await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        for task in (sender, reader):
            task.cancel()
        sent, read = await asyncio.gather(sender, reader, return_exceptions=True)
        if isinstance(sent, Exception) and not isinstance(sent, WebSocketDisconnect):
            raise sent  # a failure of the stream itself: logged by the guard like any other
        try:
            if isinstance(read, tuple):  # past a limit: the video stops (its stream is closed) first
                await ws.close(*read)
            elif sent is None:  # the session ended: every piece was sent
                await ws.close()
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client is gone already

    # -- jobs --------------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, response_model=JobCreated, responses=ERRORS)
    async def submit_job(
        self, body: SubmitJob, request: Request, idempotency_key: str | None = IDEMPOTENCY_HEADER
    ) -> JobCreated:
        """The Idempotency-Key header is the body's `idempotency_key` (the client's own); given both, they
        must agree."""
        if idempotency_key is not None:
            if body.idempotency_key not in (None, idempotency_key):
                why = "the Idempotency-Key header and the body's idempotency_key differ"
                raise ApiError(422, "invalid_request", [{"loc": ["header", "Idempotency-Key"], "msg": why}])
            body = body.model_copy(update={"idempotency_key": idempotency_key})
        self._check_limits([e.prompt for e in body.schedule], body.seconds, "job")
        if body.callback_url is not None and (why := self.config.callbacks.refusal(str(body.callback_url))):
            raise ApiError(422, "callback_not_allowed", [{"loc": ["body", "callback_url"], "msg": why}])
        token = secrets.token_urlsafe(24)
        try:
            job_id, duplicate = await asyncio.to_thread(
                self.jobs.submit, body, frames_total(body.seconds), token_digest(token), self._client(request)
            )
        except QueueFull:
            raise self._busy(503, "job_queue_full", "the job queue is full") from None
        except ClientQueueFull:
            limit = self.config.max_queued_jobs_per_client
            raise self._busy(429, "client_jobs", f"this client has its {limit} jobs queued") from None
        except KeyReused:
            raise ApiError(
                422, "idempotency_key_reused", "this idempotency key was used with another body"
            ) from None
        return JobCreated(job_id=job_id, token=None if duplicate else token, duplicate=duplicate)

    async def _job(self, job_id: str, token: str | None) -> dict:
        if not valid_job_id(job_id):
            raise not_found("job")  # never reaches Redis: `key:y` names no other key
        record = await asyncio.to_thread(self.jobs.get, job_id)
        if record is None:
            raise not_found("job")
        if not token_matches(record, token):
            raise ApiError(403, "wrong_token", "wrong or missing job token")
        return record

    def _result_url(self, request: Request, job_id: str, key: str) -> str:
        """S3: a presigned URL; a local store: this service's video.mp4 route (token-checked)."""
        if isinstance(self.videos, LocalStore):
            return f"{str(request.base_url).rstrip('/')}/v1/jobs/{job_id}/video.mp4"
        return self.videos.url(key)

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=ERRORS)
    async def job_status(
        self, job_id: str, request: Request, authorization: str | None = Header(None)
    ) -> JobStatus:
        record = await self._job(job_id, bearer(authorization))
        finished = record["state"] == "done"
        done, total, fps = int(record["frames_done"]), int(record["frames_total"]), float(record["fps"])
        running = record["state"] == "running" and fps > 0
        return JobStatus(
            job_id=job_id,
            state=record["state"],
            frames_done=done,
            frames_total=total,
            fps=fps,
            eta_s=(total - done) / fps if running else None,
            attempts=int(record["attempts"]),
            error=record.get("error"),
            result_url=self._result_url(request, job_id, record["key"]) if finished else None,
        )

    @app.get("/v1/jobs/{job_id}/video.mp4", responses={**ERRORS, 206: {}, 416: {}})
    async def job_video(
        self,
        job_id: str,
        authorization: str | None = Header(None),
        token: str | None = Query(None, description="the job's token, for links (else the header)"),
    ) -> Response:
        """A finished job's MP4: from a local store with range requests; from S3 a redirect to a
        presigned URL."""
        record = await self._job(job_id, bearer(authorization) or token)
        if record["state"] != "done":
            raise ApiError(409, "job_not_done", f"the job is {record['state']}: no video yet")
        if not isinstance(self.videos, LocalStore):
            return RedirectResponse(self.videos.url(record["key"]), status_code=307)
        path = self.videos.path(record["key"])
        if not path.is_file():
            raise ApiError(404, "video_gone", "the job's video is no longer stored")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.delete("/v1/jobs/{job_id}", status_code=202, response_model=JobCancelled, responses=ERRORS)
    async def cancel_job(self, job_id: str, authorization: str | None = Header(None)) -> JobCancelled:
        await self._job(job_id, bearer(authorization))
        return JobCancelled(cancelled=await asyncio.to_thread(self.jobs.cancel, job_id))

    # -- admin -------------------------------------------------------------------------------------
    @app.get("/v1/admin/replicas", response_model=ReplicasView)
    async def replicas(self) -> ReplicasView:
        """Generator replicas (what each published in the last few seconds: load, capacity, its live
        sessions, its job, FPS) and the job queue's depth. Behind X-API-Key when keys are configured."""
        replicas = await self.store.replicas()
        return ReplicasView(
            replicas=replicas,
            sessions=sum(len(r.get("sessions", [])) for r in replicas),
            capacity=sum(r.get("capacity", 0) for r in replicas),
            jobs_queued=max((r.get("jobs_queued", 0) for r in replicas), default=0),
        )
