"""Ingress: the session API on FastAPI (CPU). Parses, checks the token, calls the Generator's handle
with the session id (the router pins it to its replica), encodes; prompt events go to Redis only."""

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Header, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from jobs.schemas import JobCreated, JobStatus, SubmitJob
from longlive_core.schedule import frames_total

from .config import ServiceConfig
from .errors import ReplicaFull, SessionMoved, SessionNotHere
from .metrics import log, metrics
from .schemas import CreateSession, PostPrompt, Problem, PromptPosted, SessionCreated, SessionStatus
from .security import install
from .store import SessionStore, token_digest, token_matches
from .webpage import web_file

app = FastAPI(title="longlive", description="Real-time interactive long text-to-video (LongLive)")
guard = install(app)  # rate limit, API key, body size, error handlers (deployments/security.py)
ADMISSION_ATTEMPTS = 8
ADMISSION_BACKOFF_S = 0.1
FAILOVER_BACKOFF_S = 0.5
REPLICA_GONE = (RayActorError, ActorUnavailableError)  # its replica died or is being replaced
logger = logging.getLogger("longlive.ingress")
ERRORS = {code: {"model": Problem} for code in (401, 403, 404, 413, 429, 503)}


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
        self.store = SessionStore(self.config.redis_url)
        self.jobs = self.config.job_queue()
        self.videos = self.config.video_store()

    def _check_limits(self, prompts: list[str], seconds: float | None = None, kind: str = "session") -> None:
        if errors := self.config.limit_errors(prompts, seconds, kind):
            raise HTTPException(422, errors)

    def _session(self, session_id: str, stream: bool = False) -> DeploymentHandle:
        return self.generator.options(session_id=session_id, stream=stream)

    async def _call(self, session_id: str, method: str, *args):
        """A Generator call for the session; while its replica is gone, retried until the router has moved
        the session to a live replica (which restores it), for up to failover_timeout_s."""
        deadline = time.monotonic() + self.config.failover_timeout_s
        while True:
            try:
                return await getattr(self._session(session_id), method).remote(session_id, *args)
            except REPLICA_GONE:
                if time.monotonic() > deadline:
                    self.metrics.error("ingress", "failover_timeout")
                    raise HTTPException(
                        503, "the session's replica is gone and no other took it over"
                    ) from None
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
            except (*REPLICA_GONE, SessionMoved):
                deadline = deadline or time.monotonic() + self.config.failover_timeout_s
                if time.monotonic() > deadline:
                    self.metrics.error("ingress", "failover_timeout")
                    return
                self.log.warning(
                    "replica gone at frame %d, resuming elsewhere",
                    next_frame,
                    extra={"session_id": session_id},
                )
                await asyncio.sleep(FAILOVER_BACKOFF_S)
            except SessionNotHere:
                return

    async def _authorize(self, session_id: str, token: str | None) -> dict:
        record = await self.store.get(session_id)
        if record is None:
            raise HTTPException(404, f"no session {session_id}")
        if not token_matches(record, token):
            raise HTTPException(403, "wrong or missing session token")
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

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        # Generator replicas are only routed to once their constructor (load + warm-up) finished.
        try:
            await self.store.ping()
            info = await self.generator.info.remote()
        except Exception as err:  # noqa: BLE001 - readiness reports any failure as not ready
            return JSONResponse({"status": "not ready", "detail": type(err).__name__}, status_code=503)
        return JSONResponse({"status": "ready", **info})

    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated, responses=ERRORS)
    async def create(self, body: CreateSession, request: Request) -> SessionCreated:
        self._check_limits([body.prompt], body.max_seconds)
        # The router sends a new session to the least-loaded replica; if that one filled up meanwhile,
        # try again under a fresh id (the router then sees the updated loads).
        for _ in range(ADMISSION_ATTEMPTS):
            session_id, token = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
            await self.store.create(session_id, token, body.seed)
            try:
                result = await self._session(session_id).create.remote(
                    session_id, body.prompt, body.seed, body.max_seconds
                )
                break
            except ReplicaFull:
                await self.store.delete(session_id)
                await asyncio.sleep(ADMISSION_BACKOFF_S)
        else:
            self.metrics.error("ingress", "capacity")
            raise HTTPException(
                503, "every replica is at capacity", headers={"Retry-After": str(self.config.retry_after_s)}
            )
        base = str(request.base_url).rstrip("/")
        return SessionCreated(
            session_id=session_id,
            token=token,
            stream_url=f"{base}/v1/sessions/{session_id}/video.mp4",
            websocket_url=f"{base.replace('http', 'ws', 1)}/v1/sessions/{session_id}/stream",
            replica=result["replica"],
        )

    @app.get("/v1/sessions/{session_id}", response_model=SessionStatus, responses=ERRORS)
    async def status(self, session_id: str, authorization: str | None = Header(None)) -> dict:
        await self._authorize(session_id, bearer(authorization))
        return await self._running(session_id)

    async def _running(self, session_id: str) -> dict:
        try:
            return await self._call(session_id, "status")
        except SessionNotHere:
            raise HTTPException(404, f"session {session_id} is not running") from None

    @app.post(
        "/v1/sessions/{session_id}/prompts", status_code=202, response_model=PromptPosted, responses=ERRORS
    )
    async def post_prompt(
        self, session_id: str, body: PostPrompt, authorization: str | None = Header(None)
    ) -> PromptPosted:
        self._check_limits([body.prompt])
        await self._authorize(session_id, bearer(authorization))
        return PromptPosted(event_id=await self.store.post_prompt(session_id, body.prompt))

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
        session's first frame, so a resumed stream continues the old one's timeline)."""
        await self._authorize(session_id, bearer(authorization) or token)
        await self._running(session_id)
        return StreamingResponse(self._pieces(session_id, "mp4", from_frame), media_type="video/mp4")

    @app.websocket("/v1/sessions/{session_id}/stream")
    async def websocket(
        self,
        ws: WebSocket,
        session_id: str,
        token: str | None = None,
        format: str = "mp4",
        from_frame: int = 0,
    ):
        record = await self.store.get(session_id)
        valid = format in ("mp4", "jpeg") and from_frame >= 0
        if record is None or not token_matches(record, token) or not valid:
            await ws.close(code=4403 if record is not None else 4404)
            return
        await ws.accept()
        try:
            async for chunk in self._pieces(session_id, format, from_frame):
                await ws.send_bytes(chunk)
            await ws.close()
        except WebSocketDisconnect:
            pass

    # -- jobs --------------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, response_model=JobCreated, responses=ERRORS)
    async def submit_job(self, body: SubmitJob) -> JobCreated:
        self._check_limits([e.prompt for e in body.schedule], body.seconds, "job")
        token = secrets.token_urlsafe(24)
        job_id, duplicate = await asyncio.to_thread(
            self.jobs.submit, body, frames_total(body.seconds), token_digest(token)
        )
        return JobCreated(job_id=job_id, token=None if duplicate else token, duplicate=duplicate)

    async def _job(self, job_id: str, token: str | None) -> dict:
        record = await asyncio.to_thread(self.jobs.get, job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id}")
        if not token_matches(record, token):
            raise HTTPException(403, "wrong or missing job token")
        return record

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=ERRORS)
    async def job_status(self, job_id: str, authorization: str | None = Header(None)) -> JobStatus:
        record = await self._job(job_id, bearer(authorization))
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
            result_url=self.videos.url(record["key"]) if record["state"] == "done" else None,
        )

    @app.delete("/v1/jobs/{job_id}", status_code=202, responses=ERRORS)
    async def cancel_job(self, job_id: str, authorization: str | None = Header(None)) -> dict:
        await self._job(job_id, bearer(authorization))
        return {"cancelled": await asyncio.to_thread(self.jobs.cancel, job_id)}

    # -- admin -------------------------------------------------------------------------------------
    @app.get("/v1/admin/replicas")
    async def replicas(self) -> dict:
        """Generator replicas (what each published in the last few seconds: load, capacity, its live
        sessions, its job, FPS) and the job queue's depth. Behind X-API-Key when keys are configured."""
        replicas = await self.store.replicas()
        return {
            "replicas": replicas,
            "sessions": sum(len(r.get("sessions", [])) for r in replicas),
            "capacity": sum(r.get("capacity", 0) for r in replicas),
            "jobs_queued": max((r.get("jobs_queued", 0) for r in replicas), default=0),
        }
