"""The Python client (longlive_client) on the running service: frames across a cut connection, prompts
in the timeline, Idempotency-Key, typed exceptions, and a job run from an interpreter without torch."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from longlive_client import (
    Client,
    InvalidRequest,
    Retries,
    SessionEnded,
    SessionNotFound,
    Unauthorized,
)
from longlive_core.schedule import frames_total
from tests.service_fixture import FOREST, RED, auth, decode
from tests.test_torch_free_ingress import NO_TORCH

ROOT = Path(__file__).resolve().parents[1]
HARBOUR = "a quiet harbour at dawn"
QUICK = Retries(attempts=3, backoff_s=0.05, max_wait_s=0.5)


class CuttingProxy:
    """A TCP proxy to the service that cuts the first connection carrying a video request once `cut_after`
    bytes of its answer went through: a dropped connection in the middle of a fragment."""

    def __init__(self, target: str, cut_after: int):
        host, port = target.removeprefix("http://").split(":")
        self.target, self.cut_after, self.cuts = (host, int(port)), cut_after, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            state = {"video": False, "sent": 0}
            threading.Thread(target=self._pipe, args=(downstream, upstream, state, True), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(upstream, downstream, state, False), daemon=True
            ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, state: dict, request: bool) -> None:
        try:
            while data := source.recv(4096):
                if request and b"/video.mp4" in data and not self.cuts:
                    state["video"] = True
                if not request and state["video"]:
                    state["sent"] += len(data)
                    if state["sent"] > self.cut_after:
                        self.cuts += 1
                        state["video"] = False
                        sink.sendall(data[: len(data) // 2])
                        break
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):  # shutdown, not close alone: it wakes the other direction's recv
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:  # that direction shut it already
                pass
            end.close()

    def close(self) -> None:
        self.listener.close()


def test_frames_stay_contiguous_across_a_cut_connection_and_carry_the_timelines_prompts(service):
    proxy = CuttingProxy(service["base"], cut_after=12_000)  # init (~0.8 kB) + a block (~7 kB) + some
    seconds = 10
    try:
        with (
            Client(proxy.url, retries=QUICK) as client,
            client.sessions.create(RED, max_seconds=seconds) as live,
        ):
            frames = []
            for frame in live.frames():
                if not frames:
                    live.prompt(FOREST)
                frames.append(frame)
            status = live.status()
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert [f.index for f in frames] == list(range(frames_total(seconds)))
    assert frames[0].image.shape == (32, 48, 3)
    (red, forest) = status.prompts
    assert (red.prompt, red.block, forest.prompt) == (RED, 0, FOREST) and forest.block > 0, status
    first_forest = 9 + 12 * (forest.block - 1)
    assert {f.prompt for f in frames[:first_forest]} == {RED}
    assert {f.prompt for f in frames[first_forest:]} == {FOREST}
    assert status.replacements == []


def test_one_idempotency_key_posts_a_prompt_once(service):
    base = service["base"]
    with Client(base) as client, client.sessions.create(RED, max_seconds=60) as live:
        url, headers = f"{base}/v1/sessions/{live.id}/prompts", {**auth(live.token), "Idempotency-Key": "p-1"}
        first, again = (
            httpx.post(url, json={"prompt": HARBOUR}, headers=headers, timeout=30) for _ in range(2)
        )
        assert first.status_code == again.status_code == 202, first.text
        assert first.json() == again.json()
        other = httpx.post(url, json={"prompt": FOREST}, headers=headers, timeout=30)
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused", other.text
        live.prompt(FOREST)  # a key of its own: a new post
        deadline = time.monotonic() + 30  # the replica takes posts in from Redis at its next poll
        while (prompts := [entry.prompt for entry in live.status().prompts])[-1] != FOREST:
            assert time.monotonic() < deadline, prompts
            time.sleep(0.1)
        assert prompts == [RED, HARBOUR, FOREST]


def test_each_refusal_is_its_typed_exception(service):
    base = service["base"]
    with Client(base, retries=QUICK) as client:
        with pytest.raises(InvalidRequest, match="max_seconds"):
            client.sessions.create(RED, max_seconds=-1)
        live = client.sessions.create(RED, max_seconds=60)
        with pytest.raises(Unauthorized, match=f"session {live.id}: wrong or missing session token"):
            client.sessions.attach(live.id, "wrong").status()
        with pytest.raises(SessionNotFound):
            client.sessions.attach("A" * 22, live.token).prompt(FOREST)
        live.close()
        with pytest.raises(SessionEnded):
            live.prompt(FOREST)
        with pytest.raises(InvalidRequest, match="differ"):  # the header and the body's key disagree
            client.http.request(
                "POST",
                "/v1/jobs",
                "job",
                {"Idempotency-Key": "a"},
                json={"schedule": [{"at": 0, "prompt": RED}], "seconds": 1, "idempotency_key": "b"},
            )


JOB_WITHOUT_TORCH = """
from longlive_client import Client

with Client({base!r}) as client:
    schedule = [{{"at": 0, "prompt": "a red robot"}}, {{"at": 1, "prompt": "a forest"}}]
    job = client.jobs.submit(schedule, seconds=2)
    status = job.wait(timeout_s=120)
    job.download({out!r})
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print(status.frames_total)
"""


def test_a_job_runs_to_its_video_from_an_interpreter_without_torch(service, tmp_path):
    out = tmp_path / "job.mp4"
    code = NO_TORCH.split("for module in")[0] + JOB_WITHOUT_TORCH.format(base=service["base"], out=str(out))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) == frames_total(2) == len(decode(out.read_bytes()))
