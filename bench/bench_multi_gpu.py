"""The real service on one multi-GPU host: one Generator replica per GPU, sessions to capacity.

Starts local Ray (every GPU), a local redis-server and a local-directory video store, deploys the shipped
serve_config.yaml with `--model` (default `random-1.3b`: the full-size architecture with random weights),
opens sessions until the service answers 503 (every replica at capacity), reads every session's fMP4
stream over loopback and reports per-session and aggregate FPS (frames received per second of wall
time), stickiness (every status call answered by the replica that created the session), and the cost of
killing one replica: for each of its sessions, the longest silence on its open stream around the kill
(the ingress resumes it on another replica, which restores it from its Redis checkpoint).

    python bench/bench_multi_gpu.py --compile --out bench/results/multi_gpu_h100x2.md   # GPU host
    python bench/bench_multi_gpu.py --model tiny-random --gpus 0 --replicas 2            # CPU smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402
from tests.serving import deploy_shipped_app, free_port, redis_server, wait_ready  # noqa: E402


class Viewer(threading.Thread):
    """Reads one session's stream to its end; keeps each chunk's arrival time and size."""

    def __init__(self, base: str, session: dict):
        super().__init__(daemon=True)
        self.base, self.session = base, session
        self.arrivals: list[tuple[float, int]] = []
        self.replicas: set[str] = set()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.session['token']}"}
        with httpx.stream("GET", self.session["stream_url"], headers=headers, timeout=600) as response:
            for chunk in response.iter_raw():
                self.arrivals.append((time.monotonic(), len(chunk)))

    def status(self) -> dict:
        url = f"{self.base}/v1/sessions/{self.session['session_id']}"
        headers = {"Authorization": f"Bearer {self.session['token']}"}
        status = httpx.get(url, headers=headers, timeout=60).json()
        self.replicas.add(status["replica"])
        return status

    def longest_silence(self, after: float) -> float:
        times = [t for t, _ in self.arrivals if t >= after]
        gaps = [b - a for a, b in zip([after, *times], times, strict=False)]
        return max(gaps, default=float("nan"))


def kill_replica(replica_id: str) -> None:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica_id in a["name"]]
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-1.3b")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (= replicas); default: all")
    parser.add_argument("--replicas", type=int, default=None, help="with --gpus 0: CPU replicas")
    parser.add_argument("--sessions-per-replica", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=None, help="open this many (default: to capacity)")
    parser.add_argument("--seconds", type=float, default=40, help="video per session")
    parser.add_argument("--kill-after", type=float, default=15, help="seconds in; 0: no kill")
    parser.add_argument("--playback-speed", type=float, default=1.0, help="0: unpaced (throughput)")
    parser.add_argument("--size", type=int, nargs=2, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    replicas = gpus or args.replicas or 1
    size = args.size or ([48, 32] if args.model == "tiny-random" else [832, 480])
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as redis_url:
        ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        overrides = dict(
            redis_url=redis_url,
            model=args.model,
            size=size,
            compile=args.compile,
            replica_gpus=1 if gpus else 0,
            max_sessions=args.sessions_per_replica,
            warm_up_sessions=args.sessions_per_replica,
            playback_speed=args.playback_speed,
            jobs=False,
            store_dir=str(Path(tmp) / "videos"),
            rate_limit_per_minute=0,
        )
        deploy_shipped_app(overrides, replicas)
        base = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        wait_ready(base, timeout=1800)
        while len(httpx.get(f"{base}/v1/admin/replicas", timeout=30).json().get("replicas", [])) < replicas:
            time.sleep(1)
        ready_s = time.monotonic() - started

        viewers = []
        while args.sessions is None or len(viewers) < args.sessions:  # default: until admission says full
            prompt = f"a red robot in a rainy city, take {len(viewers)}"
            body = {"prompt": prompt, "max_seconds": args.seconds}
            response = httpx.post(f"{base}/v1/sessions", json=body, timeout=120)
            if response.status_code == 503:
                break
            response.raise_for_status()
            viewers.append(Viewer(base, response.json()))
            viewers[-1].start()
        opened = time.monotonic()

        time.sleep(max(args.kill_after, 5))
        for v in viewers:
            v.status()
        victim, moved, killed_at = None, [], float("nan")
        if replicas > 1 and args.kill_after > 0:  # with one replica they could only wait for a new one
            victim = viewers[0].session["replica"]
            moved = [v for v in viewers if v.session["replica"] == victim]
            killed_at = time.monotonic()
            kill_replica(victim)
        for v in viewers:
            v.join(args.seconds * 4 + 300)
        for v in viewers:
            v.status()
        serve.shutdown()
        ray.shutdown()

    stayed = [v for v in viewers if v not in moved]
    sticky = all(v.replicas == {v.session["replica"]} for v in stayed)
    frames = video_frames_for(args.seconds)

    def fps(v: Viewer) -> float:
        return frames / (v.arrivals[-1][0] - v.arrivals[0][0])

    per_session = [fps(v) for v in stayed]
    aggregate = frames * len(viewers) / (max(v.arrivals[-1][0] for v in viewers) - opened)
    silences = [v.longest_silence(killed_at) for v in moved] or [float("nan")]
    rows = [
        "| replicas | sessions | per-session FPS of unmoved sessions (median / min) | aggregate FPS |"
        " sticky | moved sessions | longest stream silence after the kill (s, median / max) |",
        "|---|---|---|---|---|---|---|",
        f"| {replicas} | {len(viewers)} | {statistics.median(per_session):.1f} / {min(per_session):.1f} |"
        f" {aggregate:.1f} | {'yes' if sticky else 'NO'} | {len(moved)}"
        f" {sorted({r for v in moved for r in v.replicas} - {victim})} |"
        f" {statistics.median(silences):.2f} / {max(silences):.2f} |",
    ]
    device = torch.cuda.get_device_name() if gpus else platform.processor() or platform.machine()
    meta = [
        f"- device: {gpus} x {device}" if gpus else f"- device: CPU ({device}), {replicas} replicas",
        f"- torch {torch.__version__}, ray {ray.__version__}; model {args.model} (Wan VAE),"
        f" {size[0]}x{size[1]}, {'compiled' if args.compile else 'eager'}; {args.sessions_per_replica}"
        f" session(s) per replica; playback speed {args.playback_speed:g}; ready after {ready_s:.0f} s",
        f"- command: `{command_line()}`",
        f"- each session {args.seconds:g} s of video ({frames} frames), read as chunked fMP4 over loopback;"
        " FPS = frames / (last chunk - first chunk); "
        + (f"one replica killed {args.kill_after:g} s after the sessions opened" if victim else "no kill"),
    ]
    emit("The service on one multi-GPU host", meta, rows, args.out)


def video_frames_for(seconds: float) -> int:
    from longlive_core.schedule import blocks_for_seconds, video_frames

    return video_frames(blocks_for_seconds(seconds, 3) * 3)


if __name__ == "__main__":
    main()
