"""Problem bodies: every refusal answers `{"detail": ..., "code": ...}`, `code` machine-readable.

Routes raise `ApiError`; `install` (security.py) turns it, Starlette's own HTTP errors (an unknown path,
a wrong method) and validation errors into the same shape.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

# Starlette's own refusals (no route of ours raised them): their codes.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """extra: more fields of the problem body (e.g. the oldest frame a resume can ask for)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str | list[dict],
        headers: dict[str, str] | None = None,
        **extra: object,
    ):
        super().__init__(code)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers, extra


def problem(status: int, code: str, detail: str | list, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code, **extra}, status, headers)


def not_found(kind: str) -> ApiError:
    """The id names nothing (also a malformed one: it never reached Redis). The id is not echoed."""
    return ApiError(404, f"{kind}_not_found", f"no such {kind}")
