"""The HTTP API's request and response bodies (pydantic; OpenAPI at /docs): the sessions', the jobs' and
the problem body. The service (deployments/ingress.py, jobs/) and the client validate with these very
models, so this module imports neither torch nor the server's packages.

Requests forbid unknown fields (a misspelled one is a 422 naming it); every time in a response is ISO 8601
UTC; a job's schedule is validated at submit, so a bad one is a 422 naming its entry."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, HttpUrl, model_validator

from longlive_core.schedule import (
    PromptChange,
    PromptText,
    ScheduleError,
    validate_schedule,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSession(Strict):
    prompt: PromptText = Field(description="the prompt the video starts with")
    max_seconds: float | None = Field(
        None, gt=0, le=3600, allow_inf_nan=False, description="end the session after this much video"
    )
    seed: int = Field(0, ge=0, lt=2**63)


class SessionCreated(BaseModel):
    session_id: str
    token: str = Field(description="send as 'Authorization: Bearer <token>' (or ?token= on WebSocket)")
    stream_url: str = Field(description="chunked fragmented MP4 over HTTP")
    websocket_url: str = Field(description="fMP4 chunks by default, ?format=jpeg for JPEG frames")
    replica: str


class PostPrompt(Strict):
    prompt: PromptText


class PromptPosted(BaseModel):
    event_id: str


class TimelineEntry(BaseModel):
    prompt: str
    block: int | None = Field(description="block it took effect at; null until applied, -1 if superseded")
    posted_at: AwareDatetime = Field(description="when the replica took the prompt in (UTC)")
    applied_at: AwareDatetime | None = Field(description="when its block began (UTC); null until applied")


class Replacement(BaseModel):
    """Blocks remade under a prompt that came in after they were made but before any viewer was sent them
    (instant steering): frames already streamed are never replaced."""

    block: int = Field(description="the first remade block")
    first_frame: int = Field(description="its first video frame")
    frames: int = Field(description="video frames made under the old prompt and discarded unseen")
    prompt: str = Field(description="the prompt the blocks were remade under")
    at: AwareDatetime = Field(description="when the remake began (UTC)")


class SessionStatus(BaseModel):
    session_id: str
    state: Literal["queued", "live", "ended", "error"]
    replica: str
    blocks_done: int
    frames_done: int
    buffered_blocks: int
    dropped_blocks: int
    seed: int
    error: str | None
    prompts: list[TimelineEntry]
    replacements: list[Replacement] = Field(
        default_factory=list, description="remade blocks, oldest first (the timeline names their prompts)"
    )


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    detail: str | list[FieldError] = Field(description="what was wrong; per field for a 422")
    code: str = Field(description="machine-readable: session_not_found, session_ended, invalid_request, ...")
    request_id: str | None = Field(None, description="on a 500: the id the replica's log names")
    oldest_frame: int | None = Field(None, description="on a 410: the oldest frame a resume can ask for")


class Ready(BaseModel):
    status: Literal["ready"]
    replica: str
    load: int
    capacity: int
    redis: bool


class ReplicaInfo(BaseModel):
    """What a Generator replica published last (deployments/generator.py)."""

    replica: str
    load: int
    capacity: int
    sessions: list[str]
    job: str | None
    jobs_queued: int
    fps: float
    redis: bool
    updated_at: AwareDatetime = Field(description="when it published this (UTC)")


class ReplicasView(BaseModel):
    replicas: list[ReplicaInfo]
    sessions: int
    capacity: int
    jobs_queued: int


# -- jobs ----------------------------------------------------------------------------------------------
MAX_SECONDS = 3600.0
MAX_ENTRIES = 500  # schedule entries; the ingress's max_body_bytes bounds the body as a whole
IDEMPOTENCY_KEY = r"^[A-Za-z0-9._:-]+$"  # UUIDs, "render-1", "user:42.v2"; it becomes part of a Redis key


class SubmitJob(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled field is a 422 naming it

    schedule: list[PromptChange] = Field(min_length=1, max_length=MAX_ENTRIES)
    seconds: float = Field(
        gt=0, le=MAX_SECONDS, allow_inf_nan=False, description="video length; 240 s and beyond"
    )
    seed: int = Field(0, ge=0, lt=2**63)
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200, pattern=IDEMPOTENCY_KEY, description="letters, digits, . _ : -"
    )
    callback_url: HttpUrl | None = None

    @model_validator(mode="after")
    def _schedule_fits(self) -> SubmitJob:
        try:
            validate_schedule(
                self.schedule, self.seconds, [f"schedule[{i}]" for i in range(len(self.schedule))]
            )
        except ScheduleError as err:
            raise ValueError(str(err)) from None
        return self


class JobCreated(BaseModel):
    job_id: str
    token: str | None = Field(None, description="only on the first submission of an idempotency key")
    duplicate: bool = False


class JobStatus(BaseModel):
    job_id: str
    state: Literal["queued", "running", "uploading", "done", "failed", "cancelled"]
    frames_done: int
    frames_total: int
    fps: float
    eta_s: float | None
    attempts: int
    error: str | None
    result_url: str | None = Field(
        None, description="once done: a presigned S3 URL, or GET /v1/jobs/{id}/video.mp4 of a local store"
    )


class JobCancelled(BaseModel):
    cancelled: bool = Field(description="false: the job had ended already")
