"""Why steady steps of live sessions vary: a GPU profile of paced sessions on one StreamingRuntime.

Runs `--sessions` paced live sessions (as a replica serves them) and, once they are steady, records for
`--profile-seconds`:
- every GPU kernel (torch.profiler, CUDA activity only, so the host is not slowed by op recording): per
  step on the DiT's stream, its span, the time the stream ran kernels, its idle gaps (the host launching
  too late) and the kernel time by kind (GEMM, attention, Triton/elementwise, copies);
- each thread's CPU time (from /proc), to see which threads compete with the engine thread for the GIL;
- the SM clock and board power (NVML, every 20 ms).
Steps are told apart on the DiT's stream by the pacing gaps between them (longer than `--gap-ms`).

    python bench/bench_step_profile.py --compile --decoder tae --out bench/results/step_profile_tae_h200.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_live import build_pipe  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from bench.steps import step_table  # noqa: E402
from longlive_core.engine_thread import EngineThread  # noqa: E402
from longlive_core.live import StreamingRuntime  # noqa: E402


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "cutlass", "cublas", "sm90_xmma", "nvjet", "matmul")):
        return "GEMM"
    if any(k in lowered for k in ("flash", "fmha", "attention", "cudnn", "sdpa")):
        return "attention"
    if "memcpy" in lowered or "memset" in lowered or "copy" in lowered:
        return "copies"
    if lowered.startswith("triton") or "fused" in lowered:
        return "Triton / fused elementwise"
    return "other (aten) kernels"


def thread_cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) of every thread of this process, by name."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid)) or Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return out


class GpuSampler(threading.Thread):
    """SM clock (MHz) and power (W) every 20 ms through NVML."""

    def __init__(self):
        super().__init__(daemon=True, name="nvml")
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.samples: list[tuple[float, int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            clock = self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM)
            power = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3
            self.samples.append((time.monotonic(), clock, power))


def steps_from_kernels(kernels: list[tuple[int, float, float, str]], gap_ms: float) -> list[dict]:
    """kernels: (stream, start us, end us, name). The DiT's stream is the one with the most kernel
    time; its kernels split into steps at gaps over gap_ms."""
    busy: dict[int, float] = defaultdict(float)
    for stream, start, end, _ in kernels:
        busy[stream] += end - start
    main = max(busy, key=busy.get)
    ordered = sorted((k for k in kernels if k[0] == main), key=lambda k: k[1])
    others = sorted((k for k in kernels if k[0] != main), key=lambda k: k[1])
    steps, current = [], [ordered[0]]
    for k in ordered[1:]:
        if k[1] - current[-1][2] > gap_ms * 1e3:
            steps.append(current)
            current = []
        current.append(k)
    steps.append(current)
    out = []
    for step in steps:
        span = (step[-1][2] - step[0][1]) / 1e3
        ran = sum(e - s for _, s, e, _ in step) / 1e3
        gaps = [(b[1] - a[2]) / 1e3 for a, b in zip(step, step[1:], strict=False)]
        kinds: dict[str, float] = defaultdict(float)
        for _, s, e, name in step:
            kinds[kernel_kind(name)] += (e - s) / 1e3
        lo, hi = step[0][1], step[-1][2]
        beside = sum(max(0.0, min(e, hi) - max(s, lo)) for _, s, e, _ in others) / 1e3
        out.append(
            {
                "start_us": lo,
                "span": span,
                "ran": ran,
                "idle": span - ran,
                "gaps_over_1ms": sum(1 for g in gaps if g > 1),
                "longest_gap": max(gaps, default=0.0),
                "kernels": len(step),
                "kinds": dict(kinds),
                "other_streams": beside,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", choices=["wan", "tae"], default="tae")
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--settle-seconds", type=float, default=6, help="run before the profile starts")
    parser.add_argument("--profile-seconds", type=float, default=15)
    parser.add_argument("--gap-ms", type=float, default=20)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    pipe = build_pipe("full", args.decoder, args.compile)
    host = StreamingRuntime(pipe, max_sessions=args.sessions, size=(832, 480), background_encoding=True)
    engine = EngineThread(host)
    engine.start()
    seconds = args.settle_seconds + args.profile_seconds + 10
    readers = []
    for i in range(args.sessions):
        sid = f"viewer-{i}"
        prompt = f"a red robot walks through a rainy neon city, viewer {i}"
        host.open(sid, prompt, seed=i, max_seconds=seconds)

        def read(sid: str = sid) -> None:
            while host.next_chunk(sid, timeout=120) is not None:
                pass

        readers.append(threading.Thread(target=read, daemon=True, name=f"reader-{i}"))
        readers[-1].start()
    time.sleep(args.settle_seconds)
    sampler = GpuSampler()
    sampler.start()
    host.steps.clear()
    cpu_before, wall_before = thread_cpu_seconds(), time.monotonic()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        time.sleep(args.profile_seconds)
    cpu_after, wall = thread_cpu_seconds(), time.monotonic() - wall_before
    records = list(host.steps)
    sampler.stop.set()
    for reader in readers:
        reader.join()
    engine.stop()

    kernels = stream_kernels(prof)
    steps = steps_from_kernels(kernels, args.gap_ms)
    spans = sorted(s["span"] for s in steps)
    median = statistics.median(spans)
    rows = [
        "| step (on the DiT's stream) | span (ms) | kernels ran (ms) | idle inside (ms) | gaps > 1 ms |"
        " longest gap (ms) | kernels | GEMM | attention | Triton / fused | other | copies |"
        " other streams' kernels beside (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # Whole steps have the same kernel count (one shape); other segments are late steps run back to back
    # (merged: no pacing gap between them) or stray work, listed apart.
    whole = statistics.mode(s["kernels"] for s in steps if s["span"] > median * 0.6)
    big = [s for s in steps if s["kernels"] == whole]
    merged = [s for s in steps if s["kernels"] != whole]
    by_span = sorted(big, key=lambda s: s["span"])
    picks = [("fastest", by_span[0]), ("median", by_span[len(by_span) // 2])]
    picks += [(f"slowest {i + 1}", s) for i, s in enumerate(reversed(by_span[-3:]))]
    for label, s in picks:
        k = s["kinds"]
        rows.append(
            f"| {label} | {s['span']:.0f} | {s['ran']:.0f} | {s['idle']:.0f} | {s['gaps_over_1ms']} |"
            f" {s['longest_gap']:.1f} | {s['kernels']} | {k.get('GEMM', 0):.0f} |"
            f" {k.get('attention', 0):.0f} |"
            f" {k.get('Triton / fused elementwise', 0):.0f} | {k.get('other (aten) kernels', 0):.0f} |"
            f" {k.get('copies', 0):.0f} | {s['other_streams']:.0f} |"
        )
    spans_big = [s["span"] for s in big]
    ran_big = [s["ran"] for s in big]
    rows += [
        "",
        f"Steps profiled: {len(big)}; span median / max {statistics.median(spans_big):.0f} /"
        f" {max(spans_big):.0f} ms ({max(spans_big) / statistics.median(spans_big):.2f}); kernel time"
        f" median / max {statistics.median(ran_big):.0f} / {max(ran_big):.0f} ms"
        f" ({max(ran_big) / statistics.median(ran_big):.2f}); {whole} kernels each. Other segments"
        f" (steps without a pacing gap between them, or stray work): "
        + ", ".join(f"{s['kernels']} kernels in {s['span']:.0f} ms ({s['idle']:.0f} idle)" for s in merged)
        + ".",
        "",
        "| thread | CPU time in the profile window (s) | share of wall |",
        "|---|---|---|",
    ]
    for name in sorted(cpu_after, key=lambda n: cpu_before.get(n, 0) - cpu_after[n]):
        used = cpu_after[name] - cpu_before.get(name, 0.0)
        if used > 0.05:
            rows.append(f"| {name} | {used:.2f} | {used / wall:.0%} |")
    clocks = [c for _, c, _ in sampler.samples]
    power = [p for _, _, p in sampler.samples]
    if clocks:
        rows += [
            "",
            f"SM clock (MHz) min / median / max: {min(clocks)} / {statistics.median(clocks):.0f} /"
            f" {max(clocks)};"
            f" power (W) median / max: {statistics.median(power):.0f} / {max(power):.0f}",
        ]
    rows += ["", "Step records of the profile window:", "", *step_table(records)]
    meta = [
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; decoder {args.decoder},"
        f" {'compiled' if args.compile else 'eager'}; {args.sessions} paced sessions (16 fps, lead 1.5 s)",
        f"- command: `{command_line()}`",
        f"- profile: {args.profile_seconds:g} s after {args.settle_seconds:g} s of run; CUDA activity only;"
        f" steps split at gaps over {args.gap_ms:g} ms on the DiT's stream",
    ]
    emit("Where a live step's time goes: the GPU profile of paced sessions", meta, rows, args.out)


def stream_kernels(prof: torch.profiler.profile) -> list[tuple[int, float, float, str]]:
    """(stream, start us, end us, name) of every GPU kernel and copy, from the profiler's trace."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    return [
        (int(e["args"].get("stream", e.get("tid", 0))), e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]


if __name__ == "__main__":
    main()
