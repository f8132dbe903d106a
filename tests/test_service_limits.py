"""The operator's limits (ServiceConfig) tighten the API's hard caps; the ingress answers 422 with them.
Quotas and the rate limiter's settings: tests/test_abuse_limits.py, tests/test_serve_quotas.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.config import ServiceConfig


def test_defaults_accept_what_the_schemas_accept():
    config = ServiceConfig()
    assert config.limit_errors(["x" * 2000], 3600) == []
    assert config.limit_errors(["a"] * 500, 3600, "job") == []


def test_tighter_limits_name_the_field_that_breaks_them():
    config = ServiceConfig(
        max_prompt_chars=10, max_session_seconds=60, max_job_seconds=240, max_schedule_entries=2
    )
    assert config.limit_errors(["0123456789"], 60) == []
    assert config.limit_errors(["01234567890"], 61) == [
        {"loc": ["body", "prompt"], "msg": "at most 10 characters"},
        {"loc": ["body", "max_seconds"], "msg": "at most 60 s"},
    ]
    assert config.limit_errors(["a", "b"], 240, "job") == []
    assert config.limit_errors(["a", "b", "c"], 241, "job") == [
        {"loc": ["body", "seconds"], "msg": "at most 240 s"},
        {"loc": ["body", "schedule"], "msg": "at most 2 entries"},
    ]


def test_quota_defaults_and_the_proxy_setting_that_matches_trust_forwarded_for():
    config = ServiceConfig()
    assert (config.max_sessions_per_client, config.max_queued_jobs_per_client, config.max_queued_jobs) == (
        2,
        10,
        1000,
    )
    assert config.forwarded_allow_ips == ""  # uvicorn in Ray's proxy then believes no peer's header
    assert ServiceConfig(trust_forwarded_for=True).forwarded_allow_ips == "*"
    with pytest.raises(ValidationError):
        ServiceConfig(max_queued_jobs=0)
