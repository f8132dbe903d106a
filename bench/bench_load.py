"""A bounded load test on loopback: N live sessions and M batch jobs at once against a real local service.

Starts redis-server, a moto S3 server and a local Ray Serve with the shipped serve_config.yaml (the tiny
model on the CPU by default), then with async httpx: each session is created, its chunked fMP4 stream
read to the end, K prompts posted at intervals and its status polled; each job is submitted, polled
until done, and its MP4 fetched from the presigned URL and decoded with PyAV. Every request has a
timeout and the whole run a deadline, so it ends even if the service misbehaves.

Checks: every prompt answered 202 appears in its session's timeline with a block (>= 0, or -1 when
superseded), else it is a lost event; every job ends `done` with an MP4 of frames_total frames, else it
is a lost job. Exits 1 on a lost event or job, a 5xx, a transport error or the deadline.

    python bench/bench_load.py --out bench/results/load_cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import platform
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402
from longlive_core.schedule import frames_total  # noqa: E402
from tests.serving import deploy_shipped_app, free_port, running_redis, wait_ready  # noqa: E402

BUCKET = "longlive-videos"
S3_ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
ROUTES = ["create", "stream", "prompt", "status", "job submit", "job status", "job video"]


@contextmanager
def service(directory: Path, args: argparse.Namespace):
    """redis-server, moto S3 and Ray Serve with the shipped app (its args overridden); yields the base URL.
    The way tests/service_fixture.py starts it, with this bench's replicas, capacity and pacing."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer
    from ray import serve

    os.environ.update(S3_ENV)  # before ray.init: the replicas inherit them
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log: a line per request
    with running_redis(directory) as redis:
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3.start()
        s3_endpoint = "http://{}:{}".format(*s3.get_host_and_port())
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            overrides = dict(
                redis_url=redis.url,
                model=args.model,
                size=list(args.size),
                replica_gpus=args.gpus,
                max_sessions=args.capacity,
                playback_speed=args.speed,
                graceful_shutdown_timeout_s=1,
                idle_timeout_s=600,
                s3_bucket=BUCKET,
                s3_endpoint_url=s3_endpoint,
                spool_dir=str(directory / "spool"),  # not the shared <tmp>/longlive-spool
                rate_limit_per_minute=args.rate_limit,
            )
            deploy_shipped_app(overrides, args.replicas)
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, timeout=600)
            while _running_replicas(serve) < args.replicas:  # wait_ready needs only one
                time.sleep(0.5)
            yield base
        finally:
            serve.shutdown()
            ray.shutdown()
            s3.stop()


def _running_replicas(serve) -> int:
    app = serve.status().applications["longlive"]
    return app.deployments["Generator"].replica_states.get("RUNNING", 0)


def count_frames(data: bytes) -> int:
    import av

    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


class Load:
    """What the clients saw: latencies and outcomes per route, and the checks' findings."""

    def __init__(self):
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, Counter] = defaultdict(Counter)
        self.first_byte: list[float] = []
        self.sessions: list[dict] = []
        self.jobs: list[dict] = []
        self.lost_events: list[str] = []
        self.lost_jobs: list[str] = []

    async def request(self, client: httpx.AsyncClient, route: str, method: str, url: str, **kw):
        """One request, timed and counted; None on a transport error or timeout (counted by name)."""
        t0 = time.monotonic()
        try:
            response = await client.request(method, url, **kw)
        except httpx.HTTPError as err:
            self.codes[route][type(err).__name__] += 1
            return None
        self.latency[route].append(time.monotonic() - t0)
        self.codes[route][response.status_code] += 1
        return response

    def failures(self) -> int:
        """5xx answers and transport errors (a 4xx is the client's fault: counted, not failed)."""
        return sum(
            n
            for c in self.codes.values()
            for code, n in c.items()
            if not (isinstance(code, int) and code < 500)
        )


async def run_session(load: Load, client: httpx.AsyncClient, base: str, i: int, args) -> None:
    record = {"index": i, "frames": 0, "expected": frames_total(args.session_seconds), "acked": []}
    load.sessions.append(record)
    t0 = time.monotonic()
    body = {
        "prompt": f"a red robot in a rainy city, session {i}",
        "max_seconds": args.session_seconds,
        "seed": i,
    }
    response = await load.request(client, "create", "POST", f"{base}/v1/sessions", json=body)
    if response is None or response.status_code != 201:
        record["error"] = f"create: {response.status_code if response is not None else 'no answer'}"
        return
    session = response.json()
    headers = {"Authorization": f"Bearer {session['token']}"}
    url = f"{base}/v1/sessions/{session['session_id']}"

    async def read_stream() -> None:
        data = bytearray()
        t_req = time.monotonic()
        try:
            async with client.stream("GET", session["stream_url"], headers=headers) as stream:
                load.codes["stream"][stream.status_code] += 1
                async for chunk in stream.aiter_bytes():
                    if not data:
                        load.first_byte.append(time.monotonic() - t0)
                        load.latency["stream"].append(time.monotonic() - t_req)
                    data.extend(chunk)
        except httpx.HTTPError as err:
            load.codes["stream"][type(err).__name__] += 1
        record["bytes"], record["wall"] = len(data), time.monotonic() - t0
        try:
            record["frames"] = await asyncio.to_thread(count_frames, bytes(data)) if data else 0
        except Exception as err:  # noqa: BLE001 - reported as no frames
            record["error"] = f"stream not decodable ({type(err).__name__})"

    async def post_prompts() -> None:
        interval = args.session_seconds / args.speed * args.prompt_span / args.prompts
        for k in range(args.prompts):
            await asyncio.sleep(interval)
            prompt = f"the robot walks into forest {k}, session {i}"
            r = await load.request(
                client, "prompt", "POST", f"{url}/prompts", json={"prompt": prompt}, headers=headers
            )
            if r is not None and r.status_code == 202:
                record["acked"].append(prompt)

    async def poll_status(done: asyncio.Event) -> None:
        while not done.is_set():
            await load.request(client, "status", "GET", url, headers=headers)
            try:
                await asyncio.wait_for(done.wait(), args.status_every)
            except TimeoutError:
                pass

    done = asyncio.Event()
    poller = asyncio.create_task(poll_status(done))
    await asyncio.gather(read_stream(), post_prompts())
    done.set()
    await poller
    # The stream ended with the session: its timeline is final.
    final = await load.request(client, "status", "GET", url, headers=headers)
    timeline = final.json()["prompts"] if final is not None and final.status_code == 200 else []
    applied = {p["prompt"] for p in timeline if p["block"] is not None}
    record["superseded"] = sum(1 for p in timeline if p["block"] == -1)
    record["state"] = final.json()["state"] if final is not None and final.status_code == 200 else None
    load.lost_events += [f"session {i}: {p!r}" for p in record["acked"] if p not in applied]
    record["checked"] = True


async def run_job(load: Load, client: httpx.AsyncClient, base: str, j: int, args) -> None:
    record = {"index": j, "expected": frames_total(args.job_seconds), "frames": None, "state": None}
    load.jobs.append(record)
    await check_job(load, client, base, record, args)
    record["checked"] = True  # not reached when the deadline cancels it


async def check_job(load: Load, client: httpx.AsyncClient, base: str, record: dict, args) -> None:
    """Submit, poll until it ends, fetch and decode its MP4; anything short of that is a lost job."""
    j, seconds = record["index"], args.job_seconds
    schedule = [
        {"at": 0, "prompt": f"a lighthouse at dusk, job {j}"},
        {"at": seconds / 2, "prompt": f"a storm reaches the lighthouse, job {j}"},
    ]
    body = {"schedule": schedule, "seconds": seconds, "seed": 100 + j}
    t0 = time.monotonic()
    response = await load.request(client, "job submit", "POST", f"{base}/v1/jobs", json=body)
    if response is None or response.status_code != 201:
        load.lost_jobs.append(
            f"job {j}: submit {response.status_code if response is not None else 'no answer'}"
        )
        return
    job = response.json()
    headers = {"Authorization": f"Bearer {job['token']}"}
    status = {}
    while status.get("state") not in ("done", "failed", "cancelled"):
        await asyncio.sleep(args.job_poll)
        r = await load.request(
            client, "job status", "GET", f"{base}/v1/jobs/{job['job_id']}", headers=headers
        )
        if r is not None and r.status_code == 200:
            status = r.json()
            record["state"] = status["state"]
    record["state"], record["wall"] = status["state"], time.monotonic() - t0
    if status["state"] != "done":
        load.lost_jobs.append(f"job {j}: {status['state']} ({status.get('error')})")
        return
    video = await load.request(client, "job video", "GET", status["result_url"])
    if video is None or video.status_code != 200:
        load.lost_jobs.append(f"job {j}: video {video.status_code if video is not None else 'no answer'}")
        return
    try:
        record["frames"] = await asyncio.to_thread(count_frames, video.content)
    except Exception as err:  # noqa: BLE001 - any decode failure is a lost job
        load.lost_jobs.append(f"job {j}: undecodable MP4 ({type(err).__name__})")
        return
    if record["frames"] != record["expected"]:
        load.lost_jobs.append(f"job {j}: {record['frames']} frames, not {record['expected']}")


async def drive(base: str, args) -> tuple[Load, float, bool]:
    load = Load()
    timeout = httpx.Timeout(args.request_timeout, read=args.request_timeout)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = [run_session(load, client, base, i, args) for i in range(args.sessions)]
        tasks += [run_job(load, client, base, j, args) for j in range(args.jobs)]
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), args.deadline)
            timed_out = False
        except TimeoutError:
            timed_out = True
            # Cut short: what could not be checked counts as lost.
            for s in load.sessions:
                if not s.get("checked"):
                    load.lost_events += [f"session {s['index']}: {p!r} (unchecked)" for p in s["acked"]]
            for j in load.jobs:
                if not j.get("checked"):
                    load.lost_jobs.append(f"job {j['index']}: unfinished at the deadline ({j['state']})")
        return load, time.monotonic() - t0, timed_out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(load: Load, wall: float, timed_out: bool, args) -> tuple[list[str], list[str]]:
    rows = [
        "| route | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for route in ROUTES:
        values, codes = load.latency[route], load.codes[route]
        answers = ", ".join(f"{code}: {n}" for code, n in sorted(codes.items(), key=str))
        total = sum(codes.values())
        ms = [f"{percentile(values, q) * 1e3:.0f}" for q in (50, 90, 99, 100)] if values else ["-"] * 4
        rows.append(f"| {route} | {total} | {total / wall:.2f} | {' | '.join(ms)} | {answers} |")
    first = load.first_byte
    frames = [f"{s['frames']}/{s['expected']}" for s in sorted(load.sessions, key=lambda s: s["index"])]
    job_frames = [f"{j['frames']}/{j['expected']}" for j in sorted(load.jobs, key=lambda j: j["index"])]
    acked = sum(len(s["acked"]) for s in load.sessions)
    walls = [s["wall"] for s in load.sessions if s.get("wall")]
    job_walls = [j["wall"] for j in load.jobs if j.get("wall")]
    fps = [s["frames"] / s["wall"] for s in load.sessions if s.get("wall")]
    superseded = sum(s.get("superseded", 0) for s in load.sessions)
    summary = [
        "| check | result |",
        "|---|---|",
        f"| wall time of the load | {wall:.1f} s{' (deadline hit)' if timed_out else ''} |",
        "| time to first video byte (from POST /v1/sessions), p50 / max | "
        + (f"{percentile(first, 50) * 1e3:.0f} / {max(first) * 1e3:.0f} ms |" if first else "- |"),
        f"| prompts acknowledged (202) / lost | {acked} / {len(load.lost_events)}"
        f" ({superseded} superseded: -1) |",
        f"| jobs submitted / lost | {len(load.jobs)} / {len(load.lost_jobs)} |",
        f"| session frames received / expected | {', '.join(frames)} |",
        f"| job frames decoded / expected | {', '.join(job_frames)} |",
        "| session wall, create to stream end (s), median / max | "
        + (f"{percentile(walls, 50):.1f} / {max(walls):.1f} |" if walls else "- |"),
        "| frames per second received per session, min / median (real time: 16) | "
        + (f"{min(fps):.1f} / {percentile(fps, 50):.1f} |" if fps else "- |"),
        "| job wall, submit to done (s), median / max | "
        + (f"{percentile(job_walls, 50):.1f} / {max(job_walls):.1f} |" if job_walls else "- |"),
        f"| 5xx + transport errors | {load.failures()} |",
    ]
    return rows, summary


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=6, help="live sessions at once (N)")
    parser.add_argument("--jobs", type=int, default=4, help="batch jobs at once (M)")
    parser.add_argument("--session-seconds", type=float, default=30, help="video seconds per session")
    parser.add_argument("--prompts", type=int, default=4, help="prompts posted per session (K)")
    parser.add_argument("--prompt-span", type=float, default=0.7, help="prompts spread over this share")
    parser.add_argument(
        "--status-every", type=float, default=2.0, help="status poll interval per session (s)"
    )
    parser.add_argument("--job-seconds", type=float, default=10, help="video seconds per job")
    parser.add_argument("--job-poll", type=float, default=0.5)
    parser.add_argument("--request-timeout", type=float, default=30)
    parser.add_argument("--deadline", type=float, default=None, help="whole load's limit (s)")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--size", type=int, nargs=2, default=[48, 32])
    parser.add_argument("--gpus", type=float, default=0, help="per replica")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=6, help="sessions per replica")
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed (1: real time)")
    parser.add_argument("--rate-limit", type=int, default=100_000, help="per client per minute")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.deadline is None:
        args.deadline = args.session_seconds / args.speed + 120

    import torch

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, service(Path(tmp), args) as base:
        load_at_start = os.getloadavg()
        load, wall, timed_out = asyncio.run(drive(base, args))
        load_after = os.getloadavg()
    rows, summary = report(load, wall, timed_out, args)
    meta = [
        f"- machine: {machine()}, CPU only; torch {torch.__version__}; model {args.model} at"
        f" {args.size[0]}x{args.size[1]}; {args.replicas} Generator replicas x {args.capacity} sessions,"
        f" playback speed {args.speed:g}; redis-server + moto S3 + local Ray Serve, all on loopback",
        f"- command: `{command_line()}`",
        f"- load: {args.sessions} sessions of {args.session_seconds:g} s video, each reading its chunked"
        f" fMP4 stream to the end, posting {args.prompts} prompts over the first {args.prompt_span:.0%} and"
        f" polling its status every {args.status_every:g} s; {args.jobs} jobs of {args.job_seconds:g} s"
        f" (2 prompts) submitted at once, polled every {args.job_poll:g} s, each MP4 fetched and decoded",
        f"- machine load average (1 min): {load_before[0]:.1f} before the service started,"
        f" {load_at_start[0]:.1f} when the load started, {load_after[0]:.1f} at its end"
        " (the bench's own service and client included; other users' tests may share the machine)",
        "- stream latency: request to first body byte; time to first video byte counts from the create",
    ]
    problems = [f"- lost: {x}" for x in load.lost_events + load.lost_jobs]
    problems += [f"- session {s['index']}: {s['error']}" for s in load.sessions if "error" in s]
    if timed_out:
        problems.append(f"- the deadline ({args.deadline:g} s) cut the load short")
    body = ["## Requests by route", "", *rows, ""]
    if problems:
        body += ["## Problems", "", *problems, ""]
    body += ["## Checks", "", *summary]
    emit("Load test on loopback: live sessions and batch jobs at once", meta, body, args.out)
    failed = load.lost_events or load.lost_jobs or load.failures() or timed_out
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
