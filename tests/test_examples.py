"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stream_latents_example_switches_prompt_and_reports_every_block():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stream_latents.py"), "--blocks", "5", "--switch-at", "3"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.splitlines()
    blocks = [line for line in out if line.startswith("block")]
    assert len(blocks) == 5
    assert [line.split("prompt")[1].split()[0] for line in blocks] == ["0", "0", "0", "1", "1"]
    assert "latent frames   15" in blocks[-1]
    assert out[-1].startswith("5 blocks in")


def test_readme_schedule_is_valid():
    from longlive_core.schedule import load_schedule, validate_schedule

    entries, where = load_schedule(ROOT / "examples" / "story.yaml")
    validate_schedule(entries, 6, where)
    assert len(entries) == 3
