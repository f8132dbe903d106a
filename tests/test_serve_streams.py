"""Streams of one session on the real service: every viewer gets every frame, a resume starts at exactly
its frame or is told the oldest frame kept, and a session's open streams are bounded."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np

from tests.service_fixture import auth, created, decode, status

RING_BLOCKS = 16  # ServiceConfig.buffer_blocks, the fixture's default


def read_all(url: str, token: str, into: dict, key: str) -> None:
    with httpx.stream("GET", url, headers=auth(token), timeout=120) as response:
        into[f"{key}_status"] = response.status_code
        into[key] = b"".join(response.iter_bytes())


def test_two_viewers_resume_exactly_and_streams_are_bounded(service):
    base = service["base"]
    # 81 blocks, 969 frames: at the fixture's 4x pacing it runs ~15 s, so the first viewer is still
    # reading when the third stream is asked for.
    session = created(base, max_seconds=60, seed=3)
    url, token = session["stream_url"], session["token"]
    got: dict = {}
    first = threading.Thread(target=read_all, args=(url, token, got, "first"))
    first.start()
    deadline = time.monotonic() + 120
    while status(base, session)["frames_done"] < (RING_BLOCKS + 4) * 12:  # the ring has moved past block 0
        assert time.monotonic() < deadline, "the session did not get going"
        time.sleep(0.05)

    gone = httpx.get(f"{url}?from_frame=0", headers=auth(token), timeout=60)
    assert gone.status_code == 410 and gone.json()["code"] == "frames_gone"
    oldest = gone.json()["oldest_frame"]
    assert oldest > 0
    # Inside a block, and 4 blocks from the ring's tail: the oldest block leaves the ring every 0.19 s at
    # the fixture's pacing, so the tail itself may be gone by the time the stream reads it.
    resume_at = oldest + 4 * 12 + 5
    second = threading.Thread(target=read_all, args=(f"{url}?from_frame={resume_at}", token, got, "second"))
    second.start()
    while "second_status" not in got:
        assert time.monotonic() < deadline, "the second stream never answered"
        time.sleep(0.02)
    third = httpx.get(f"{url}?from_frame={resume_at}", headers=auth(token), timeout=60)
    assert status(base, session)["state"] == "live"  # the other two streams were open all along
    assert third.status_code == 429 and third.json()["code"] == "too_many_streams"
    assert "Retry-After" in third.headers
    first.join()
    second.join()

    everything, resumed = decode(got["first"]), decode(got["second"])
    assert got["first_status"] == got["second_status"] == 200
    assert len(everything) == 969  # the first viewer lost nothing to the second
    assert len(resumed) == 969 - resume_at  # and the second got every frame from its own on
    diff = np.abs(resumed.astype(int) - everything[resume_at:].astype(int)).mean()
    shifted = np.abs(resumed[:-12].astype(int) - everything[resume_at + 12 :].astype(int)).mean()
    assert diff < 3 and shifted > 3 * diff  # control: a block off is far off
