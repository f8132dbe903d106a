"""Failover on the real service: a Generator replica killed mid-session, Redis restarted mid-session.

Runs after the other service tests (it kills a replica; Serve replaces it).
"""

from __future__ import annotations

import io
import threading
import time

import av
import httpx
import ray

from deployments.gone_replicas import GONE_FOR_S, GoneReplicas
from longlive_core.fmp4 import _boxes
from longlive_core.schedule import blocks_for_seconds, video_frames
from tests.service_fixture import auth, created, status
from tests.serving import wait_ready

SECONDS = 20
FRAMES = video_frames(blocks_for_seconds(SECONDS, 3) * 3)  # 321


def decode_times(data: bytes) -> list[int]:
    """The decoded frames' presentation times, in frames (16 fps)."""
    with av.open(io.BytesIO(data)) as container:
        return [round(f.pts * f.time_base * 16) for f in container.decode(video=0)]


def fragments(data: bytes) -> int:
    return sum(kind == b"moof" for kind, _, _ in _boxes(bytearray(data)))


def post(base: str, session: dict, prompt: str) -> httpx.Response:
    url = f"{base}/v1/sessions/{session['session_id']}/prompts"
    return httpx.post(url, json={"prompt": prompt}, headers=auth(session["token"]), timeout=30)


def wait_applied(base: str, session: dict, prompt: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = [p for p in status(base, session)["prompts"] if p["prompt"] == prompt]
        if entries and entries[-1]["block"] is not None:
            return entries[-1]["block"]
        time.sleep(0.1)
    raise AssertionError(f"{prompt!r} not applied within {timeout} s")


def kill_replica(replica_id: str) -> None:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica_id in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def test_a_replica_found_gone_stays_gone_for_a_while_then_counts_again():
    now = [0.0]
    gone = GoneReplicas(clock=lambda: now[0])
    gone.report("r1")
    now[0] = GONE_FOR_S / 2
    gone.report("r2")
    assert gone.recent() == {"r1", "r2"}
    now[0] = GONE_FOR_S + 1  # r1's report is old: Serve has dropped or replaced it by now
    assert gone.recent() == {"r2"}


def test_a_killed_replica_s_session_goes_on_elsewhere_without_a_gap_or_a_lost_prompt(service):
    base = service["base"]
    session = created(base, max_seconds=SECONDS, seed=3)
    owner = session["replica"]
    data = b""
    with httpx.stream("GET", session["stream_url"], headers=auth(session["token"]), timeout=120) as response:
        for chunk in response.iter_raw():
            data += chunk
            if fragments(data) == 3 and owner is not None:
                assert post(base, session, "before the failure").status_code == 202
                wait_applied(base, session, "before the failure")
                kill_replica(owner)
                owner_killed, owner = owner, None
                assert post(base, session, "while its replica is gone").status_code == 202
    # One HTTP response throughout: the ingress resumed the stream on the session's new replica.
    assert decode_times(data) == list(range(FRAMES))  # every frame once, in order: no gap, no repeat
    after = status(base, session)
    assert after["replica"] != owner_killed and after["state"] == "ended"
    timeline = [(p["prompt"], p["block"]) for p in after["prompts"]]
    assert [prompt for prompt, _ in timeline] == [
        "a red robot in a rainy city",
        "before the failure",
        "while its replica is gone",
    ]
    blocks = [block for _, block in timeline]
    assert blocks[0] == 0 < blocks[1] < blocks[2], after  # each took effect, in order


def test_restarting_redis_mid_session_loses_no_prompt(service):
    base, redis = service["base"], service["redis"]
    wait_ready(base, timeout=300)
    session = created(base, max_seconds=SECONDS, seed=4)
    received: list[bytes] = []
    streaming = threading.Event()

    def watch() -> None:
        with httpx.stream("GET", session["stream_url"], headers=auth(session["token"]), timeout=120) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                received.append(chunk)
                streaming.set()

    viewer = threading.Thread(target=watch)
    viewer.start()
    assert streaming.wait(60)  # the stream is open before Redis goes away
    assert post(base, session, "posted before the restart").status_code == 202
    redis.stop(kill=True)  # a crash: only what was fsynced survives (appendfsync always)
    try:
        refused = post(base, session, "posted while redis is down")
        assert refused.status_code == 503 and "retry-after" in refused.headers  # refused, not lost
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 503
        # The session goes on from memory meanwhile: more of its stream arrives.
        during, deadline = len(received), time.monotonic() + 30
        while len(received) < during + 2:
            assert time.monotonic() < deadline, "the stream stalled while Redis was down"
            time.sleep(0.05)
    finally:
        redis.start()
    wait_ready(base, timeout=60)
    wait_applied(base, session, "posted before the restart")  # read from the restored log
    assert post(base, session, "posted after the restart").status_code == 202
    viewer.join(120)
    assert not viewer.is_alive()
    assert decode_times(b"".join(received)) == list(range(FRAMES))
    timeline = [(p["prompt"], p["block"]) for p in status(base, session)["prompts"]]
    prompts = [prompt for prompt, _ in timeline]
    assert prompts == ["a red robot in a rainy city", "posted before the restart", "posted after the restart"]
    assert all(block is not None and block >= 0 for _, block in timeline), timeline
