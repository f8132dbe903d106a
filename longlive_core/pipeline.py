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
from .session import GenerationSession
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


class VideoStream:
    """Iterate to get uint8 frame chunks [n, H, W, 3], one per block; `set_prompt` steers it live.

    overlap_decode (CUDA only): decode block k on a second CUDA stream while the DiT makes block k+1.
    Faster for whole videos, but a prompt set after chunk k then shows from block k+2, not k+1: keep it
    off for live sessions.
    """

    def __init__(
        self,
        pipe: LongLivePipeline,
        plan: VideoPlan,
        seed: int,
        size: tuple[int, int],
        overlap_decode: bool = False,
    ):
        self.pipe = pipe
        self.plan = plan
        width, height = size
        config = pipe.generation_config
        max_frames = pipe.transformer.config.rope_max_positions
        if plan.num_blocks is None or plan.num_blocks * config.block_frames > max_frames:
            # Absolute RoPE stops at 1024 latent frames (~4 min): longer or open-ended -> relative.
            config = config.with_(rope_mode="relative")
        self.session = GenerationSession(
            pipe.transformer,
            config,
            (height // VAE_STRIDE, width // VAE_STRIDE),
            pipe.text_encoder.encode(plan.switches[0]),
            seed=seed,
            runtime=pipe.runtime,
        )
        self.decoder_stream = pipe.vae.new_stream()
        on_cuda = pipe.transformer.device.type == "cuda"
        self.side_stream = torch.cuda.Stream(pipe.transformer.device) if overlap_decode and on_cuda else None
        self.blocks_generated = 0
        self.blocks_done = 0  # blocks decoded and returned
        self.frames_done = 0
        self.prompt = plan.switches[0]
        self._pending: tuple[Tensor, torch.cuda.Event | None] | None = None

    def set_prompt(self, prompt: str) -> None:
        """Takes effect at the next block boundary (KV-recache)."""
        self.session.set_prompt(self.pipe.text_encoder.encode(prompt))
        self.prompt = prompt

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def _more_to_generate(self) -> bool:
        return self.plan.num_blocks is None or self.blocks_generated < self.plan.num_blocks

    def _generate(self) -> tuple[Tensor, torch.cuda.Event | None]:
        """Queue the next block's DiT work; returns its latents [C, f, h, w] and a 'done' event."""
        if self.blocks_generated > 0 and self.blocks_generated in self.plan.switches:
            self.set_prompt(self.plan.switches[self.blocks_generated])
        with torch.no_grad():
            latents = self.session.next_block()
        self.blocks_generated += 1
        event = None
        if self.side_stream is not None:
            event = torch.cuda.Event()
            event.record()
        return latents, event

    def _decode(self, latents: Tensor, event: torch.cuda.Event | None) -> np.ndarray:
        if self.side_stream is None:
            return self._decode_on_current_stream(latents)
        with torch.cuda.stream(self.side_stream):
            self.side_stream.wait_event(event)  # this block's latents, not the block queued after it
            latents.record_stream(self.side_stream)
            return self._decode_on_current_stream(latents)

    @torch.no_grad()
    def _decode_on_current_stream(self, latents: Tensor) -> np.ndarray:
        block = latents[None].to(self.pipe.vae_dtype)
        if not self.pipe.runtime.low_memory:
            return to_uint8_frames(self.decoder_stream.decode(block))
        # One latent frame per pass: the decoders carry their state frame by frame, so the frames equal
        # those of one pass, with a third of the activations alive at once.
        parts = [self.decoder_stream.decode(block[:, :, i : i + 1]) for i in range(block.shape[2])]
        return to_uint8_frames(torch.cat(parts, dim=2))

    def __next__(self) -> np.ndarray:
        if self._pending is None:
            if not self._more_to_generate():
                raise StopIteration
            self._pending = self._generate()
        current = self._pending
        # With overlap, queue block k+1 on the GPU before decoding block k on the side stream.
        self._pending = (
            self._generate() if self.side_stream is not None and self._more_to_generate() else None
        )
        frames = self._decode(*current)
        self.blocks_done += 1
        self.frames_done += len(frames)
        return frames


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
