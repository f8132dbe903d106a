"""Failover as a viewer sees it: the silence on the client's stream when the session's replica is killed.

Local Ray Serve, a redis-server and the shipped app (serve_config.yaml, its args overridden below) with
`--replicas` Generator replicas; one paced session (real time) streamed over HTTP. `--every` seconds after
the stream came back from the last kill, the replica that holds the session is killed (ray.kill, as a
crash); the silence is the longest time without a piece of video on the client that begins within 10 s
of the kill (the wait for the move, or a stall after it). The whole stream is then decoded: every frame
once, in order, or the run fails.

    python bench/bench_failover.py --replicas 2 --out bench/results/failover_2_replicas_cpu.md   # CPU, tiny
    python bench/bench_failover.py --replicas 1 --out bench/results/failover_1_replica_cpu.md
    python bench/bench_failover.py --model random-1.3b --compile --replicas 2 --replica-gpus 0.5 \\
        --out bench/results/failover_2_replicas_h200.md   # two replicas sharing one GPU
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402

PROMPT = "a red robot walks through a rainy neon city"
AFTER_KILL_S = 10.0  # after a kill, gaps are silence (the wait for the move, a stall after it)


def kill_owner(replica_id: str) -> None:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica_id in a["name"]]
    if len(names) != 1:
        raise RuntimeError(f"replica {replica_id!r}: actors {names}")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def silence(arrivals: list[float], kill: float, window: float) -> float:
    """The longest time without a piece from the kill until `window` seconds after it: the wait for the
    first piece, or a stall after it (a restored session that paused again counts)."""
    times = [kill, *(t for t in arrivals if t > kill)]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if a < kill + window]
    return max(gaps, default=float("inf"))


def decoded_frames(data: bytes) -> list[int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        return [round(f.pts * f.time_base * 16) for f in container.decode(video=0)]


def run(args: argparse.Namespace) -> dict:
    import httpx
    import ray

    from tests.serving import local_service

    overrides = dict(
        model=args.model,
        compile=args.compile,
        replica_gpus=args.replica_gpus,
        max_sessions=2,
        jobs=False,
        rate_limit_per_minute=0,
    )
    if args.model == "tiny-random":  # nothing compiles on the CPU: one batch size is warm-up enough
        overrides.update(size=[48, 32], warm_up_sessions=1)
    with local_service(overrides, args.replicas) as (base, ready_s, _):
        seconds = (args.every + 30) * (args.kills + 1)  # video: room for restarts of a replica
        body = {"prompt": PROMPT, "seed": 1, "max_seconds": seconds}
        session = httpx.post(f"{base}/v1/sessions", json=body, timeout=120).raise_for_status().json()
        headers = {"Authorization": f"Bearer {session['token']}"}
        pieces: list[tuple[float, bytes]] = []

        def watch() -> None:
            with httpx.stream("GET", session["stream_url"], headers=headers, timeout=600) as response:
                response.raise_for_status()
                for piece in response.iter_raw():
                    pieces.append((time.monotonic(), piece))

        viewer = threading.Thread(target=watch, daemon=True)
        viewer.start()
        kills: list[float] = []
        owners: list[str] = []
        url = f"{base}/v1/sessions/{session['session_id']}"
        for _ in range(args.kills):
            # `every` seconds of streaming after the stream came back from the last kill
            while kills and not any(t > kills[-1] for t, _ in pieces):
                time.sleep(0.05)
            time.sleep(args.every)
            owner = httpx.get(url, headers=headers, timeout=60).raise_for_status().json()["replica"]
            owners.append(owner)
            kills.append(time.monotonic())
            kill_owner(owner)
        viewer.join(seconds * 3 + 600)
        final = httpx.get(url, headers=headers, timeout=60).raise_for_status().json()

    arrivals = [t for t, _ in pieces]
    silences = [silence(arrivals, kill, AFTER_KILL_S) for kill in kills]
    frames = decoded_frames(b"".join(p for _, p in pieces))
    if frames != list(range(len(frames))) or len(frames) != final["frames_done"]:
        raise RuntimeError(f"the stream lost or repeated frames: {len(frames)} decoded, status {final}")
    normal = [
        b - a
        for a, b in zip(arrivals, arrivals[1:], strict=False)
        if all(not kill - 1 < a < kill + AFTER_KILL_S for kill in kills)
    ]
    return {
        "silences": silences,
        "normal_gap": max(normal, default=0.0),
        "frames": len(frames),
        "ready_s": ready_s,
        "owners": owners,
        "final_replica": final["replica"],
        "ray": ray.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--replica-gpus", type=float, default=0.0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--every", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run(args)
    silences = result["silences"]
    rows = [
        "| replicas | kills | silence after a kill (s): median / max | each | longest gap away from kills (s)"
        " | frames (all decoded, in order) |",
        "|---|---|---|---|---|---|",
        f"| {args.replicas} | {len(silences)} | {statistics.median(silences):.2f} / {max(silences):.2f} |"
        f" {', '.join(f'{s:.2f}' for s in silences)} | {result['normal_gap']:.2f} | {result['frames']} |",
    ]
    device = "CPU" if args.replica_gpus == 0 else "GPU"
    if args.replica_gpus:
        import torch

        gpu = torch.cuda.get_device_name()
        device = f"{gpu}, {args.replica_gpus:g} GPU per replica; torch {torch.__version__}"
    meta = [
        f"- device: {device}; ray {result['ray']}; model {args.model},"
        f" {'compiled' if args.compile else 'eager'}; host {platform.processor() or platform.machine()}",
        f"- command: `{command_line()}`",
        f"- one paced session (real time, lead 1.5 s); its replica killed {args.every:g} s after each"
        f" recovery; the service was ready {result['ready_s']:.0f} s after the deploy; owners killed:"
        f" {', '.join(result['owners'])}; it ended on {result['final_replica']}",
    ]
    emit("Failover: the silence a viewer sees when the session's replica is killed", meta, rows, args.out)


if __name__ == "__main__":
    main()
