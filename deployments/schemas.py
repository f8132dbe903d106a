"""The session API's request and response bodies (pydantic; OpenAPI at /docs). Requests forbid unknown
fields (a misspelled one is a 422 naming it); every time in a response is ISO 8601 UTC."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from longlive_core.schedule import MAX_PROMPT_CHARS, PromptText

__all__ = ["MAX_PROMPT_CHARS"]  # the session API's prompt bound is the library's (one rule everywhere)


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
