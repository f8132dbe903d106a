"""LongLivePipeline: text in, video frames out, diffusers-style, streaming block by block."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .config import GenerationConfig, RuntimeConfig
from .models.transformer_causal_wan import CausalWanTransformer
from .random_models import random_full_size, tiny_random
from .schedule import PromptChange, blocks_for_seconds, switch_block, validate_schedule, video_frames
from .text_encoder import TextEncoder
from .weights import ModelFiles, load_transformer, merge_lora_file, resolve_model_files

logger = logging.getLogger(__name__)

Decoder = Literal["wan", "tae"]
VAE_STRIDE = 8  # pixels per latent pixel
DEFAULT_SIZES = {"tiny-random": (112, 64)}  # (width, height); real models: 832x480
REAL_MODEL_SIZE = (832, 480)


def check_size(size: tuple[int, int], multiple: int = 16) -> tuple[int, int]:
    """(width, height) of the video: both positive multiples of VAE stride x patch size."""
    width, height = size
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise ValueError(f"size must be WIDTHxHEIGHT with both multiples of {multiple}, got {width}x{height}")
    return width, height


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).cpu().numpy()


@dataclass(frozen=True)
class VideoPlan:
    """What a request turns into: the number of blocks and the block each prompt starts at."""

    num_blocks: int | None  # None: until stopped
    switches: dict[int, str]  # block index -> prompt applied before it (block 0: the first prompt)
    block_frames: int  # latent frames per block

    @property
    def num_frames(self) -> int | None:
        """Video frames of the whole request (None when open-ended)."""
        return None if self.num_blocks is None else video_frames(self.num_blocks * self.block_frames)


def decode_block(decoder_stream, latents: Tensor, dtype: torch.dtype, per_frame: bool) -> Tensor:
    """The one decode path: a block's clean latents [C, F, h, w] -> video [1, 3, T, H, W] in [-1, 1],
    continuing `decoder_stream`'s video. per_frame (low-memory mode): one latent frame per pass; the
    decoders carry their state frame by frame, so the frames equal those of one pass, with a third of the
    activations alive at once."""
    block = latents[None].to(dtype)
    if not per_frame:
        return decoder_stream.decode(block)
    return torch.cat([decoder_stream.decode(block[:, :, i : i + 1]) for i in range(block.shape[2])], dim=2)


class VideoStream:
    """Iterate to get uint8 frame chunks [n, H, W, 3], one per block; `set_prompt` steers it live.

    A view of one unpaced session on a StreamingRuntime of its own, which iterating steps.
    overlap_decode (CUDA only): decode block k on a second CUDA stream while the DiT makes block k+1.
    Faster for whole videos, but a prompt set after chunk k then shows from block k+2, not k+1: keep it
    off to steer a stream by hand.
    """

    SESSION_ID = "stream"

    def __init__(
        self,
        pipe: LongLivePipeline,
        plan: VideoPlan,
        seed: int,
        size: tuple[int, int],
        overlap_decode: bool = False,
    ):
        from .live import StreamingRuntime

        self.plan = plan
        config = pipe.generation_config
        max_frames = pipe.transformer.config.rope_max_positions
        if plan.num_blocks is None or plan.num_blocks * config.block_frames > max_frames:
            # Absolute RoPE stops at 1024 latent frames (~4 min): longer or open-ended -> relative.
            config = config.with_(rope_mode="relative")
        self.runtime = StreamingRuntime(
            pipe,
            max_sessions=1,
            size=size,
            playback_speed=0,
            idle_timeout_s=float("inf"),
            config=config,
            overlap_decode=overlap_decode,
        )
        switches = dict(plan.switches)
        self.prompt = switches.pop(0)
        self.runtime.open(
            self.SESSION_ID, self.prompt, seed, num_blocks=plan.num_blocks, scheduled=switches, paced=False
        )
        self.blocks_done = 0  # blocks decoded and returned
        self.frames_done = 0

    def set_prompt(self, prompt: str) -> None:
        """Takes effect at the next block boundary (KV-recache)."""
        self.runtime.post_prompt(self.SESSION_ID, prompt)
        self.prompt = prompt

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        while True:
            try:
                chunk = self.runtime.next_chunk(self.SESSION_ID, timeout=0)
            except TimeoutError:
                if not self.runtime.run_once(max_wait=0):
                    self.runtime.drain()
                continue
            if chunk is None:
                status = self.runtime.status(self.SESSION_ID)
                if status["error"]:
                    raise RuntimeError(f"generation failed: {status['error']}")
                raise StopIteration
            self.blocks_done += 1
            self.frames_done += len(chunk.frames)
            return chunk.frames


class LongLivePipeline:
    """Text-to-long-video. `__call__` returns a whole video, `stream()` yields it block by block."""

    def __init__(
        self,
        transformer: CausalWanTransformer,
        text_encoder: TextEncoder,
        vae: nn.Module,
        generation_config: GenerationConfig | None = None,
        default_size: tuple[int, int] = REAL_MODEL_SIZE,
        runtime: RuntimeConfig | None = None,
    ):
        self.runtime = runtime or RuntimeConfig()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.generation_config = generation_config or GenerationConfig()
        self.default_size = default_size

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        model: str = "tiny-random",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        decoder: Decoder = "wan",
        generation_config: GenerationConfig | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> LongLivePipeline:
        """`tiny-random` or `random-1.3b` (built in, random weights; the second full size, for benchmarks),
        a model name (`longlive-1.3b`), a local directory or a hub repo id.

        Defaults: CUDA with bf16 when available, else CPU with float32. Raises MissingWeightsError
        (with the `longlive download` hint) when weights are not on disk.
        """
        if decoder not in ("wan", "tae"):
            raise ValueError(f"decoder must be 'wan' or 'tae', got {decoder!r}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if model == "tiny-random":
            transformer, text_encoder, vae = tiny_random(decoder)
            default_size = DEFAULT_SIZES[model]
        elif model == "random-1.3b":
            transformer, text_encoder, vae = random_full_size(decoder, device, dtype)
            default_size = REAL_MODEL_SIZE
        else:
            files = resolve_model_files(model)
            transformer = load_transformer(files, device, dtype)
            # Low-memory mode loads the encoder to the host: it must never be whole on a 24 GB card.
            encoder_device = "cpu" if runtime is not None and runtime.low_memory else device
            text_encoder = _load_text_encoder(files, transformer.config.text_len, encoder_device, dtype)
            vae = _load_decoder(decoder, files, device, dtype)
            default_size = REAL_MODEL_SIZE
        vae = vae.to(device, dtype).eval()
        if runtime is not None and runtime.compile and decoder == "wan":
            vae.to_channels_last().compile_block()  # 290 -> 113 ms per block on an H100
        if runtime is not None and runtime.low_memory and device.type != "cpu":
            text_encoder.offload(device)
        else:
            text_encoder.to(device)
        return cls(
            transformer.to(device, dtype).eval(),
            text_encoder,
            vae,
            generation_config,
            default_size,
            runtime,
        )

    def load_lora_weights(self, path: str | Path) -> int:
        """Merge a LoRA (`lora.pt`, LongLive's format: a released one or one `longlive_core.training`
        saved) into the DiT; returns the layers merged."""
        return merge_lora_file(self.transformer, Path(path))

    # -- requests ----------------------------------------------------------------------------------
    def check_size(self, size: tuple[int, int] | None) -> tuple[int, int]:
        return check_size(size or self.default_size, VAE_STRIDE * self.transformer.config.patch_size[1])

    def plan(
        self, prompt: str | None, schedule: list[PromptChange] | None, seconds: float | None
    ) -> VideoPlan:
        """Validate a request: a prompt or a schedule (first entry at 0 s), and the length in seconds."""
        if (prompt is None) == (schedule is None):
            raise ValueError("give either prompt or schedule")
        entries = schedule if schedule is not None else [PromptChange(at=0, prompt=prompt)]
        block_frames = self.generation_config.block_frames
        if seconds is None:
            validate_schedule(entries, float("inf"))
            num_blocks = None
        else:
            validate_schedule(entries, seconds)
            num_blocks = blocks_for_seconds(seconds, block_frames)
        switches: dict[int, str] = {}
        for entry in entries:
            switches[switch_block(entry.at, block_frames)] = entry.prompt  # later entries win a block
        return VideoPlan(num_blocks, switches, block_frames)

    def stream(
        self,
        prompt: str | None = None,
        schedule: list[PromptChange] | None = None,
        seconds: float | None = None,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        overlap_decode: bool = False,
    ) -> VideoStream:
        """Frame chunks as they are made; `seconds=None` runs until the caller stops iterating."""
        plan = self.plan(prompt, schedule, seconds)
        return VideoStream(self, plan, seed, self.check_size(size), overlap_decode)

    def __call__(
        self,
        prompt: str | None = None,
        schedule: list[PromptChange] | None = None,
        seconds: float = 5.0,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        callback: Callable[[VideoStream, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """The whole video as uint8 frames [T, H, W, 3]; `callback(stream, chunk)` after each block."""
        stream = self.stream(prompt, schedule, seconds, seed, size, overlap_decode=True)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if callback is not None:
                callback(stream, chunk)
        return np.concatenate(chunks)


def _load_text_encoder(files: ModelFiles, text_len: int, device, dtype) -> TextEncoder:
    if files.text_encoder.is_dir():
        return TextEncoder.from_pretrained(files.text_encoder.parent, device, dtype, text_len=text_len)
    return TextEncoder.from_original(files.text_encoder, files.tokenizer, device, dtype, text_len=text_len)


def _load_decoder(decoder: Decoder, files: ModelFiles, device, dtype) -> nn.Module:
    if decoder == "tae":
        from .models.tae_wan import load_tae_decoder

        if files.tae is None:
            raise FileNotFoundError("the tiny decoder taew2_1.pth was not found beside the model")
        return load_tae_decoder(files.tae, device=device, dtype=dtype)
    from .models.vae_wan import load_vae_decoder

    return load_vae_decoder(files.vae, device=device, dtype=dtype)
