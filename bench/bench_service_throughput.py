"""Unpaced aggregate throughput of N sessions: the whole service over HTTP against the engine alone.

Both parts run the same model, decoder, size, compile setting and batch (N sessions of one replica),
unpaced (playback_speed 0), each session `--seconds` of video from one prompt:
- engine: the StreamingRuntime that a Generator builds, in-process, with its EngineThread; frames are
  read on the host as they are made (no Ray, no Redis, no fMP4, no HTTP);
- service: local Ray Serve, a redis-server and the shipped app with one Generator replica on the GPU;
  every session's chunked fMP4 stream is read over loopback HTTP.
Aggregate FPS = frames of all sessions / (last frame's arrival - the first session's open). Each part is a
child process, so its GPU memory and threads are its own; the engine runs first and fills the on-disk
compile cache that the service's warm-up then reuses.

    python bench/bench_service_throughput.py --compile --out bench/results/service_throughput_h200.md
    python bench/bench_service_throughput.py --model tiny-random --sessions 2 --seconds 3   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402

PROMPT = "a red robot walks through a rainy neon city, take {}"


def engine_part(args: argparse.Namespace) -> dict:
    import torch

    from longlive_core import LongLivePipeline
    from longlive_core.config import RuntimeConfig
    from longlive_core.engine_thread import EngineThread
    from longlive_core.live import StreamingRuntime

    pipe = LongLivePipeline.from_pretrained(args.model, runtime=RuntimeConfig(compile=args.compile))
    host = StreamingRuntime(
        pipe, background_encoding=True, max_sessions=args.sessions, size=args.size, playback_speed=0
    )
    engine = EngineThread(host)
    engine.start()
    arrivals: dict[str, list[tuple[float, int]]] = {}

    def read(sid: str) -> None:
        while (chunk := host.next_chunk(sid, timeout=600)) is not None:
            arrivals[sid].append((time.monotonic(), len(chunk.frames)))

    opened = time.monotonic()
    readers = []
    for i in range(args.sessions):
        sid = f"take-{i}"
        arrivals[sid] = []
        host.open(sid, PROMPT.format(i), seed=i, max_seconds=args.seconds)
        readers.append(threading.Thread(target=read, args=(sid,), daemon=True))
        readers[-1].start()
    for reader in readers:
        reader.join()
    engine.stop()
    result = summarise(list(arrivals.values()), opened)
    result["warm_up_s"] = engine.warm_up_seconds
    result["recompiles"] = host.recompiles
    result["torch"] = torch.__version__
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return result


def service_part(args: argparse.Namespace) -> dict:
    import httpx
    import ray
    import torch

    from tests.serving import local_service

    on_gpu = torch.cuda.is_available()
    overrides = dict(
        model=args.model,
        size=list(args.size),
        compile=args.compile,
        replica_gpus=1 if on_gpu else 0,
        max_sessions=args.sessions,
        playback_speed=0,
        realtime_admission=False,  # unpaced: real-time capacity is not the question here
        jobs=False,
        rate_limit_per_minute=0,
    )
    with local_service(overrides, 1, num_gpus=1 if on_gpu else 0) as (base, ready_s, _):
        sessions = []
        for i in range(args.sessions):
            body = {"prompt": PROMPT.format(i), "seed": i, "max_seconds": args.seconds}
            if i == 0:
                opened = time.monotonic()
            response = httpx.post(f"{base}/v1/sessions", json=body, timeout=120)
            response.raise_for_status()
            sessions.append(response.json())
        arrivals: list[list[tuple[float, int]]] = [[] for _ in sessions]
        readers = [
            threading.Thread(target=read_stream, args=(session, arrivals[i]), daemon=True)
            for i, session in enumerate(sessions)
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(args.seconds * 20 + 600)
        statuses = [status_of(base, s) for s in sessions]
    result = summarise_bytes(arrivals, opened, statuses)
    result["ready_s"] = ready_s
    result["ray"] = ray.__version__
    return result


def read_stream(session: dict, out: list[tuple[float, int]]) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {session['token']}"}
    with httpx.stream("GET", session["stream_url"], headers=headers, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            out.append((time.monotonic(), len(chunk)))


def status_of(base: str, session: dict) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {session['token']}"}
    return httpx.get(f"{base}/v1/sessions/{session['session_id']}", headers=headers, timeout=60).json()


def summarise(arrivals: list[list[tuple[float, int]]], opened: float) -> dict:
    """arrivals: per session, (time, frames) of each chunk."""
    frames = [sum(n for _, n in a) for a in arrivals]
    per_session = [n / (a[-1][0] - a[0][0]) for n, a in zip(frames, arrivals, strict=True)]
    return {
        "frames": frames,
        "aggregate_fps": sum(frames) / (max(a[-1][0] for a in arrivals) - opened),
        "per_session_fps": per_session,
        "first_block_s": [a[0][0] - opened for a in arrivals],
    }


def summarise_bytes(arrivals: list[list[tuple[float, int]]], opened: float, statuses: list[dict]) -> dict:
    """The service's stream gives bytes, not frames: each session's frame count comes from its status."""
    frames = [s["frames_done"] for s in statuses]
    return {
        "frames": frames,
        "aggregate_fps": sum(frames) / (max(a[-1][0] for a in arrivals) - opened),
        "per_session_fps": [n / (a[-1][0] - a[0][0]) for n, a in zip(frames, arrivals, strict=True)],
        "first_block_s": [a[0][0] - opened for a in arrivals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-1.3b")
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30, help="video per session")
    parser.add_argument("--size", type=int, nargs=2, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--part", choices=["engine", "service"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.size = tuple(args.size or ((48, 32) if args.model == "tiny-random" else (832, 480)))
    if args.part is not None:  # a child: one part, its result as the last line of stdout
        result = engine_part(args) if args.part == "engine" else service_part(args)
        print(json.dumps(result), flush=True)
        return

    results = {}
    for part in ("engine", "service"):
        child = [sys.executable, *sys.argv, "--part", part]
        run = subprocess.run(child, stdout=subprocess.PIPE, text=True, check=True)
        results[part] = json.loads(run.stdout.strip().splitlines()[-1])
        print(part, results[part], flush=True)
    engine, service = results["engine"], results["service"]
    rows = [
        "| path | aggregate FPS | per-session FPS (median / min) | first block (ms, median / max) | frames |",
        "|---|---|---|---|---|",
    ]
    paths = (("engine (StreamingRuntime, in-process)", engine), ("service (Ray Serve, HTTP fMP4)", service))
    for name, r in paths:
        first = [s * 1e3 for s in r["first_block_s"]]
        rows.append(
            f"| {name} | {r['aggregate_fps']:.1f} | {statistics.median(r['per_session_fps']):.1f} /"
            f" {min(r['per_session_fps']):.1f} | {statistics.median(first):.0f} / {max(first):.0f} |"
            f" {sum(r['frames'])} |"
        )
    ratio = service["aggregate_fps"] / engine["aggregate_fps"]
    rows.append(f"| **service / engine** | **{ratio:.1%}** | | | |")
    meta = [
        f"- device: {engine['device']}; torch {engine['torch']}, ray {service['ray']}; model {args.model}"
        f" (Wan VAE), {args.size[0]}x{args.size[1]}, {'compiled' if args.compile else 'eager'};"
        f" {args.sessions} sessions in one replica, unpaced",
        f"- command: `{command_line()}`",
        f"- each session {args.seconds:g} s of video; engine warm-up {engine['warm_up_s']:.0f} s, recompiles"
        f" after it {engine['recompiles']}; service ready after {service['ready_s']:.0f} s (with warm-up)",
        f"- host: {platform.processor() or platform.machine()}",
    ]
    emit("Unpaced throughput: the service against the engine alone", meta, rows, args.out)


if __name__ == "__main__":
    main()
