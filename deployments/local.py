"""`longlive serve`: the service on this machine from serve_config.yaml (the embedded default).

One instance, its own state: unless the config names a `redis_url`, it starts a private redis-server
(deployments/local_redis.py); unless told to join one (`--ray-address`), it starts its own local Ray; its
job results and spool live in its data folder. It binds 127.0.0.1 unless
`--host` says otherwise (serve_config.yaml's 0.0.0.0 is for the KubeRay pods that share the file).
SIGTERM or Ctrl-C ends it after a short drain (`--drain`, 10 s), leaving no process behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from jobs.redis_client import PASSWORD_ENV

from .config import FORWARDED_ALLOW_IPS, ServiceConfig
from .inbound import proxy_env
from .local_redis import PrivateRedis, redis_answers

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DRAIN_S = 10.0


def load_config(path: Path, port: int | None = None) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"serve config {path} not found (pass --config)")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path} has no applications")
    http = config.setdefault("http_options", {})
    if port is not None:
        http["port"] = port
    return config


def default_data_dir(port: int) -> Path:
    """One folder per instance (an HTTP port has one instance at a time), kept across restarts."""
    return Path.home() / ".local" / "share" / "longlive" / f"serve-{port}"


def instance_args(args: dict, data_dir: Path, redis_url: str | None, drain_s: float) -> dict:
    """An application's args for this instance: its Redis, its folders, its drain."""
    updated = {**args, "graceful_shutdown_timeout_s": drain_s}
    if redis_url is not None:
        updated["redis_url"] = redis_url
    updated.setdefault("store_dir", str(data_dir / "results"))
    updated.setdefault("spool_dir", str(data_dir / "spool"))  # another instance's sweep must not see it
    return updated


def one_replica_per_gpu(app: dict, gpus: float) -> None:
    """On GPU replicas, as many Generators as this machine's GPUs hold (at least the config's): with two,
    a failed replica's sessions move to the other in about a second; with one, Serve restarts it in place
    (deployments/README.md, Failover, gives both times)."""
    per_replica = float(app.get("args", {}).get("replica_gpus", 0))
    if per_replica <= 0:
        return
    for deployment in app.get("deployments", []):
        configured = deployment.get("num_replicas", 1)
        if deployment.get("name") == "Generator" and isinstance(configured, int):  # not "auto"
            deployment["num_replicas"] = max(configured, int(gpus // per_replica))


def api_key_set(config: dict) -> bool:
    return bool(os.environ.get("LONGLIVE_API_KEYS", "").strip()) or any(
        app.get("args", {}).get("api_keys") for app in config["applications"]
    )


def wait_running(names: list[str], stop: threading.Event) -> None:
    """Wait (without Serve's 60 s limit: weights and warm-up can take minutes) for every application."""
    from ray import serve

    shown = None
    while not stop.is_set():
        states = {name: serve.status().applications[name].status for name in names}
        if states != shown:
            print(f"longlive: {', '.join(f'{n} {s}' for n, s in states.items())}", flush=True)
            shown = states
        if any(state == "DEPLOY_FAILED" for state in states.values()):
            raise RuntimeError(f"deployment failed: {serve.status().applications}")
        if all(state == "RUNNING" for state in states.values()):
            return
        stop.wait(1)


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT (Ctrl-C) set the event, once (ray.init replaced SIGTERM's handler, so this runs
    after it); a second Ctrl-C during the drain interrupts as usual."""
    stop = threading.Event()

    def handle(signum: int, frame) -> None:
        print(f"longlive: {signal.Signals(signum).name}, draining", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def serve_forever(
    config_path: Path,
    port: int | None = None,
    host: str | None = None,
    ray_address: str | None = None,
    data_dir: Path | None = None,
    drain_s: float | None = None,
) -> None:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = load_config(config_path, port)
    drain_s = DEFAULT_DRAIN_S if drain_s is None else drain_s
    host = host or DEFAULT_HOST
    port = config["http_options"].get("port", DEFAULT_PORT)
    data_dir = data_dir or default_data_dir(port)
    ServeDeploySchema(**config)  # validates the file before anything starts
    if host not in LOOPBACK and not api_key_set(config):
        print(
            f"longlive: WARNING: serving on {host} without an API key: anyone who reaches this machine can "
            "use it (set api_keys in the config or LONGLIVE_API_KEYS)",
            file=sys.stderr,
            flush=True,
        )
    private = None
    named = {app["args"]["redis_url"] for app in config["applications"] if "redis_url" in app.get("args", {})}
    for url in named:  # named in the config: used as it is, never started here
        if not redis_answers(url):
            raise ConnectionError("the Redis the config names (redis_url) does not answer")
    if len(named) < len(config["applications"]):
        private = PrivateRedis(data_dir / "redis")
    try:
        redis_url = None
        if private is not None:
            private.start()
            redis_url = private.url
            # Through the environment (which the local Ray's workers inherit), not the args: Serve logs those.
            os.environ[PASSWORD_ENV] = private.password
        # Ray's proxies take their WebSocket limits from the environment they start with.
        inbound = ServiceConfig(**config["applications"][0].get("args", {})).websocket_inbound
        os.environ.update(proxy_env(inbound))
        print(f"longlive: data folder {data_dir}", flush=True)
        # uvicorn in Ray's proxy believes X-Forwarded-For only from the peers this env names (its workers
        # inherit it): none unless the config trusts the header (ServiceConfig.forwarded_allow_ips).
        trusted = any(app["args"].get("trust_forwarded_for") for app in config["applications"])
        os.environ[FORWARDED_ALLOW_IPS] = ServiceConfig(trust_forwarded_for=trusted).forwarded_allow_ips
        # Our own Ray unless told to join one ("local" ignores RAY_ADDRESS and any `ray start` cluster).
        # Ray 2.60 binds its own gRPC ports on every interface and turns a loopback node address into the
        # machine's, so they cannot be kept on loopback from here.
        context = ray.init(
            address=ray_address or "local", include_dashboard=False if ray_address is None else None
        )
        gpus = ray.cluster_resources().get("GPU", 0)
        for app in config["applications"]:
            url = None if "redis_url" in app.get("args", {}) else redis_url
            app["args"] = instance_args(app.get("args", {}), data_dir, url, drain_s)
            one_replica_per_gpu(app, gpus)
        schema = ServeDeploySchema(**config)
        print(f"longlive: Ray's logs in {context.address_info['session_dir']}/logs", flush=True)
        stop = stop_on_signals()
        serve.start(http_options={"host": host, "port": port})
        _get_global_client().deploy_apps(schema, _blocking=False)  # what `serve run <config>` does
        wait_running([app.name for app in schema.applications], stop)
        if not stop.is_set():
            print(f"longlive: serving on http://{host}:{port}", flush=True)
        stop.wait()
        started = time.monotonic()
        serve.shutdown()  # replicas drain for graceful_shutdown_timeout_s (drain_s)
        print(f"longlive: drained in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()  # the raylet, GCS and workers this process started
        if private is not None:
            private.stop()
