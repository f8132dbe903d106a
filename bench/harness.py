"""What every bench builds, warms up and times, so that one figure has one definition.

- model: the full-size DiT with random weights drawn on the GPU (speed does not depend on values);
- decoder: the Wan VAE always channels_last_3d and, with compile, its per-block step compiled; TAEW2_1;
- DiT block: the median over steady blocks (window full: blocks 5.. after the first), CUDA-event timed;
- recache: a step with a prompt switch minus a block (median of 3, after one warm-up switch);
- decode: a steady 3-latent-frame block (12 frames), after a first block and one steady block warmed up;
- end to end: DiT and decode in series on one stream.

`Size.tiny` runs the same code on the CPU with the tiny model (the benches' smoke test).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from longlive_core import CausalWanTransformer, Engine, GenerationConfig
from longlive_core.config import RuntimeConfig
from longlive_core.models.tae_wan import TAEConfig, TinyVideoDecoder, init_random_tae
from longlive_core.models.vae_wan import VAEConfig, WanVAEDecoder, init_random_weights
from longlive_core.random_models import random_transformer

VIDEO_FRAMES_PER_BLOCK = 12  # 3 latent frames x 4 (the first block gives 9)
STEADY_FROM = 4  # the window (sink + 9) is full from the 5th block on: later blocks all cost the same
RECACHE_REPEATS = 3


@dataclass(frozen=True)
class Size:
    """The model and video size a bench runs at."""

    preset: str  # ModelConfig preset of the DiT
    latent: tuple[int, int]  # latent (height, width)
    vae: str  # VAEConfig preset
    tae: str  # TAEConfig preset

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.preset != "tiny" else "cpu")


FULL = Size("wan2.1-t2v-1.3b", (60, 104), "wan2.1", "taew2_1")  # 480 x 832 video
TINY = Size("tiny", (4, 6), "tiny", "tiny")
SIZES = {"full": FULL, "tiny": TINY}
LATENT_SIZE = FULL.latent


def build_model(dtype: torch.dtype, size: Size = FULL) -> CausalWanTransformer:
    """The DiT with random weights drawn on its device (speed does not depend on the values)."""
    return random_transformer(size.preset, size.device).to(dtype).eval()


def build_decoder(name: str, compile: bool, size: Size = FULL) -> nn.Module:
    """The decoder every end-to-end figure uses: the Wan VAE channels_last_3d (compiled per block with
    `compile`), or TAEW2_1, bf16 on the GPU (float32 on the CPU)."""
    dtype = torch.bfloat16 if size.device.type == "cuda" else torch.float32
    if name == "tae":
        tae = init_random_tae(TinyVideoDecoder(TAEConfig.from_name(size.tae)), seed=0)
        return tae.to(size.device, dtype).eval()
    vae = init_random_weights(WanVAEDecoder(VAEConfig.from_name(size.vae)), seed=0).to(size.device, dtype)
    vae.eval().to_channels_last()
    return vae.compile_block() if compile else vae


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn` takes: CUDA events on the GPU (the work it launched is done at the end)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def gpu_kernel_seconds(fn: Callable[[], object]) -> float:
    """Summed GPU time of the kernels and copies `fn` runs (CUPTI). Over the step's wall time it is the
    share of the step the GPU works: what CUDA graphs (which remove launch gaps only) could at most save
    is the rest."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e6


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """Peak GPU memory allocated since `reset_peak` (nan on the CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else math.nan


def random_prompts(model: CausalWanTransformer, n: int = 2, tokens: int = 40) -> list[Tensor]:
    gen = torch.Generator(device=model.device).manual_seed(0)
    return [torch.randn(tokens, model.config.text_dim, device=model.device, generator=gen) for _ in range(n)]


@dataclass
class EngineRun:
    """The timings of `run_engine`, in seconds; `outputs`: the first blocks of session s0 (float32)."""

    engine: Engine
    first_s: float  # the first block, cold (compilation included)
    block_s: float  # median steady block
    recache_s: float  # median step with a switch in s0, minus a block
    peak_gib: float
    block_times: list[float] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def run_engine(
    model: CausalWanTransformer,
    runtime: RuntimeConfig,
    prompts: list[Tensor],
    size: Size = FULL,
    sessions: int = 1,
    blocks: int = 12,
    first_frame: int = 0,
    keep: int = 0,
    config: GenerationConfig | None = None,
) -> EngineRun:
    """`sessions` sessions batched in one Engine: a cold first block, `blocks` timed blocks, then
    1 + RECACHE_REPEATS steps that switch s0's prompt."""
    reset_peak()
    engine = Engine(model, config or GenerationConfig(), size.latent, max_sessions=sessions, runtime=runtime)
    for i in range(sessions):
        engine.add_session(f"s{i}", prompts[0], seed=i, first_frame=first_frame)
    outputs: list[Tensor] = []

    def step() -> None:
        out = engine.step()
        if len(outputs) < keep:
            outputs.append(out["s0"].float().clone())

    first = timed(step)
    times = [timed(step) for _ in range(blocks)]
    block = statistics.median(times[STEADY_FROM:] or times)
    switched = []
    for k in range(1 + RECACHE_REPEATS):  # the first switch warms up the recache shapes
        engine.set_prompt("s0", prompts[(k + 1) % len(prompts)])
        switched.append(timed(step))
    recache = statistics.median(switched[1:]) - block
    return EngineRun(engine, first, block, recache, peak_gib(), times, outputs)


def decode(stream, block: Tensor, split: bool = False) -> Tensor:
    """One block through a decoder stream; `split`: one latent frame per pass (low-memory mode)."""
    if not split:
        return stream.decode(block)
    return torch.cat([stream.decode(block[:, :, i : i + 1]) for i in range(block.shape[2])], dim=2)


def decode_block_seconds(decoder: nn.Module, size: Size = FULL, repeats: int = 4) -> float:
    """Median seconds to decode one steady block of 3 latent frames (12 video frames)."""
    block = torch.randn(1, 16, 3, *size.latent, device=size.device, dtype=next(decoder.parameters()).dtype)
    stream = decoder.new_stream()
    with torch.no_grad():
        stream.decode(block)  # the first block (9 frames): its own graph when compiled
        stream.decode(block)  # the first steady block compiles the steady graph
        times = [timed(lambda: stream.decode(block)) for _ in range(repeats)]
    return statistics.median(times)


def fps(block_s: float, sessions: int = 1) -> float:
    """Video frames per second of `sessions` sessions making a block each in `block_s`."""
    return sessions * VIDEO_FRAMES_PER_BLOCK / block_s


def run_end_to_end(
    engine: Engine, decoder: nn.Module, blocks: int, split: bool = False
) -> tuple[float, list[float]]:
    """(median steady step, all step times): each step is the engine's step and the decode of every
    session's block, in series on one stream. The engine's sessions are already added."""
    streams: dict[str, object] = {}

    def step() -> None:
        with torch.no_grad():
            for sid, latents in engine.step().items():
                stream = streams.setdefault(sid, decoder.new_stream())
                decode(stream, latents[None].to(next(decoder.parameters()).dtype), split)

    times = [timed(step) for _ in range(blocks)]
    return statistics.median(times[STEADY_FROM:] or times), times
