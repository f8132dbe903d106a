"""Client-side latency of the session service: a real local Ray Serve + redis-server, real-time pacing.

For each of N concurrent viewers: POST /v1/sessions -> first WebSocket message (a block of fMP4 whose
first frame is then visible: time to first frame), and POST of a new prompt -> the first message made
under it (prompt-to-pixel, as the session's timeline says which block that is). Runs the tiny-random
model on the CPU by default; `--model`/`--gpus` for real weights on a GPU machine with Ray.

    python bench/bench_service.py --viewers 1 2 --out bench/results/service_latency_cpu.md
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


def viewer(base: str, index: int, seconds: float, switch_after: float, out: dict) -> None:
    from websockets.sync.client import connect

    t0 = time.monotonic()
    body = {"prompt": f"a red robot in a rainy city, viewer {index}", "max_seconds": seconds, "seed": index}
    session = httpx.post(f"{base}/v1/sessions", json=body, timeout=60).json()
    headers = {"Authorization": f"Bearer {session['token']}"}
    session_url = f"{base}/v1/sessions/{session['session_id']}"
    url = f"{session['websocket_url']}?token={session['token']}"
    arrivals, posted = [], None
    with connect(url, open_timeout=60, max_size=None) as ws:
        for _message in ws:
            arrivals.append(time.monotonic())
            if posted is None and arrivals[-1] - arrivals[0] >= switch_after:
                posted = time.monotonic()
                prompt = {"prompt": f"the robot walks into a forest, viewer {index}"}
                httpx.post(f"{session_url}/prompts", json=prompt, headers=headers)
    status = httpx.get(session_url, headers=headers).json()
    switch_block = status["prompts"][1]["block"]
    out[index] = {
        "first": arrivals[0] - t0,
        "to_pixel": arrivals[switch_block] - posted,
        "replica": status["replica"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--switch-after", type=float, default=4)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--size", type=int, nargs=2, default=[48, 32])
    parser.add_argument("--gpus", type=float, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    rows = [
        "| viewers | time to first frame (ms, median / max) | prompt-to-pixel (ms, median / max) |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as redis_url:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        overrides = dict(
            redis_url=redis_url,
            model=args.model,
            size=args.size,
            replica_gpus=args.gpus,
            max_sessions=max(args.viewers),
            playback_speed=1.0,
        )
        deploy_shipped_app(overrides, 1)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=600)
        for n in args.viewers:
            results: dict[int, dict] = {}
            threads = [
                threading.Thread(target=viewer, args=(base, i, args.seconds, args.switch_after, results))
                for i in range(n)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            first = [r["first"] * 1e3 for r in results.values()]
            to_pixel = [r["to_pixel"] * 1e3 for r in results.values()]
            rows.append(
                f"| {n} | {statistics.median(first):.0f} / {max(first):.0f} |"
                f" {statistics.median(to_pixel):.0f} / {max(to_pixel):.0f} |"
            )
            print(rows[-1], flush=True)
        serve.shutdown()
        ray.shutdown()
    meta = [
        f"- machine: {platform.processor() or platform.machine()}, CPU only; model {args.model} at"
        f" {args.size[0]}x{args.size[1]}; one Generator replica, real-time pacing (16 fps, lead 1.5 s)",
        f"- command: `{command_line()}`",
        "- client side over loopback: POST /v1/sessions, WebSocket fMP4 (one message per block);"
        f" a new prompt posted {args.switch_after:g} s after the first block arrived",
    ]
    emit("Session service latency, client side", meta, rows, args.out)


if __name__ == "__main__":
    main()
