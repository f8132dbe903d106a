"""The client's command line and example against `longlive serve` (the embedded default; tests/
local_serve.py): `longlive live` typed at through a pseudo-terminal, `longlive job`, bad input, and
examples/client.py as documented."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import av
import pexpect

from longlive_core.schedule import frames_total
from tests.local_serve import ROOT

RED, FOREST, HARBOUR = (
    "a red robot in a rainy city",
    "the robot walks into a forest",
    "a quiet harbour at dawn",
)


def frame_count(path) -> int:
    with av.open(io.BytesIO(path.read_bytes())) as container:
        return sum(1 for _ in container.decode(video=0))


def test_longlive_live_takes_typed_prompts_and_leaves_a_playable_mp4(local_serve, tmp_path):
    out = tmp_path / "robot.mp4"
    command = ["-m", "deployments.cli", "live", RED, "--url", local_serve.base, "-o", str(out)]
    child = pexpect.spawn(sys.executable, command, cwd=str(ROOT), encoding="utf-8", timeout=90)
    try:
        child.expect(f"prompt: {RED}")
        for prompt in (FOREST, HARBOUR):
            child.sendline(prompt)
            child.expect(f"latency [0-9.]+ s  prompt: {prompt}")  # its first frame has arrived
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    received = int(re.search(r"wrote \S+: (\d+) frames", child.before).group(1))
    assert received > 0 and frame_count(out) == received
    timeline = re.findall(r"^  block (\d+): (.+?)\r?$", child.before, re.MULTILINE)
    assert [prompt for _, prompt in timeline] == [RED, FOREST, HARBOUR]
    assert [int(block) for block, _ in timeline] == sorted(int(block) for block, _ in timeline)


def longlive(*args: str, home=None) -> subprocess.CompletedProcess:
    env = None if home is None else {**os.environ, "XDG_STATE_HOME": str(home)}  # where tokens are kept
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def test_longlive_job_submit_wait_download_then_status_with_the_kept_token(local_serve, tmp_path):
    out, url = tmp_path / "story.mp4", ("--url", local_serve.base)
    story = str(ROOT / "examples" / "story.yaml")
    done = longlive("job", "submit", story, "--seconds", "6", "--wait", "-o", str(out), *url, home=tmp_path)
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"job (\S+) queued", done.stdout).group(1)
    assert frame_count(out) == frames_total(6)
    status = longlive("job", "status", job_id, *url, home=tmp_path)
    assert status.returncode == 0 and f"job {job_id}: done, {frames_total(6)}/" in status.stdout, (
        status.stderr
    )
    wrong = longlive("job", "status", job_id, "--token", "wrong", *url, home=tmp_path)
    assert wrong.returncode == 1 and wrong.stderr.strip() == (
        f"longlive: error: job {job_id}: wrong or missing job token (403 wrong_token)"
    )


def test_bad_input_is_one_line(tmp_path):
    gone = longlive("live", RED, "--url", "http://127.0.0.1:9")
    assert gone.returncode == 1 and gone.stderr.startswith("longlive: error: no longlive service at ")
    assert len(gone.stderr.splitlines()) == 1, gone.stderr
    schedule = tmp_path / "story.yaml"
    schedule.write_text("- {at: 0, prompt: a cat}\n- {at: 1, prompt: ''}\n")
    bad = longlive("job", "submit", str(schedule), "--seconds", "3", "--url", "http://127.0.0.1:9")
    assert bad.returncode == 2 and f"{schedule} line 2 (entry 2): prompt:" in bad.stderr, bad.stderr
    assert len(bad.stderr.splitlines()) == 1


def test_the_client_example_runs_as_documented(local_serve, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "client.py"),
            "--url",
            local_serve.base,
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    blocks = [line for line in lines if line.startswith("frame")]
    assert [int(line.split()[1]) for line in blocks] == [0, 9, 21, 33, 45, 57]  # 4 s: 69 frames, 6 blocks
    timeline = [line for line in lines if line.startswith("timeline")]
    assert len(timeline) == 2 and timeline[1].endswith("the robot walks into a forest")
    assert "the robot walks into a forest" in blocks[-1]
    assert frame_count(tmp_path / "live.mp4") == frames_total(4)
    assert lines[-1].endswith(f"{frames_total(6)} frames -> {tmp_path / 'story.mp4'}")
    assert frame_count(tmp_path / "story.mp4") == frames_total(6)
