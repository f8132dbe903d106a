"""The jobs API's bodies (pydantic; validated at submit so a bad schedule is a 422 naming its entry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from longlive_core.schedule import PromptChange, ScheduleError, validate_schedule

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
