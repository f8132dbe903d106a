"""One real service for the service tests: redis-server, a moto S3 server and a local Ray Serve running
the shipped serve_config.yaml (its args overridden for the test), plus the clients' helpers.

Deployed the way `serve run serve_config.yaml` does it, so scaling is a config change that keeps the
running replicas. Started once per test session (tests/conftest.py): a Ray start costs ~30 s on 2 cores.
"""

from __future__ import annotations

import io
import time
from contextlib import contextmanager
from pathlib import Path

import av
import boto3
import httpx
import numpy as np
import pytest
import ray
from ray import serve

from deployments.config import FORWARDED_ALLOW_IPS, ServiceConfig
from deployments.inbound import InboundLimits, proxy_env
from tests.serving import deploy_shipped_app, free_port, running_redis, wait_ready

SIZE = (48, 32)
BUCKET = "longlive-videos"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
CAPACITY = 6  # sessions per replica
SPEED = 4.0  # playback clock at 4x real time: paced, but quick
# Per client per minute: far above what any test sends from 127.0.0.1; the 429 test fills the counter of
# its own client, named by X-Forwarded-For (trusted here: the tests are the only clients).
RATE_LIMIT = 100_000
RED, FOREST = "a red robot in a rainy city", "the robot walks into a forest"


def deploy(redis_url: str, replicas: int, s3_endpoint: str) -> None:
    args = dict(
        redis_url=redis_url,
        max_sessions=CAPACITY,
        size=list(SIZE),
        playback_speed=SPEED,
        graceful_shutdown_timeout_s=1,
        idle_timeout_s=600,  # ended sessions stay answerable for the whole module
        s3_bucket=BUCKET,
        s3_endpoint_url=s3_endpoint,
        rate_limit_per_minute=RATE_LIMIT,
        max_session_seconds=3000,  # the operator's limit, tighter than the API's 3600
        trust_forwarded_for=True,
        max_sessions_per_client=1000,  # the tests are one client (127.0.0.1); tests/test_serve_quotas.py
        max_queued_jobs_per_client=1000,  # deploys an app of its own with small quotas
        warm_up_sessions=1,  # nothing is compiled on the CPU: one batch size is warm-up enough
        realtime_admission=False,  # a loaded CI machine's tiny steps must not turn sessions away
    )
    deploy_shipped_app(args, replicas)


def generator_replicas() -> int:
    return serve.status().applications["longlive"].deployments["Generator"].replica_states.get("RUNNING", 0)


def wait_replicas(count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while generator_replicas() != count:
        assert time.monotonic() < deadline, f"{generator_replicas()} Generator replicas, not {count}"
        time.sleep(0.5)


@contextmanager
def running_service(directory: Path):
    """Redis (append-only), a moto S3 server and Ray Serve with the shipped app on 2 replicas."""
    from moto.server import ThreadedMotoServer

    with running_redis(directory) as redis, pytest.MonkeyPatch.context() as env:
        redis_url = redis.url
        for name, value in {**CREDENTIALS, **proxy_env(InboundLimits())}.items():
            env.setenv(name, value)  # before ray.init: the replicas and the proxy inherit them
        env.setenv(
            FORWARDED_ALLOW_IPS, ServiceConfig(trust_forwarded_for=True).forwarded_allow_ips
        )  # the proxy
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3.start()
        s3_endpoint = "http://{}:{}".format(*s3.get_host_and_port())
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
        metrics_port = free_port()  # Prometheus text of every metric (tests/test_serve_metrics.py)
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=metrics_port,
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(redis_url, 2, s3_endpoint)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=300)
        wait_replicas(2)
        try:
            yield {
                "base": base,
                "redis_url": redis_url,
                "s3": s3_endpoint,
                "redis": redis,
                "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            }
        finally:
            serve.shutdown()
            ray.shutdown()
            s3.stop()


def create(base: str, prompt: str = RED, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/sessions", json={"prompt": prompt, **body}, timeout=60)


def created(base: str, **body) -> dict:
    response = create(base, **body)
    assert response.status_code == 201, response.text
    return response.json()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def status(base: str, session: dict) -> dict:
    response = httpx.get(
        f"{base}/v1/sessions/{session['session_id']}", headers=auth(session["token"]), timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait_ended(base: str, session: dict, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while status(base, session)["state"] != "ended":
        assert time.monotonic() < deadline, "session did not end"
        time.sleep(0.05)


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
