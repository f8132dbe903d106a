"""A replica's time to ready on its first start and on a restart that finds torch.compile's on-disk caches.

Each start is a fresh process, as a restarted replica is: it builds the pipeline (random full-size
weights), then runs the StreamingRuntime's warm-up (every pass shape of 1..max_sessions sessions, a
restore) as a Generator replica does before /readyz turns ready. The first start gets empty cache folders
(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR: FX graphs, AOT autograd artifacts, autotuning, Triton
kernels); the restart reuses them. Each start then serves one paced session with a prompt switch and
reports the process's peak GPU memory.

    python bench/bench_restart.py --compile --decoder wan --low-memory --out bench/results/restart_h200.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402


def start(args: argparse.Namespace) -> dict:
    """One replica start, in this process: build, warm up, serve a session; its times and memory."""
    import torch

    from bench.bench_live import build_pipe
    from longlive_core.live import StreamingRuntime

    imported = time.monotonic()
    torch.backends.cudnn.benchmark = True
    pipe = build_pipe(args.preset, args.decoder, args.compile, args.low_memory)
    built = time.monotonic()
    size = (832, 480) if args.preset == "full" else (48, 32)
    host = StreamingRuntime(  # admission by measured step time is not what this measures
        pipe, args.max_sessions, size=size, background_encoding=True, checkpoints=True, realtime_margin=None
    )
    host.warm_up()
    ready = time.monotonic()
    host.open("viewer", "a red robot walks through a rainy neon city", max_seconds=args.seconds)
    blocks, switched = 0, False
    while True:
        host.run_once()
        if blocks >= 4 and not switched:
            host.post_prompt("viewer", "the robot walks into a sunlit forest")
            switched = True
        while (chunk := _buffered(host)) is not None:
            blocks = chunk.block + 1
        if host.snapshot()[0].ended:
            break
    host.drain()
    on_gpu = torch.cuda.is_available() and args.preset == "full"
    gib = 2**30
    return {
        "import": imported - STARTED,
        "build": built - imported,
        "warm_up": ready - built,
        "ready": ready - STARTED,
        "blocks": blocks,
        "recompiles": host.recompiles,
        "allocated": torch.cuda.max_memory_allocated() / gib if on_gpu else float("nan"),
        "reserved": torch.cuda.max_memory_reserved() / gib if on_gpu else float("nan"),
        "device": torch.cuda.get_device_name() if on_gpu else "CPU",
        "torch": torch.__version__,
    }


def _buffered(host):
    try:
        return host.next_chunk("viewer", timeout=0)
    except TimeoutError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["full", "tiny"], default="full")
    parser.add_argument("--decoder", choices=["wan", "tae"], default="wan")
    parser.add_argument("--max-sessions", type=int, default=2, help="the service's default")
    parser.add_argument("--seconds", type=float, default=10, help="video of the session served after ready")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(start(args)), flush=True)
        return
    rows = [
        "| start | compile caches | import (s) | build (s) | warm-up (s) | ready after (s) | blocks served |"
        " recompiles after ready | peak GPU memory (GiB, allocated / reserved) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    with tempfile.TemporaryDirectory() as caches:
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor",
            "TRITON_CACHE_DIR": f"{caches}/triton",
        }
        for name, state in (("first", "empty"), ("restart", "from the first start")):
            child = [sys.executable, __file__, "--child", *sys.argv[1:]]
            if "--out" in child:  # the parent writes the report
                at = child.index("--out")
                del child[at : at + 2]
            done = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
                raise SystemExit(f"the {name} start failed (exit {done.returncode})")
            r = results[name] = json.loads(lines[-1][len("RESULT ") :])
            rows.append(
                f"| {name} | {state} | {r['import']:.1f} | {r['build']:.1f} | {r['warm_up']:.1f} |"
                f" {r['ready']:.1f} | {r['blocks']} | {r['recompiles']} |"
                f" {r['allocated']:.2f} / {r['reserved']:.2f} |"
            )
            print(rows[-1], flush=True)
    first, again = results["first"], results["restart"]
    rows.append("")
    rows.append(
        f"Restart: warm-up {again['warm_up'] / first['warm_up']:.2f}x the first start's,"
        f" ready after {again['ready'] / first['ready']:.2f}x."
    )
    meta = [
        f"- device: {first['device']}; torch {first['torch']}; preset {args.preset}, decoder {args.decoder},"
        f" {'compiled' if args.compile else 'eager'}{', low_memory' if args.low_memory else ''};"
        f" max_sessions {args.max_sessions}, checkpoints on (as a Generator replica)",
        f"- command: `{command_line()}`",
        "- each start a fresh process; after ready it serves one paced session of"
        f" {args.seconds:g} s with a prompt switch at block 4; peak memory is the process's whole run",
    ]
    emit("Replica start and restart: time to ready, compile caches, peak memory", meta, rows, args.out)


if __name__ == "__main__":
    main()
