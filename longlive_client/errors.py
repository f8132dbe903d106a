"""The service's refusals as typed exceptions: a problem body's `code` (or, for a code this client does not
know, its HTTP status) picks the class. Each message names what the call was about (`what`: the session
or the job), so an expired or wrong token says which one it was for."""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from .schemas import Problem


class LongliveError(Exception):
    """Everything this client raises."""


class ServiceUnreachable(LongliveError):
    """Nothing at the URL answered (refused, timed out, no such host), after the retries."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"no longlive service at {url}: {reason}")
        self.url, self.reason = url, reason


class ApiError(LongliveError):
    """A refusal: `status`, the problem's `code` and `detail`; `retry_after` in seconds where it said."""

    def __init__(self, status: int, problem: Problem, what: str, retry_after: float | None = None):
        detail = problem.detail
        if not isinstance(detail, str):
            detail = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in detail)
        super().__init__(f"{what}: {detail} ({status} {problem.code})")
        self.status, self.code, self.detail, self.problem = status, problem.code, detail, problem
        self.retry_after = retry_after


class InvalidRequest(ApiError):
    """422 (a bad body or header, a bad schedule), 400, 413."""


class Unauthorized(ApiError):
    """401 (the service's API key is missing or wrong) or 403 (the session's or the job's token is)."""


class NotFound(ApiError):
    """404: the id names nothing (never made, expired, or malformed)."""


class SessionNotFound(NotFound):
    """404 for a session: unknown, expired, or no longer running."""


class JobNotFound(NotFound):
    """404 for a job, or for its video once no longer stored."""


class SessionEnded(ApiError):
    """409: the session has ended; it takes no more prompts."""


class JobNotDone(ApiError):
    """409: the job has no video (yet)."""


class FramesGone(ApiError):
    """410: a resume asked for a frame the session no longer keeps; `oldest_frame` is the oldest kept."""

    @property
    def oldest_frame(self) -> int | None:
        return self.problem.oldest_frame


class TooManyRequests(ApiError):
    """429: over the rate limit or a quota (sessions, queued jobs, streams per session); see retry_after."""


class ServiceFull(ApiError):
    """503: every replica is at capacity, the job queue is full, or a part is away; see retry_after."""


class JobTokenLost(LongliveError):
    """A retried submission found its first attempt's job, whose token only that attempt's lost reply
    carried (the service hands a job's token out once)."""

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} was submitted, but the reply with its token was lost")
        self.job_id = job_id


class JobFailed(LongliveError):
    """The job ended as failed or cancelled, so it has no video."""


BY_CODE: dict[str, type[ApiError]] = {
    "session_not_found": SessionNotFound,
    "session_not_running": SessionNotFound,
    "job_not_found": JobNotFound,
    "video_gone": JobNotFound,
    "session_ended": SessionEnded,
    "job_not_done": JobNotDone,
    "frames_gone": FramesGone,
    "wrong_token": Unauthorized,
    "api_key_required": Unauthorized,
}
BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: ApiError,
    410: FramesGone,
    413: InvalidRequest,
    422: InvalidRequest,
    429: TooManyRequests,
    503: ServiceFull,
}


def retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (the service sends whole seconds), or None."""
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def api_error(response: httpx.Response, what: str) -> ApiError:
    """The typed exception for a refusal; a body that is no problem (a proxy's page) keeps its status."""
    try:
        problem = Problem.model_validate_json(response.content)
    except ValidationError:
        detail = response.text[:200] or response.reason_phrase
        problem = Problem(detail=detail, code=f"http_{response.status_code}")
    kind = BY_CODE.get(problem.code) or BY_STATUS.get(response.status_code, ApiError)
    return kind(response.status_code, problem, what, retry_after(response))
