"""Which frames a pass computes, which cache slots it writes and which slots each query frame sees.

Torch-free: this is docs/DESIGN.md's pass table (sections 2 and 7.2) written as code. A session's
self-attention cache has `window_frames` slots of one latent frame each: slots [0, sink_frames) hold the
frame sink, the rest are a ring of recent frames (frame j lives in slot sink + (j - sink) mod
(window - sink)). A block
writes its frames into their ring slots, which evicts exactly the frames its queries must no longer
see, so after the writes every occupied slot is visible: sink + last (window - sink - block)
committed frames + the block itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import GenerationConfig

EMPTY = -1


@dataclass(frozen=True)
class PassPlan:
    """One forward pass of one session over the frames it (re)computes."""

    query_frames: tuple[int, ...]  # latent frame indices computed by this pass, in order
    query_positions: tuple[int, ...]  # their RoPE temporal positions
    write_slots: tuple[int, ...]  # cache slot receiving each query frame's K/V
    visible_slots: tuple[tuple[int, ...], ...]  # per query frame: the slots it attends to (after writes)
    slot_positions: tuple[int, ...]  # per slot: RoPE position of the frame it holds (EMPTY if none)
    slot_frames: tuple[int, ...]  # per slot: frame index held after the writes (EMPTY if none)


class CacheLayout:
    """Host-side map of one session's cache slots to latent frames; plans every pass it makes."""

    def __init__(self, config: GenerationConfig, max_positions: int, first_frame: int = 0):
        if first_frame < 0:
            raise ValueError(f"first_frame must be >= 0, got {first_frame}")
        self.config = config
        self.max_positions = max_positions  # absolute RoPE table size
        # Frames are counted from the session's start; absolute RoPE adds first_frame (a session can
        # begin at a late index, e.g. to measure the state of a 4-minute video without generating it).
        self.first_frame = first_frame
        self.slot_frames = [EMPTY] * config.window_frames
        self.sink_start = 0  # first frame of the sink (moves only on a recache with global_sink off)

    # -- state (plain JSON-able data: state files are safetensors + JSON, longlive_core/state_file.py) --
    def state_dict(self) -> dict:
        return {
            "first_frame": self.first_frame,
            "slot_frames": list(self.slot_frames),
            "sink_start": self.sink_start,
        }

    @classmethod
    def from_state_dict(cls, config: GenerationConfig, max_positions: int, state: dict) -> CacheLayout:
        layout = cls(config, max_positions, state["first_frame"])
        if len(state["slot_frames"]) != config.window_frames:
            raise ValueError(
                f"cache layout has {len(state['slot_frames'])} slots, the window {config.window_frames}"
            )
        layout.slot_frames = list(state["slot_frames"])
        layout.sink_start = state["sink_start"]
        return layout

    # -- slot arithmetic -------------------------------------------------------------------------
    def slot_of(self, frame: int) -> int:
        sink, window = self.config.sink_frames, self.config.window_frames
        if self.sink_start <= frame < self.sink_start + sink:
            return frame - self.sink_start
        return sink + (frame - sink) % (window - sink)

    def _position(self, frame: int, slot: int, end: int) -> int:
        """RoPE position of `frame` (held in `slot`) for a pass whose newest frame is end - 1."""
        if self.config.rope_mode == "absolute":
            return self.first_frame + frame
        # Relative ('infinity'): the sink sits at 0..sink-1, the window follows consecutively.
        if slot < self.config.sink_frames:
            return slot
        return frame - max(0, end - self.config.window_frames)

    def _plan(self, frames: list[int], block_causal: bool) -> PassPlan:
        end = frames[-1] + 1
        if self.config.rope_mode == "absolute" and self.first_frame + end > self.max_positions:
            raise ValueError(
                f"latent frame {self.first_frame + end - 1} is beyond the {self.max_positions} positions of "
                "absolute RoPE; use rope_mode='relative' for longer videos"
            )
        write_slots = tuple(self.slot_of(f) for f in frames)
        for frame, slot in zip(frames, write_slots, strict=True):
            self.slot_frames[slot] = frame
        occupied = tuple(s for s, f in enumerate(self.slot_frames) if f != EMPTY)
        if block_causal:
            block = self.config.block_frames
            visible = tuple(
                tuple(s for s in occupied if self.slot_frames[s] // block <= q // block) for q in frames
            )
        else:
            visible = tuple(occupied for _ in frames)
        slot_positions = tuple(
            EMPTY if f == EMPTY else self._position(f, s, end) for s, f in enumerate(self.slot_frames)
        )
        return PassPlan(
            query_frames=tuple(frames),
            query_positions=tuple(slot_positions[s] for s in write_slots),
            write_slots=write_slots,
            visible_slots=visible,
            slot_positions=slot_positions,
            slot_frames=tuple(self.slot_frames),
        )

    def rewind(self, committed: int) -> None:
        """Forget the frames from `committed` on (blocks made and then thrown away): their slots count as
        empty, so that while the window is still filling the recache that follows sees none of them."""
        self.slot_frames = [EMPTY if f >= committed else f for f in self.slot_frames]

    # -- the passes ------------------------------------------------------------------------------
    def plan_block(self, start_frame: int) -> PassPlan:
        """The denoising passes and the commit pass of the block starting at `start_frame`.

        All of them write the block's slots and attend to sink + recent committed + the block.
        """
        frames = list(range(start_frame, start_frame + self.config.block_frames))
        return self._plan(frames, block_causal=False)

    def plan_recache(self, committed: int) -> PassPlan | None:
        """The KV-recache pass after `committed` frames, under the new prompt (None: nothing to do)."""
        if committed == 0 or self.config.recache == "off":
            return None
        return self._plan_rebuild(committed)

    def plan_restore(self, committed: int, sink_frames: int) -> tuple[PassPlan | None, PassPlan]:
        """Rebuild the cache of a session that moved here after `committed` frames, from clean latents.

        Returns (sink pass, recache pass). The sink pass recomputes frames 0..sink_frames-1 (the pass
        that last wrote the sink: the first block, or a recache while the window was filling) and is
        needed only when the sink is not among the recached frames. The recache pass is the one a prompt
        switch at this point would run (also when prompt switches do not recache): the restored session
        continues exactly like one that stayed and had its prompt re-posted here.
        """
        cfg = self.config
        if committed <= 0:
            raise ValueError(f"nothing to restore after {committed} frames")
        if not cfg.sink_frames <= sink_frames <= min(committed, cfg.window_frames):
            raise ValueError(
                f"sink_frames must be in [{cfg.sink_frames}, {cfg.window_frames}]: {sink_frames}"
            )  # noqa: E501
        sink_plan = None
        if cfg.global_sink and committed > cfg.window_frames:
            sink_plan = self._plan(list(range(sink_frames)), block_causal=cfg.recache == "block_causal")
        return sink_plan, self._plan_rebuild(committed)

    def _plan_rebuild(self, committed: int) -> PassPlan:
        cfg = self.config
        window, sink = cfg.window_frames, cfg.sink_frames
        if not cfg.global_sink:
            # Drop everything; the first recached frames become the new sink.
            start = max(0, committed - window)
            self.slot_frames = [EMPTY] * window
            self.sink_start = start
        elif committed > window:
            # Sink stays (first prompt); only the frames still in the window are recomputed.
            start = committed - (window - sink)
        else:
            start = 0  # the sink is among the recomputed frames and takes the new prompt
        return self._plan(list(range(start, committed)), block_causal=cfg.recache == "block_causal")


@dataclass(frozen=True, order=True)
class PassShape:
    """What a compiled pass specialises on: its batch, its query and key frames and its key mask."""

    batch: int
    query_frames: int
    key_frames: int  # cache slots attended to: an occupied prefix, or the whole window under a mask
    mask: str  # "none": the prefix is the keys; "keys": a key mask per row; "full": per row and query frame


def attention_shape(plans: list[PassPlan]) -> PassShape:
    """The shape of a batched pass over `plans`: while every row's occupied slots are the same prefix
    0..m-1 the pass attends to that prefix unmasked, otherwise to the whole window under a mask."""
    first = plans[0]
    prefix = tuple(range(len(first.visible_slots[0])))
    query_frames = len(first.query_frames)
    if all(v == prefix for p in plans for v in p.visible_slots):
        return PassShape(len(plans), query_frames, len(prefix), "none")
    per_row = all(len(set(p.visible_slots)) == 1 for p in plans)
    return PassShape(len(plans), query_frames, len(first.slot_frames), "keys" if per_row else "full")


def pass_shapes(config: GenerationConfig, max_sessions: int, max_positions: int) -> set[PassShape]:
    """Every shape a pass can take with up to `max_sessions` sessions in one step: the bounded list a
    warm-up compiles. One session's passes are planned through two windows (blocks, a recache after every
    block, restores with every sink source); a block step of b sessions in one phase has that phase's
    shape with batch b, and sessions in different phases attend to the whole window under a key mask."""

    def after_blocks(committed: int) -> CacheLayout:
        layout = CacheLayout(config, max_positions=10**9)
        for start in range(0, committed, config.block_frames):
            layout.plan_block(start)
        return layout

    single: set[PassShape] = set()
    block_phases: set[PassShape] = set()
    horizon = 2 * config.window_frames + config.block_frames
    for committed in range(0, horizon, config.block_frames):
        block_phases.add(attention_shape([after_blocks(committed).plan_block(committed)]))
        if (recache := after_blocks(committed).plan_recache(committed)) is not None:
            single.add(attention_shape([recache]))
        if committed:
            upto = min(committed, config.window_frames)
            sources = {config.sink_frames, *range(config.block_frames, upto + 1, config.block_frames)}
            for sink in sorted(s for s in sources if config.sink_frames <= s <= upto):
                restored = CacheLayout(config, max_positions=10**9)
                sink_plan, plan = restored.plan_restore(committed, sink)
                single.update(attention_shape([p]) for p in (sink_plan, plan) if p is not None)
    shapes = single | block_phases
    for batch in range(2, max_sessions + 1):
        shapes.update(PassShape(batch, s.query_frames, s.key_frames, s.mask) for s in block_phases)
        # sessions in different phases: the whole window under a key mask per row
        shapes.add(PassShape(batch, config.block_frames, config.window_frames, "keys"))
    return shapes
