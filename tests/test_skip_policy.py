"""CI fails on a skip it did not expect, and on a skip without a reason (tests/skip_policy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.skip_policy import is_expected

ROOT = Path(__file__).resolve().parents[1]
CASES = """
import pytest

def test_passes():
    pass

def test_skipped_without_a_reason():
    pytest.skip()

@pytest.mark.skip
def test_marked_skip_without_a_reason():
    pass

@pytest.mark.skipif(True, reason="no GPU here")
def test_skipped_for_a_reason_nobody_listed():
    pass
"""


def _pytest(directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.skip_policy", "-p", "no:cacheprovider"]
    command += args
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=120)


def test_unexpected_skips_fail_the_run_and_are_named(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    result = _pytest(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "1 passed, 3 skipped" in result.stdout
    summary = result.stdout.split("unexpected skips")[1]
    assert "test_skipped_without_a_reason: (no reason given)" in summary
    assert "test_marked_skip_without_a_reason: (no reason given)" in summary
    assert "test_skipped_for_a_reason_nobody_listed: no GPU here" in summary
    # Control: the same file without its skips passes.
    assert _pytest(tmp_path, "-k", "passes").returncode == 0


def test_a_listed_skip_needs_its_prefix_and_reason():
    expected = {"tests/test_gpu.py::": "no GPU"}
    assert is_expected("tests/test_gpu.py::test_fp8", "no GPU here", expected)
    assert not is_expected("tests/test_gpu.py::test_fp8", "redis-server missing", expected)
    assert not is_expected("tests/test_cpu.py::test_x", "no GPU here", expected)
    assert not is_expected("tests/test_gpu.py::test_fp8", "", expected)
