"""A mixed run on one StreamingRuntime (what a Generator replica serves), paced to real-time playback.

Sessions open, switch prompts (text-encoder cache misses), close, end on their own, and one is moved (a
checkpoint, then a restore on the same runtime, as a failover does), for `--seconds` of wall time. Counts
graphs compiled after the warm-up (the target: none), stalled blocks, and the step costs by kind: steady
steps, steps beside a prompt's encoding, steps with recaches, with a first block, with a restore.

    python bench/bench_live_mixed.py --compile --seconds 300 --out bench/results/live_mixed_tae_h200.md
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_live import build_pipe, peak_memory  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from bench.steps import GcPauses, median_max, steady_ratio, step_table  # noqa: E402
from longlive_core.engine_thread import EngineThread  # noqa: E402
from longlive_core.live import StreamingRuntime  # noqa: E402


class Viewers:
    """Reads every open session's blocks on its own thread, as a replica's streams do."""

    def __init__(self, host: StreamingRuntime):
        self.host = host
        self.readers: dict[str, threading.Thread] = {}
        self.blocks = 0

    def open(self, sid: str, prompt: str, **kwargs) -> None:
        self.host.open(sid, prompt, **kwargs)
        self._read(sid)

    def _read(self, sid: str) -> None:
        def read() -> None:
            while self.host.next_chunk(sid, timeout=120) is not None:
                self.blocks += 1

        self.readers[sid] = threading.Thread(target=read, daemon=True)
        self.readers[sid].start()

    def close(self, sid: str) -> None:
        self.host.close(sid)
        self.readers.pop(sid).join()
        self.host.forget(sid)

    def move(self, sid: str) -> int:
        """Checkpoint, close and restore the session here; returns the block it resumed at."""
        checkpoint = self.host.checkpoint(sid)
        self.close(sid)
        block = self.host.restore(checkpoint)
        self._read(sid)
        return block


def run(host: StreamingRuntime, seconds: float, switch_every: float) -> dict:
    viewers = Viewers(host)
    start = time.monotonic()
    log: list[str] = []

    def at(fraction: float) -> None:
        time.sleep(max(0.0, start + fraction * seconds - time.monotonic()))

    def mark(what: str) -> None:
        log.append(f"{time.monotonic() - start:6.1f} s: {what}")
        print(log[-1], flush=True)

    # The scenario: (fraction of the run, what, action). Prompts switch in between, to sessions in turn.
    scenario = [
        (0.0, "A opens", lambda: viewers.open("A", "a red robot walks through a rainy neon city", seed=1)),
        (0.015, "B opens", lambda: viewers.open("B", "a paper boat drifts down a gutter stream", seed=2)),
        (0.3, "B closes", lambda: viewers.close("B")),
        (0.32, "C opens", lambda: viewers.open("C", "a lighthouse on a cliff at dusk, waves below", seed=3)),
        (0.5, "A moved", lambda: mark(f"A resumes at block {viewers.move('A')}")),
        (0.7, "C closes", lambda: viewers.close("C")),
        # D ends on its own (its length), leaving A alone for the rest of the run.
        (0.72, "D opens", lambda: viewers.open("D", "a fox in snow", seed=4, max_seconds=0.2 * seconds)),
        (1.0, "the end", lambda: None),
    ]
    switches = itertools.count()
    next_switch = switch_every
    for fraction, what, action in scenario:
        while next_switch < fraction * seconds:  # the switches due before this action
            at(next_switch / seconds)
            live = [v.session_id for v in host.snapshot() if not v.ended and v.session_id in viewers.readers]
            if live:
                n = next(switches)
                host.post_prompt(live[n % len(live)], f"now the scene turns to autumn, switch {n}")
            next_switch += switch_every
        at(fraction)
        action()
        mark(what)
    ended = {v.session_id for v in host.snapshot() if v.ended}
    for sid in list(viewers.readers):
        if sid in ended:
            viewers.readers.pop(sid).join()
        else:
            viewers.close(sid)
    return {"switches": next(switches), "blocks": viewers.blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["full", "tiny"], default="full")
    parser.add_argument("--decoder", choices=["wan", "tae"], default="tae")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--switch-every", type=float, default=10)
    parser.add_argument("--max-sessions", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    on_gpu = torch.cuda.is_available() and args.preset == "full"
    pipe = build_pipe(args.preset, args.decoder, args.compile)
    size = (832, 480) if args.preset == "full" else (48, 32)
    host = StreamingRuntime(
        pipe, max_sessions=args.max_sessions, size=size, background_encoding=True, checkpoints=True
    )
    engine = EngineThread(host)  # warms up on itself, then steps
    engine.start()
    with GcPauses() as gc_pauses:
        r = run(host, args.seconds, args.switch_every)
    engine.stop()
    host.shutdown()
    steps = list(host.steps)
    two = steady_ratio(steps, 2)
    encoding = median_max(
        r.cost * 1e3 for r in steps if r.sessions == 2 and r.encoding and not (r.recaches or r.restores)
    )
    rows = [
        "| run (s) | prompt switches | blocks delivered | stalled blocks | recompiles after ready |"
        " steady steps, 2 sessions (ms, median / max) | max / median | beside an encoding, 2 sessions"
        " (ms, median / max) | encoding's cost (median / max vs steady median) | warm-up (s) |"
        " peak GPU memory (GiB) | garbage collections in the run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.seconds:g} | {r['switches']} | {r['blocks']} | {host.stalled_blocks} | {host.recompiles} |"
        f" {two[0]:.0f} / {two[1]:.0f} | {two[2]:.2f} | {encoding[0]:.0f} / {encoding[1]:.0f} |"
        f" {encoding[0] / two[0] - 1:+.1%} / {encoding[1] / two[0] - 1:+.1%} | {engine.warm_up_seconds:.0f} |"
        f" {peak_memory() if on_gpu else 'n/a'} | {gc_pauses.summary()} |",
        "",
        *step_table(steps),
    ]
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    meta = [
        f"- device: {device}; torch {torch.__version__}; preset {args.preset}, decoder {args.decoder},"
        f" {'compiled' if args.compile else 'eager'}; max_sessions {args.max_sessions}, checkpoints on;"
        " real-time pacing (16 fps), lead 1.5 s; text encoding on its own thread; decode on a second CUDA"
        " stream",
        f"- command: `{command_line()}`",
        "- scenario (fractions of the run): A opens at 0, B at 0.015; B closes at 0.3, C opens at 0.32; A is"
        " moved (checkpoint, close, restore) at 0.5; C closes at 0.7; D opens at 0.72 and ends on its own at"
        f" about 0.92; a new prompt every {args.switch_every:g} s to the live sessions in turn",
        "- a step's cost: max(DiT, decode) as they overlap on two CUDA streams (GPU event times); steady"
        " steps make only running sessions' blocks (no first block, recache, restore or encoding beside)",
    ]
    emit("Live sessions, a mixed run: recompiles, stalls, step costs", meta, rows, args.out)


if __name__ == "__main__":
    main()
