"""Is a new session's first block slow on a thread that never stepped the engine before?

Warms a one-slot StreamingRuntime up on the main thread (as replicas and benches do), then times the DiT
of a new session's first block, unpaced, three ways in turn: on the main thread, on a fresh thread, and
again on that same thread. The Wan VAE decodes; the DiT time is the step record's GPU time.

    python bench/bench_first_step_thread.py --compile --out bench/results/first_step_thread_h200.md
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_live import build_pipe  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from longlive_core.live import StreamingRuntime  # noqa: E402


def first_block(host: StreamingRuntime, name: str) -> tuple[float, float, float]:
    """(open to first block, its DiT, its host launch) in ms, for a new 2-block session."""
    opened = time.monotonic()
    host.open(name, f"a red robot walks through a rainy neon city, {name}", num_blocks=2, paced=False)
    while not host.steps or host.snapshot()[0].blocks_done == 0:
        host.run_once()
        host.drain()
    arrived = time.monotonic()
    record = host.steps[0]
    while not host.snapshot()[0].ended:
        host.run_once()
    host.drain()
    host.forget(name)
    host.steps.clear()
    return (arrived - opened) * 1e3, record.dit_seconds * 1e3, record.launch_seconds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["full", "tiny"], default="full")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    pipe = build_pipe(args.preset, "wan", args.compile)
    size = (832, 480) if args.preset == "full" else (48, 32)
    host = StreamingRuntime(pipe, 1, size=size, background_encoding=True, realtime_margin=None)
    host.warm_up()
    results = [("main thread (the warm-up's)", first_block(host, "main"))]
    worker: list[tuple[str, tuple[float, float, float]]] = []

    def on_new_thread() -> None:
        worker.append(("a new thread, its first step", first_block(host, "new")))
        worker.append(("the same thread, again", first_block(host, "again")))

    thread = threading.Thread(target=on_new_thread)
    thread.start()
    thread.join()
    results += worker
    results.append(("main thread, again", first_block(host, "main-again")))
    host.shutdown()
    rows = [
        "| where the step runs | open to first block (ms) | first block's DiT (ms) | host launch (ms) |",
        "|---|---|---|---|",
    ]
    rows += [f"| {name} | {r[0]:.0f} | {r[1]:.0f} | {r[2]:.0f} |" for name, r in results]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.preset == "full" else "CPU"
    meta = [
        f"- device: {device}; torch {torch.__version__}; preset {args.preset}, Wan VAE,"
        f" {'compiled' if args.compile else 'eager'}; one slot, unpaced; warm-up on the main thread",
        f"- command: `{command_line()}`",
    ]
    emit("A new session's first block: the warm-up's thread against a fresh one", meta, rows, args.out)


if __name__ == "__main__":
    main()
