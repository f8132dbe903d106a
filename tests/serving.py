"""Fixtures' helpers for service tests: a real redis-server and a real local Ray Serve."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """redis-server on a loopback port with append-only persistence (fsync on every write, as the
    shipped configs set it), restartable on the same port and data directory."""

    def __init__(self, directory: Path, port: int | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = [
            binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory)),
            *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean shutdown) or SIGKILL (a crash: only what was fsynced survives)."""
        if self.proc is not None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextmanager
def redis_server(directory: Path):
    """A started RedisServer's URL; stopped on exit."""
    with running_redis(directory) as server:
        yield server.url


@contextmanager
def running_redis(directory: Path):
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def deploy_shipped_app(args: dict, replicas: int) -> None:
    """Deploy serve_config.yaml's application on the running Serve the way `serve deploy` does, its args
    updated with `args` and `replicas` Generator replicas (a redeploy keeps the running replicas).
    Not blocking: Serve's own wait gives up after 60 s, too short for weights, warm-up or a loaded 2-core
    machine; wait with wait_ready()."""
    import yaml
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    app["args"].update(args)
    app["deployments"][0]["num_replicas"] = replicas
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]), _blocking=False)


def wait_ready(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} not ready within {timeout} s")


class Recorder:
    """The test's callback server: records each POST (its Host header and JSON body); `trickle_s` > 0
    answers one byte of its status line every `trickle_s` seconds until the client goes."""

    def __init__(self, trickle_s: float = 0.0):
        self.received: list[tuple[str, dict]] = []
        self.trickle_s = trickle_s
        self.done = threading.Event()


@contextmanager
def callback_server(trickle_s: float = 0.0) -> Iterator[tuple[Recorder, int]]:
    recorder = Recorder(trickle_s)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            recorder.received.append((self.headers["Host"], body))
            if recorder.trickle_s:
                for byte in b"HTTP/1.1 204 No Content\r\n" * 100:  # far longer than any deadline
                    if recorder.done.wait(recorder.trickle_s):
                        return
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:
                        return  # the client hung up: what the deadline is for
                return
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield recorder, server.server_port
    finally:
        recorder.done.set()
        server.shutdown()
        server.server_close()


@contextmanager
def local_service(
    args: dict, replicas: int = 1, timeout: float = 1800, **ray_init
) -> Iterator[tuple[str, float, Path]]:
    """For benches: a redis-server, a local Ray on loopback HTTP and the shipped app with `args` (its
    redis_url and, unless given, its store_dir set) on `replicas` Generator replicas; yields (base URL,
    seconds to ready, a scratch folder). Serve and Ray are shut down on exit."""
    import tempfile

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as redis_url:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **ray_init)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            deploy_shipped_app(
                {"store_dir": str(Path(tmp) / "videos"), **args, "redis_url": redis_url}, replicas
            )
            base = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            wait_ready(base, timeout=timeout)
            yield base, time.monotonic() - started, Path(tmp)
        finally:
            serve.shutdown()
            ray.shutdown()
