"""Job submission on the real service refuses callback URLs that name a non-public target, in any
spelling (422 with a problem body), and queues nothing for them; a public one is accepted."""

from __future__ import annotations

import httpx
import redis

from jobs.queue import JOB
from tests.test_callbacks import LOOPBACK, OTHER_SCHEMES, REFUSED_HTTP

BODY = {"schedule": [{"at": 0, "prompt": "a red robot in a rainy city"}], "seconds": 1}


def submit(base: str, callback_url: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/jobs", json={**BODY, "callback_url": callback_url}, timeout=30)


def jobs_recorded(redis_url: str) -> int:
    return sum(1 for _ in redis.Redis.from_url(redis_url).scan_iter(JOB.format("*"), count=1000))


def test_every_refused_callback_spelling_is_a_422_and_queues_nothing(service):
    base, before = service["base"], jobs_recorded(service["redis_url"])
    for url in REFUSED_HTTP + LOOPBACK:  # the fixture allows no non-public target
        response = submit(base, url)
        assert response.status_code == 422, (url, response.text)
        body = response.json()
        assert body["code"] == "callback_not_allowed" and body["detail"][0]["loc"] == ["body", "callback_url"]
    for url in OTHER_SCHEMES:
        response = submit(base, url)
        assert response.status_code == 422 and response.json()["code"] == "invalid_request", url
    assert jobs_recorded(service["redis_url"]) == before
    accepted = submit(base, "https://example.com/hook")  # public: accepted (its callback fails, logged)
    assert accepted.status_code == 201, accepted.text
    httpx.delete(
        f"{base}/v1/jobs/{accepted.json()['job_id']}",
        headers={"Authorization": f"Bearer {accepted.json()['token']}"},
    )
