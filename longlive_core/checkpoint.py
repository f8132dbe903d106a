"""A live session's checkpoint: what rebuilds it on another host after its host died or was drained.

Small outside the GPU (docs/DESIGN.md section 4): the prompt timeline, the frame index, the seed, the
position in its prompt-event log and clean latents of a few blocks: the first `window_blocks` (the
pass that last wrote the frame sink is among them) and the last `window_blocks + ROLLBACK_BLOCKS`
(the cache window at any block a restore may resume at). ~7 MB per session at 480x832 in bf16.

A restore resumes at the first block no client has read (up to ROLLBACK_BLOCKS before the newest), so
a viewer sees no gap: blocks made but never delivered are made again, with the same noise and prompt
switches at the same blocks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .config import GenerationConfig

ROLLBACK_BLOCKS = 4  # how far behind the newest block a restore may resume (generated, not yet read)


class CheckpointError(ValueError):
    """The checkpoint cannot be restored here (other size, missing latents, finished session)."""


@dataclass
class TimelineEntry:
    """A prompt of the session's timeline (StreamingRuntime.status shows the same fields)."""

    prompt: str
    posted_at: float
    block: int | None = None  # None: waiting for the next block boundary; -1: superseded
    applied_at: float | None = None
    event_id: str | None = None  # id in the session's prompt-event log, if it came from there


@dataclass
class SessionCheckpoint:
    session_id: str
    seed: int
    num_blocks: int | None
    blocks_done: int
    read_blocks: int  # blocks handed to a reader: the restore resumes here (no gap for the viewer)
    size: tuple[int, int]  # (width, height): a restore needs a host of the same size
    timeline: list[TimelineEntry]
    latents: dict[int, Tensor] = field(default_factory=dict)  # block -> [C, block_frames, h, w], CPU

    @property
    def last_event_id(self) -> str | None:
        """The newest prompt event this checkpoint includes: replay the log after it."""
        ids = [e.event_id for e in self.timeline if e.event_id is not None]
        return max(ids, key=_event_order, default=None)

    def resume_block(self, config: GenerationConfig, wanted: int | None = None) -> int:
        """The block a restore continues at: `wanted` (default: the first block nobody has read), moved
        into what the kept latents allow; CheckpointError when none is possible."""
        wanted = self.read_blocks if wanted is None else wanted
        window_blocks = config.window_frames // config.block_frames
        for block in range(min(max(wanted, 0), self.blocks_done), self.blocks_done + 1):
            needed = set(range(max(0, block - window_blocks), block))
            if (
                block
                and needed <= self.latents.keys()
                and self._sink_blocks(config, block) <= self.latents.keys()
            ):
                return block
            if block == 0:
                return 0  # nothing made yet: start afresh from the timeline
        raise CheckpointError(f"checkpoint of {self.session_id!r} lacks the latents to resume")

    def sink_source(self, config: GenerationConfig, block: int) -> tuple[int, int]:
        """(timeline index of the prompt, frames) of the pass that last wrote the sink before `block`: the
        first block, or a recache while the window was still filling (it recomputes the sink)."""
        source = (0, config.sink_frames)
        for index, entry in enumerate(self.timeline):
            if entry.block is None or not 0 <= entry.block < block:
                continue
            committed = entry.block * config.block_frames
            if committed == 0:
                source = (index, config.sink_frames)
            elif config.recache != "off" and committed <= config.window_frames:
                source = (index, committed)
        return source

    def _sink_blocks(self, config: GenerationConfig, block: int) -> set[int]:
        if not (config.global_sink and block * config.block_frames > config.window_frames):
            return set()
        return set(range(self.sink_source(config, block)[1] // config.block_frames))

    # -- serialisation: JSON meta + one bytes blob per block ---------------------------------------
    def meta(self) -> dict:
        first = next(iter(self.latents.values()), None)
        return {
            "session_id": self.session_id,
            "seed": self.seed,
            "num_blocks": self.num_blocks,
            "blocks_done": self.blocks_done,
            "read_blocks": self.read_blocks,
            "size": list(self.size),
            "timeline": [asdict(e) for e in self.timeline],
            "blocks": sorted(self.latents),
            "dtype": None if first is None else str(first.dtype).removeprefix("torch."),
            "shape": None if first is None else list(first.shape),
        }

    def meta_json(self) -> str:
        return json.dumps(self.meta())

    @classmethod
    def from_parts(cls, meta: dict, blobs: dict[int, bytes]) -> SessionCheckpoint:
        """Inverse of (meta(), {block: tensor_bytes(latents)}); blocks whose blob is missing are left out."""
        latents = {}
        if meta["dtype"] is not None:
            dtype = getattr(torch, meta["dtype"])
            for block in meta["blocks"]:
                if block in blobs:
                    latents[block] = tensor_from_bytes(blobs[block], dtype, meta["shape"])
        return cls(
            session_id=meta["session_id"],
            seed=meta["seed"],
            num_blocks=meta["num_blocks"],
            blocks_done=meta["blocks_done"],
            read_blocks=meta["read_blocks"],
            size=tuple(meta["size"]),
            timeline=[TimelineEntry(**e) for e in meta["timeline"]],
            latents=latents,
        )


def tensor_bytes(tensor: Tensor) -> bytes:
    """Raw bytes of a CPU tensor (any dtype, bf16 included)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _event_order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)
