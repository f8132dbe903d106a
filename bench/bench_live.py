"""Live sessions on one StreamingRuntime (what a Generator replica serves), paced to real-time playback.

Measures, server side, what a viewer sees: time from opening a session to its first block of frames,
prompt-to-pixel latency (post of a new prompt, text encoding included, to the first block under it sent),
prompt-to-screen (post to the time that block's first frame is due on a screen that plays from the first
block's arrival, as the web page does: the buffered lead included), and stalls (blocks that arrive after
their playback time). `--send-lead none` sends blocks as they are made (main before instant steering).
Full size: random DiT, Wan VAE or TAEW2_1 and umT5-XXL weights on the GPU; --preset tiny runs the
tiny-random model on the CPU.

    python bench/bench_live.py --compile --sessions 1 2 --out bench/results/live_h100.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402
from bench.steps import GcPauses, steady_ratio, step_table  # noqa: E402
from longlive_core import LongLivePipeline  # noqa: E402
from longlive_core.config import RuntimeConfig  # noqa: E402
from longlive_core.engine_thread import EngineThread  # noqa: E402
from longlive_core.live import CapacityError, StreamingRuntime  # noqa: E402
from longlive_core.schedule import FPS, video_frames  # noqa: E402

PREROLL_S = 0.75  # one block of playback buffered before the player starts


def build_pipe(preset: str, decoder: str, compile: bool, low_memory: bool = False) -> LongLivePipeline:
    """low_memory: as a low_memory replica runs (RuntimeConfig.low_memory: per-frame decode, the text
    encoder's weights on the host between prompts, as LongLivePipeline.from_pretrained offloads them)."""
    if preset == "tiny":
        runtime = RuntimeConfig(low_memory=low_memory)
        return LongLivePipeline.from_pretrained("tiny-random", device="cpu", decoder=decoder, runtime=runtime)
    from bench.bench_low_memory import build_umt5_xxl
    from bench.harness import build_decoder, build_model

    runtime = RuntimeConfig(attention="cudnn", compile=compile, low_memory=low_memory)
    encoder = build_umt5_xxl()
    encoder.cache_size = 64
    if low_memory:
        encoder.offload("cuda")
    return LongLivePipeline(
        build_model(torch.bfloat16),
        encoder,
        build_decoder(decoder, compile).eval(),
        None,
        runtime=runtime,
    )


def run(
    host: StreamingRuntime, sessions: int, seconds: float, switch_after: float, stagger: float
) -> dict | None:
    stop = threading.Event()
    received: dict[str, list[tuple[int, float]]] = {}
    opened: dict[str, float] = {}
    ids = [f"viewer-{sessions}-{stagger:g}-{i}" for i in range(sessions)]
    refused: list[str] = []

    def read(sid: str) -> None:
        while (chunk := host.next_chunk(sid, timeout=120)) is not None:
            received[sid].append((chunk.block, time.monotonic()))

    marks: dict[str, dict[str, float]] = {sid: {} for sid in ids}  # first time each phase was seen

    def watch() -> None:
        while not stop.is_set():
            now = time.monotonic()
            for view in host.snapshot():
                seen = marks.get(view.session_id)
                if seen is None:
                    continue
                for name, reached in (
                    ("live", view.phase.value != "queued"),
                    ("launched", view.blocks_made > 0),
                    ("delivered", view.blocks_done > 0),
                ):
                    if reached:
                        seen.setdefault(name, now)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    readers = []
    for i, sid in enumerate(ids):
        time.sleep(max(0.0, start + i * stagger - time.monotonic()))
        received[sid] = []
        opened[sid] = time.monotonic()
        try:
            host.open(
                sid, f"a red robot walks through a rainy neon city, viewer {i}", seed=i, max_seconds=seconds
            )
        except CapacityError as err:  # admission by measured step time: report it, run the others
            print(f"{sid} refused: {err}", flush=True)
            refused.append(sid)
            continue
        readers.append(threading.Thread(target=read, args=(sid,), daemon=True))
        readers[-1].start()
    ids = [sid for sid in ids if sid not in refused]
    time.sleep(max(0.0, start + (sessions - 1) * stagger + switch_after - time.monotonic()))
    posted = time.monotonic()
    for i, sid in enumerate(ids):
        host.post_prompt(sid, f"the robot walks into a sunlit forest, new prompt for viewer {i}")
    for reader in readers:
        reader.join()
    stop.set()
    watcher.join()

    if not ids:
        return None
    for sid in ids:  # where a first block's time goes: encoding + join, the DiT launch, the decode
        print(sid, {k: round((v - opened[sid]) * 1e3) for k, v in marks[sid].items()}, flush=True)
    first, to_pixel, to_screen, stalls, remakes, late_remade = [], [], [], 0, 0, 0
    for sid in ids:
        times = dict(received[sid])
        first.append(times[0] - opened[sid])
        status = host.status(sid)
        switch_block = status["prompts"][1]["block"]
        to_pixel.append(times[switch_block] - posted)

        def on_screen(block: int, start: float = times[0]) -> float:  # a screen playing from block 0's
            return start + video_frames(block * host.config.block_frames) / FPS  # arrival (the page)

        to_screen.append(max(times[switch_block], on_screen(switch_block)) - posted)
        for r in status["replacements"]:
            remakes += 1
            late_remade += sum(b in times and times[b] > on_screen(b) for b in (r["block"], r["block"] + 1))
        play = times[0] + PREROLL_S  # the player starts one block after the first arrives
        for block, at in received[sid][1:]:  # block k must arrive before the frames before it are played
            if at > play + video_frames(block * host.config.block_frames) / FPS:
                stalls += 1
    for sid in ids:
        host.forget(sid)
    return {
        "step": steady_ratio(host.steps, len(ids)),
        "first": (statistics.median(first) * 1e3, max(first) * 1e3),
        "first_later": max(first[1:], default=float("nan")) * 1e3,
        "to_pixel": (statistics.median(to_pixel) * 1e3, max(to_pixel) * 1e3),
        "to_screen": (statistics.median(to_screen) * 1e3, max(to_screen) * 1e3),
        "remakes": remakes,
        "late_remade": late_remade,
        "stalls": stalls,
        "blocks": sum(len(r) - 1 for r in received.values()),
        "recompiles": host.recompiles,
        "refused": len(refused),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["full", "tiny"], default="full")
    parser.add_argument("--decoder", choices=["wan", "tae"], default="wan")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--switch-after", type=float, default=5, help="wall seconds before the prompt post")
    parser.add_argument("--stagger", type=float, nargs="+", default=[0.0], help="seconds between opens")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--low-memory", action="store_true", help="as a low_memory replica runs")
    parser.add_argument(
        "--send-lead", default="0.5", help="seconds of video sent ahead of playback; none: sent as made"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    send_lead = None if args.send_lead == "none" else float(args.send_lead)
    torch.backends.cudnn.benchmark = True
    pipe = build_pipe(args.preset, args.decoder, args.compile, args.low_memory)
    on_gpu = torch.cuda.is_available() and args.preset == "full"
    rows = [
        "| sessions | opened every (s) | first block (ms, median / max) | first block of a later session (ms)"
        " | prompt-to-pixel (ms, median / max) | prompt-to-screen (ms, median / max) | remakes (blocks late"
        " after one) | stalled blocks after the first | step: DiT + decode (ms,"
        " median / max, steady steps) | max / median | recompiles after ready | warm-up (s) | refused |"
        " peak GPU memory (GiB, allocated / reserved) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    breakdown: list[str] = []
    size = (832, 480) if args.preset == "full" else (48, 32)
    for n in args.sessions:
        host = StreamingRuntime(
            pipe, max_sessions=n, size=size, background_encoding=True, send_lead_seconds=send_lead
        )
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        engine = EngineThread(host)  # warms up on itself, then steps
        engine.start()
        warm = engine.warm_up_seconds
        for stagger in args.stagger if n > 1 else [0.0]:
            with GcPauses() as gc_pauses:
                r = run(host, n, args.seconds, args.switch_after, stagger)
            if r is None:
                rows.append(f"| {n} | {stagger:g} | every session refused for capacity |")
                continue
            rows.append(
                f"| {n} | {stagger:g} | {r['first'][0]:.0f} / {r['first'][1]:.0f} | {r['first_later']:.0f} |"
                f" {r['to_pixel'][0]:.0f} / {r['to_pixel'][1]:.0f} | {r['to_screen'][0]:.0f} /"
                f" {r['to_screen'][1]:.0f} | {r['remakes']} ({r['late_remade']}) |"
                f" {r['stalls']} of {r['blocks']} |"
                f" {r['step'][0]:.0f} / {r['step'][1]:.0f} | {r['step'][2]:.2f} |"
                f" {r['recompiles']} | {warm:.0f} | {r['refused']} | {peak_memory() if on_gpu else 'n/a'} |"
            )
            print(rows[-1], flush=True)
            title = f"Steps of the {n}-session run, opened every {stagger:g} s:"
            breakdown += [
                "",
                title,
                "",
                *step_table(host.steps),
                "",
                f"Garbage collections: {gc_pauses.summary()}",
            ]
            host.steps.clear()
        engine.stop()
        host.shutdown()
        del host
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    meta = [
        f"- device: {device}; torch {torch.__version__}; preset {args.preset}, decoder {args.decoder},"
        f" {'compiled' if args.compile else 'eager'}{', low_memory' if args.low_memory else ''}; real-time"
        f" pacing (16 fps), lead 1.5 s, sent {args.send_lead} s ahead; text encoding on its own thread;"
        " decode on a second CUDA stream",
        f"- command: `{command_line()}`",
        f"- each session {args.seconds:g} s of video; a new prompt (text-encoder cache miss) posted"
        f" {args.switch_after:g} s after the sessions opened; first block = open() to its frames on the host;"
        f" a stall = a block arriving after its playback time (player starts {PREROLL_S} s after block 0)",
        "- a step's cost: max(DiT, decode) as they overlap on two CUDA streams (GPU event times); steady"
        " steps make only running sessions' blocks (no first block, recache or prompt encoding beside them)",
    ]
    emit("Live sessions, server side: first frame, prompt-to-pixel, stalls", meta, rows + breakdown, args.out)


def peak_memory() -> str:
    gib = 2**30
    return f"{torch.cuda.max_memory_allocated() / gib:.2f} / {torch.cuda.max_memory_reserved() / gib:.2f}"


if __name__ == "__main__":
    main()
