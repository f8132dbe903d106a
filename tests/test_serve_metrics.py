"""Metrics, the admin endpoint and `longlive status` on the running service (tests/service_fixture.py):
after a short session with a prompt switch, a job and a Redis blip, Ray's Prometheus endpoint shows
every longlive_* metric (deployments/metrics.py) with a non-zero value."""

from __future__ import annotations

import re
import time

import httpx
from ray import serve

from deployments.cli import main as cli
from tests.service_fixture import FOREST, auth, created

GAUGES = ("replica_fps", "sessions_live", "session_capacity", "jobs_running", "jobs_queued")
HISTOGRAMS = ("session_fps", "time_to_first_frame_seconds", "prompt_switch_seconds", "job_duration_seconds")
COUNTERS = ("frames_total", "errors_total")
SAMPLE = re.compile(r"^ray_longlive_(\w+?)(?:_total)?(_count|_sum|_bucket)?(\{[^}]*\})? ([0-9.e+-]+)$", re.M)


def maxima(text: str) -> dict[str, float]:
    """Largest value of each longlive metric (histograms: their count) in Prometheus text."""
    found: dict[str, float] = {}
    for name, part, _, value in SAMPLE.findall(text):
        if part in ("_sum", "_bucket"):
            continue
        found[name] = max(found.get(name, 0.0), float(value))
    return found


def wanted() -> set[str]:
    return {*GAUGES, *HISTOGRAMS, *(c.removesuffix("_total") for c in COUNTERS)}


def test_metrics_admin_endpoint_and_status_after_a_short_session(service, capsys):
    base, redis = service["base"], service["redis"]
    seen: dict[str, float] = {}

    def scrape() -> None:
        for name, value in maxima(httpx.get(service["metrics"], timeout=10).text).items():
            seen[name] = max(seen.get(name, 0.0), value)

    # 1. A session: its first block, a prompt switch, blocks under the new prompt.
    # 60 s of video, 15 s at the test's 4x playback: alive across more than one metrics export (~10 s).
    session = created(base, max_seconds=60)
    sid = session["session_id"]
    with httpx.stream("GET", session["stream_url"], headers=auth(session["token"]), timeout=60) as response:
        for i, _ in enumerate(response.iter_raw()):
            if i == 1:
                url = f"{base}/v1/sessions/{sid}/prompts"
                posted = httpx.post(url, json={"prompt": FOREST}, headers=auth(session["token"]))
                assert posted.status_code == 202
            if i == 3:
                # 2. While it runs: the admin view lists it on its replica; jobs queue up behind the
                # workers (one job per replica at a time), then are cancelled.
                # (Replicas publish what they hold every second: the view may lag the session's start.)
                deadline = time.monotonic() + 10
                while True:
                    admin = httpx.get(f"{base}/v1/admin/replicas", timeout=10).json()
                    holding = [r for r in admin["replicas"] if sid in r["sessions"]]
                    if holding or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                (replica,) = holding
                assert replica["replica"] == session["replica"] and replica["capacity"] >= 1
                assert cli(["status", "--url", base]) == 0
                assert sid in capsys.readouterr().out
                body = {"schedule": [{"at": 0, "prompt": FOREST}], "seconds": 240}  # busy while we look
                # More jobs than workers (one per replica), also if a replica still warming up (e.g. the
                # replacement of one killed by an earlier test) joins while we look.
                count = 2 * len(admin["replicas"]) + 2
                jobs = [httpx.post(f"{base}/v1/jobs", json=body, timeout=30).json() for _ in range(count)]
                deadline = time.monotonic() + 45  # the metrics agent exports every ~10 s; CI is slow
                busy = ("jobs_queued", "jobs_running", "sessions_live")
                while not all(seen.get(n) for n in busy):
                    assert time.monotonic() < deadline, f"zero: {[n for n in busy if not seen.get(n)]}"
                    scrape()
                    time.sleep(0.5)
                for job in jobs:
                    url = f"{base}/v1/jobs/{job['job_id']}"
                    assert httpx.delete(url, headers=auth(job["token"]), timeout=30).status_code == 202
    # 3. Redis away for a moment: the replicas count it and go on.
    redis.stop(kill=True)
    generator = serve.get_deployment_handle("Generator", "longlive")
    deadline = time.monotonic() + 30
    while generator.info.remote().result(timeout_s=30)["redis"]:  # until a replica has noticed
        assert time.monotonic() < deadline, "no replica noticed Redis going away"
        time.sleep(0.05)
    redis.start()

    deadline = time.monotonic() + 45  # the metrics agent exports every ~10 s
    while not all(seen.get(name, 0) > 0 for name in wanted()):
        missing = sorted(wanted() - {name for name, value in seen.items() if value})
        assert time.monotonic() < deadline, f"missing or zero: {missing}"
        scrape()
        time.sleep(0.5)


def test_status_reports_a_service_that_does_not_answer(capsys):
    from tests.serving import free_port

    assert cli(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "does not answer" in capsys.readouterr().err
