"""The session API's request and response bodies (pydantic; OpenAPI at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from longlive_core.schedule import MAX_PROMPT_CHARS, PromptText

__all__ = ["MAX_PROMPT_CHARS"]  # the session API's prompt bound is the library's (one rule everywhere)


class CreateSession(BaseModel):
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


class PostPrompt(BaseModel):
    prompt: PromptText


class PromptPosted(BaseModel):
    event_id: str


class TimelineEntry(BaseModel):
    prompt: str
    block: int | None = Field(description="block it took effect at; null until applied, -1 if superseded")
    posted_at: float
    applied_at: float | None


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


class Problem(BaseModel):
    detail: str
