"""A Redis that hangs rather than refusing (redis-server SIGSTOPped for 5 s), on the real service: what needs
Redis answers 503 with Retry-After within 2 s, live sessions keep streaming, and after SIGCONT no prompt
event and no job is lost."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.service_fixture import FOREST, RED, auth, created, status

HANG_S = 5.0
BOUND_S = 2.0  # the bound for a 503 while Redis hangs


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_a_hanging_redis_gives_quick_503s_streams_go_on_and_nothing_is_lost(service):
    base, redis = service["base"], service["redis"]
    session = created(base, max_seconds=120, seed=5)
    sid, headers = session["session_id"], auth(session["token"])
    received: list[float] = []  # arrival times of the stream's chunks
    stop = threading.Event()

    def watch() -> None:
        with httpx.stream("GET", session["stream_url"], headers=headers, timeout=120) as response:
            for _ in response.iter_raw():
                received.append(time.monotonic())
                if stop.is_set():
                    return

    viewer = threading.Thread(target=watch, daemon=True)
    viewer.start()
    wait_until(lambda: received, 60, "the stream did not start")
    job_body = {"schedule": [{"at": 0, "prompt": FOREST}], "seconds": 2}
    job = httpx.post(f"{base}/v1/jobs", json=job_body, timeout=30).json()
    prompt = httpx.post(f"{base}/v1/sessions/{sid}/prompts", json={"prompt": "before"}, headers=headers)
    assert prompt.status_code == 202

    redis.proc.send_signal(signal.SIGSTOP)
    try:
        hung_at = time.monotonic()
        calls = [
            ("POST", f"{base}/v1/sessions", {"prompt": RED}, {}),
            ("POST", f"{base}/v1/sessions/{sid}/prompts", {"prompt": "during"}, headers),
            ("GET", f"{base}/v1/sessions/{sid}", None, headers),
            ("POST", f"{base}/v1/jobs", job_body, {}),
            ("GET", f"{base}/v1/jobs/{job['job_id']}", None, auth(job["token"])),
        ]
        for method, url, body, call_headers in calls:
            started = time.monotonic()
            response = httpx.request(method, url, json=body, headers=call_headers, timeout=30)
            took = time.monotonic() - started
            assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1, response.text
            assert response.json()["code"] == "storage_unavailable" and took < BOUND_S, (url, took)
        started = time.monotonic()
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 503
        assert time.monotonic() - started < 1.0 + 0.2  # /readyz: 1 s, plus the loopback's trip
        # The live session streams on from the replica's memory: pieces arrive throughout the hang.
        time.sleep(max(0.0, hung_at + HANG_S - time.monotonic()))  # the hang itself is the condition
        during = [t - hung_at for t in received if hung_at < t <= hung_at + HANG_S]
        assert len(during) >= 4 and during[-1] > HANG_S - 2, f"the stream stalled while Redis hung: {during}"
    finally:
        redis.proc.send_signal(signal.SIGCONT)

    wait_until(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, 30, "not ready again")
    after = httpx.post(f"{base}/v1/sessions/{sid}/prompts", json={"prompt": "after"}, headers=headers)
    assert after.status_code == 202

    def applied() -> bool:
        timeline = {p["prompt"]: p["block"] for p in status(base, session)["prompts"]}
        return all(timeline.get(p) is not None for p in ("before", "after"))

    wait_until(applied, 60, "a prompt posted around the hang was lost")
    prompts = [p["prompt"] for p in status(base, session)["prompts"]]
    assert prompts == [RED, "before", "after"]  # "during" was refused (503), not half-written
    job_url = f"{base}/v1/jobs/{job['job_id']}"
    wait_until(
        lambda: httpx.get(job_url, headers=auth(job["token"]), timeout=30).json()["state"] == "done",
        120,
        "the job submitted before the hang did not finish",
    )
    stop.set()
    assert httpx.delete(f"{base}/v1/sessions/{sid}", headers=headers, timeout=30).status_code == 204
    viewer.join(60)
    assert not viewer.is_alive()
