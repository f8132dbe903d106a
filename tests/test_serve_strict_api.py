"""The strict API on the real service (tests/conftest.py `service`): unknown fields, prompts for unknown or
ended sessions, crafted ids, problem bodies with a `code`, wall-clock times, a bounded /readyz.
Each refusal must leave nothing behind in Redis."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis

from tests.service_fixture import FOREST, RED, auth, created, status, wait_ended

CRAFTED = ("x:events", "x:checkpoint", "key:y", "a" * 21 + ":")


def problem(response: httpx.Response, status_code: int, code: str) -> dict:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["code"] == code and body["detail"], body
    return body


def keys(redis_url: str) -> set[str]:
    return set(redis.Redis.from_url(redis_url, decode_responses=True).keys("*"))


def test_unknown_fields_are_refused_with_a_422_that_names_them(service):
    base = service["base"]
    session = created(base, max_seconds=1)
    before = keys(service["redis_url"])
    for url, body, field, headers in (
        (f"{base}/v1/sessions", {"promt": RED}, "promt", {}),
        (f"{base}/v1/sessions", {"prompt": RED, "max_second": 5}, "max_second", {}),
        (
            f"{base}/v1/sessions/{session['session_id']}/prompts",
            {"prompt": FOREST, "at": 3},
            "at",
            auth(session["token"]),
        ),
        (f"{base}/v1/jobs", {"schedule": [{"at": 0, "prompt": RED}], "seconds": 1, "sed": 1}, "sed", {}),
        (f"{base}/v1/jobs", {"schedule": [{"at": 0, "prompt": RED, "x": 1}], "seconds": 1}, "x", {}),
    ):
        body = problem(httpx.post(url, json=body, headers=headers, timeout=30), 422, "invalid_request")
        named = [e for e in body["detail"] if e["loc"][-1] == field]
        assert len(named) == 1 and "extra" in named[0]["msg"].lower(), body
    # Nothing was created: no session, no job, no event (the live session's own checkpoint aside).
    new = keys(service["redis_url"]) - before
    assert {k for k in new if not k.startswith("ratelimit:") and session["session_id"] not in k} == set()


def test_prompts_for_unknown_or_ended_sessions_are_refused_and_write_nothing(service):
    base, redis_url = service["base"], service["redis_url"]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deleted = created(base, max_seconds=30)
    on_its_own = created(base, max_seconds=1)  # ends after 1 s of video
    unknown = httpx.post(
        f"{base}/v1/sessions/{'A' * 22}/prompts", json={"prompt": FOREST}, headers=auth("t"), timeout=30
    )
    problem(unknown, 404, "session_not_found")

    url = f"{base}/v1/sessions/{deleted['session_id']}"
    assert httpx.delete(url, headers=auth(deleted["token"]), timeout=30).status_code == 204
    wait_ended(base, on_its_own)
    # The replica marks a session that ended on its own within its Redis thread's period.
    deadline = time.monotonic() + 10
    while client.hget(f"session:{on_its_own['session_id']}", "ended") is None:
        assert time.monotonic() < deadline, "a session that ended on its own was not marked ended"
        time.sleep(0.02)
    for session in (deleted, on_its_own):
        events = f"session:{session['session_id']}:events"
        before = client.xlen(events)
        refused = httpx.post(
            f"{base}/v1/sessions/{session['session_id']}/prompts",
            json={"prompt": FOREST},
            headers=auth(session["token"]),
            timeout=30,
        )
        problem(refused, 409, "session_ended")
        assert client.xlen(events) == before  # nothing written
    assert FOREST not in [p["prompt"] for p in status(base, on_its_own)["prompts"]]


def test_crafted_ids_answer_404_on_every_route_and_touch_no_other_key(service):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    base, redis_url = service["base"], service["redis_url"]
    session = created(base, max_seconds=1)
    sid, token = session["session_id"], session["token"]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    wait_ended(base, session)  # its events stream and (deleted) checkpoint exist: what a crafted id aims at
    job = httpx.post(
        f"{base}/v1/jobs", json={"schedule": [{"at": 0, "prompt": RED}], "seconds": 1, "idempotency_key": "y"}
    ).json()
    # Rate counters, and the queued-job counters a worker's claim of that job changes meanwhile, move on
    # their own: every other key must stay as it was.
    moving = ("ratelimit:", "jobs:queued")
    before = {k: client.type(k) for k in keys(redis_url) if not k.startswith(moving)}
    for crafted in (*CRAFTED, f"{sid}:events", f"{sid}:checkpoint"):
        session_url, job_url = f"{base}/v1/sessions/{crafted}", f"{base}/v1/jobs/{crafted}"
        for method, url, body in (
            ("GET", session_url, None),
            ("DELETE", session_url, None),
            ("POST", f"{session_url}/prompts", {"prompt": FOREST}),
            ("GET", f"{session_url}/video.mp4", None),
            ("GET", job_url, None),
            ("DELETE", job_url, None),
            ("GET", f"{job_url}/video.mp4", None),
        ):
            response = httpx.request(method, url, json=body, headers=auth(token), timeout=30)
            problem(response, 404, "job_not_found" if "/jobs/" in url else "session_not_found")
        ws_url = f"{base.replace('http', 'ws', 1)}/v1/sessions/{crafted}/stream?token={token}"
        with pytest.raises(InvalidStatus, match="403"):  # closed before the handshake: refused
            connect(ws_url, open_timeout=30).close()
    after = {k: client.type(k) for k in keys(redis_url) if not k.startswith(moving)}
    assert after == before  # no key made, removed or retyped
    assert httpx.get(f"{base}/v1/jobs/{job['job_id']}", headers=auth(job["token"])).status_code == 200


def test_times_are_wall_clock_iso_8601_utc_and_every_applied_prompt_has_one(service):
    base = service["base"]
    started = datetime.now(UTC)
    session = created(base, max_seconds=2)
    url = f"{base}/v1/sessions/{session['session_id']}/prompts"
    assert httpx.post(url, json={"prompt": FOREST}, headers=auth(session["token"])).status_code == 202
    wait_ended(base, session)
    timeline = status(base, session)["prompts"]
    assert [p["prompt"] for p in timeline] == [RED, FOREST]
    for entry in timeline:
        posted = datetime.fromisoformat(entry["posted_at"])
        assert posted.utcoffset() == timedelta(0)
        assert started - timedelta(seconds=5) <= posted <= datetime.now(UTC)
        if entry["block"] is not None and entry["block"] >= 0:
            applied = datetime.fromisoformat(entry["applied_at"])
            assert applied.utcoffset() == timedelta(0) and posted <= applied <= datetime.now(UTC), entry
    assert timeline[0]["applied_at"] is not None  # the first prompt's too
    admin = httpx.get(f"{base}/v1/admin/replicas", timeout=30).json()
    for replica in admin["replicas"]:
        updated = datetime.fromisoformat(replica["updated_at"])
        assert updated.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - updated) < timedelta(seconds=30)


def test_readyz_answers_within_a_second(service):
    for _ in range(3):
        started = time.monotonic()
        ready = httpx.get(f"{service['base']}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert time.monotonic() - started < 1.0
    unknown_route = httpx.get(f"{service['base']}/v1/nothing", timeout=30)
    problem(unknown_route, 404, "not_found")
