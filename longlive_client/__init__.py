"""longlive_client: the Python client of the longlive service's public HTTP API (httpx, PyAV; no torch).

    from longlive_client import Client

    with Client("http://127.0.0.1:8000") as client, client.sessions.create("a red robot") as session:
        for frame in session.frames():  # decoded RGB frames, with their index and prompt
            ...

The request and response models (`longlive_client.schemas`) are the service's own.
"""

from __future__ import annotations

from .aio import AsyncClient, AsyncJob, AsyncLiveSession
from .client import Client, Job, LiveSession
from .errors import (
    ApiError,
    FramesGone,
    InvalidRequest,
    JobFailed,
    JobNotDone,
    JobNotFound,
    JobTokenLost,
    LongliveError,
    NotFound,
    ServiceFull,
    ServiceUnreachable,
    SessionEnded,
    SessionNotFound,
    TooManyRequests,
    Unauthorized,
)
from .http import Retries
from .video import Frame

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncJob",
    "AsyncLiveSession",
    "Client",
    "Frame",
    "FramesGone",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "JobNotDone",
    "JobNotFound",
    "JobTokenLost",
    "LiveSession",
    "LongliveError",
    "NotFound",
    "Retries",
    "ServiceFull",
    "ServiceUnreachable",
    "SessionEnded",
    "SessionNotFound",
    "TooManyRequests",
    "Unauthorized",
]
