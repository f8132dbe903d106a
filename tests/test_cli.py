"""`longlive generate` end to end on the built-in tiny model: MP4s PyAV decodes; clear errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from longlive_core.cli import main
from longlive_core.schedule import video_frames

ROOT = Path(__file__).resolve().parents[1]


def decode(path: Path) -> tuple[np.ndarray, float, tuple[int, int]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate), (stream.width, stream.height)


def test_installed_command_writes_the_scheduled_mp4(tmp_path):
    """The installed command's module in a fresh process, with a three-prompt schedule."""
    schedule = tmp_path / "story.yaml"
    schedule.write_text(
        "- at: 0\n  prompt: a red robot in a rainy city\n"
        "- at: 1\n  prompt: the robot walks into a forest\n"
        "- at: 2\n  prompt: the forest turns to snow\n"
    )
    out = tmp_path / "video" / "story.mp4"
    args = ["generate", "--schedule", str(schedule), "--seconds", "3", "--size", "64x48", "-o", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "3 prompt(s)" in result.stdout
    assert "frame/s" in result.stderr  # the progress bar
    frames, fps, size = decode(out)
    # 3 s = 48 frames: 4 blocks give 45, too few; 5 blocks = 15 latent frames = 1 + 4 * 14 = 57.
    assert len(frames) == video_frames(15) == 57
    assert fps == 16 and size == (64, 48)
    assert frames.std() > 5  # real content, not a blank video
    assert not (tmp_path / "video" / "story.partial.mp4").exists()


def test_prompt_and_seed_decide_the_video(tmp_path, capsys):
    def run(prompt: str, seed: int) -> np.ndarray:
        out = tmp_path / f"{prompt[:5]}{seed}.mp4"
        assert (
            main(
                ["generate", prompt, "--seconds", "1", "--size", "48x32", "--seed", str(seed), "-o", str(out)]
            )
            == 0
        )
        return decode(out)[0].astype(float)

    base = run("a cat", 0)
    assert len(base) == 21
    assert np.abs(run("a cat", 0) - base).max() == 0  # deterministic
    assert np.abs(run("a dog", 0) - base).mean() > 1  # the prompt matters
    assert np.abs(run("a cat", 1) - base).mean() > 1  # the seed matters


@pytest.mark.parametrize(
    "args, message",
    [
        (["--schedule", "{schedule}"], "line 5 \\(entry 3\\): entries must be sorted"),
        (
            ["a cat", "--seconds", "5", "--schedule", "{late}"],
            "late.yaml line 1 \\(entry 1\\): at 9.0 s is not within the 5.0 s",
        ),
        (["a cat", "--seconds", "0"], "--seconds must be > 0"),
        (["a cat", "--size", "50x32"], "multiples of 16"),
        (["   "], "PROMPT must not be empty"),
        ([], "give a PROMPT or a --schedule"),
        (["a cat", "--schedule", "{missing}"], "cannot read schedule"),
    ],
)
def test_bad_requests_fail_with_one_clear_line(tmp_path, capsys, args, message):
    (tmp_path / "bad.yaml").write_text("- at: 0\n  prompt: a\n- at: 4\n  prompt: b\n- at: 2\n  prompt: c\n")
    (tmp_path / "late.yaml").write_text("- at: 9\n  prompt: later\n")
    paths = {
        "schedule": tmp_path / "bad.yaml",
        "late": tmp_path / "late.yaml",
        "missing": tmp_path / "nope.yaml",
    }
    args = [a.format(**paths) for a in args]
    assert main(["generate", *args, "-o", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_bad_size_syntax_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--size", "big"])
    assert exit_info.value.code == 2
    assert "--size must look like" in capsys.readouterr().err


def test_missing_weights_fail_with_a_download_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in ("longlive-1.3b", str(tmp_path / "no-such-dir"), str(tmp_path)):
        assert main(["generate", "a cat", "--model", model, "-o", str(tmp_path / "x.mp4")]) == 1
        err = capsys.readouterr().err
        assert "longlive download" in err and "Traceback" not in err


def test_download_offline_says_so(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "longlive_core.cli", "download"]
    result = subprocess.run([*run, "longlive-1.3b"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 1
    assert "could not download Wan-AI/Wan2.1-T2V-1.3B" in result.stderr and "Traceback" not in result.stderr
    builtin = subprocess.run([*run, "tiny-random"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert builtin.returncode == 0 and "built in" in builtin.stdout


def test_the_installed_command_has_the_service_s_commands_and_the_core_only_its_own():
    def commands(module: str) -> set[str]:
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, check=True
        )
        return set(re.search(r"\{([a-z,]+)\}", result.stdout).group(1).split(","))

    assert commands("deployments.cli") == {"generate", "download", "serve", "status", "live", "job"}
    assert commands("longlive_core.cli") == {"generate", "download"}
