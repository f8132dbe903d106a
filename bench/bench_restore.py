"""Session failover cost: checkpoint size, and the pause a viewer sees when a session is restored on
another host (restore() to its first new block: text encoding, sink + recache passes, decoder priming,
then one block step).

Full size on the GPU: random DiT, Wan VAE and umT5-XXL weights (as bench_live). The restoring host is
the same process here (the checkpoint goes through its serialised bytes); across replicas add the
Redis read of those bytes.

    python bench/bench_restore.py --compile --out bench/results/restore_h100.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_live import build_pipe  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from longlive_core.checkpoint import SessionCheckpoint, tensor_bytes  # noqa: E402
from longlive_core.live import StreamingRuntime  # noqa: E402

FIRST, SWITCH = "a red robot walks through a rainy neon city", "the robot walks into a sunlit forest"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_blocks(host: StreamingRuntime, sid: str, blocks: int, switch_at: int | None = None) -> list[float]:
    """Step until the session has `blocks` blocks; returns each step's seconds (decode included)."""
    times = []
    while host.status(sid)["blocks_done"] < blocks:
        if host.status(sid)["blocks_done"] == switch_at:
            host.post_prompt(sid, SWITCH)
        sync()
        started = time.perf_counter()
        host.run_once()
        sync()
        times.append(time.perf_counter() - started)
        while host.status(sid)["buffered_blocks"]:
            host.next_chunk(sid, timeout=60)
    return times


def restore_pause(host: StreamingRuntime, blobs: dict[int, bytes], meta: dict, sid: str) -> float:
    """Deserialise, restore and make the first block: the pause a moved session's viewer sees."""
    sync()
    started = time.perf_counter()
    checkpoint = SessionCheckpoint.from_parts({**meta, "session_id": sid}, blobs)
    host.restore(checkpoint)
    while host.status(sid)["blocks_done"] == checkpoint.read_blocks:
        host.run_once()
    host.next_chunk(sid, timeout=60)
    sync()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["full", "tiny"], default="full")
    parser.add_argument("--decoder", choices=["wan", "tae"], default="wan")
    parser.add_argument("--blocks", type=int, default=30, help="blocks made before the checkpoint")
    parser.add_argument("--restores", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    pipe = build_pipe(args.preset, args.decoder, args.compile)
    size = (832, 480) if args.preset == "full" else (48, 32)
    host = StreamingRuntime(pipe, max_sessions=1, size=size, playback_speed=0, checkpoints=True)
    host.warm_up()

    host.open("origin", FIRST, seed=1)
    steps = run_blocks(host, "origin", args.blocks, switch_at=2)  # the switch at block 2 rewrites the sink
    host.post_prompt("origin", FIRST)  # a same-prompt switch (cached embedding): a recache step
    switch_step = run_blocks(host, "origin", args.blocks + 1)[0]
    checkpoint = host.checkpoint("origin")
    started = time.perf_counter()
    blobs = {b: tensor_bytes(t) for b, t in checkpoint.latents.items()}
    meta = checkpoint.meta()
    serialise_s = time.perf_counter() - started
    checkpoint_bytes = sum(map(len, blobs.values())) + len(json.dumps(meta))
    host.close("origin")
    host.run_once()

    pauses = []
    for i in range(args.restores):
        sid = f"moved-{i}"
        pauses.append(restore_pause(host, blobs, meta, sid))
        host.close(sid)
        host.run_once()
        print(f"restore {i}: {pauses[-1] * 1e3:.0f} ms", flush=True)

    step_ms = statistics.median(steps[5:]) * 1e3
    rows = [
        "| checkpoint (MB) | blocks kept | serialise (ms) | restore to first block (ms): first / median"
        " | block step (ms, median) | step with a recache (ms) |",
        "|---|---|---|---|---|---|",
        f"| {checkpoint_bytes / 1e6:.2f} | {len(blobs)} | {serialise_s * 1e3:.1f} | {pauses[0] * 1e3:.0f} /"
        f" {statistics.median(pauses[1:]) * 1e3:.0f} | {step_ms:.0f} | {switch_step * 1e3:.0f} |",
    ]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.preset == "full" else "CPU"
    meta_lines = [
        f"- device: {device}; torch {torch.__version__}; preset {args.preset}, decoder {args.decoder},"
        f" {'compiled' if args.compile else 'eager'}, bf16",
        f"- command: `{command_line()}`",
        f"- a session made {args.blocks + 1} blocks (prompt switch at block 2, so the sink is rebuilt from a"
        " 6-frame recache); its checkpoint is serialised, deserialised and restored as a new session on the"
        " same host; the pause = restore() until its first block's frames are out (text encoding of two"
        " cached prompts, sink pass, recache pass, decoder priming with 4 blocks, one block step)",
    ]
    emit("Session restore (failover): checkpoint size and viewer pause", meta_lines, rows, args.out)


if __name__ == "__main__":
    main()
