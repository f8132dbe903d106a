"""The session service on a real local Ray Serve with a real redis-server (tiny-random model, CPU)."""

from __future__ import annotations

import io

import av
import httpx
import numpy as np
import pytest

from tests.serving import free_port, redis_server, wait_ready

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402

SIZE = (48, 32)


def app_args(redis_url: str, replicas: int) -> dict:
    return {
        "redis_url": redis_url,
        "num_replicas": replicas,
        "max_sessions": 12,
        "size": SIZE,
        "playback_speed": 0,  # unpaced: tests run faster than real time
        "graceful_shutdown_timeout_s": 1,
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as redis_url:
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args(redis_url, 2)), name="longlive", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_ready(base)
        try:
            yield {"base": base, "redis_url": redis_url}
        finally:
            serve.shutdown()
            ray.shutdown()


def create(base: str, prompt: str = "a red robot in a rainy city", **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/sessions", json={"prompt": prompt, **body}, timeout=60)


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_a_session_streams_fmp4_that_decodes(service):
    base = service["base"]
    response = create(base, max_seconds=2)
    assert response.status_code == 201, response.text
    created = response.json()
    with httpx.stream(
        "GET", created["stream_url"], headers=auth(created["token"]), timeout=60
    ) as response:
        assert response.status_code == 200
        data = b"".join(response.iter_bytes())
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 33 and frames[0].shape == (32, 48, 3)
    assert np.std(frames[-1]) > 1
