"""LiveHost: many live sessions on one Engine, paced to playback, each with a bounded chunk buffer.

The object a Generator replica wraps (and tests use without Ray). One thread owns the engine and calls
`run_once()` in a loop; other threads only queue commands (open, prompt, close) and read chunks, so the
engine is never touched concurrently. Commands apply at the next block boundary.

Pacing: a live session is generated at most `lead_seconds` ahead of its playback clock (which starts
when its first block is out), so a prompt posted now shows up on screen within about a block. A slow
client never stalls the others: its buffer keeps the newest `buffer_blocks` blocks and drops older ones.
`playback_speed=0` turns pacing off (batch work runs as fast as the device allows).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .checkpoint import ROLLBACK_BLOCKS, CheckpointError, SessionCheckpoint, TimelineEntry
from .engine import Engine
from .pipeline import VAE_STRIDE, LongLivePipeline, to_uint8_frames
from .schedule import FPS, block_of_frame, blocks_for_seconds, video_frames


class CapacityError(RuntimeError):
    """The host runs as many sessions as it may."""


class UnknownSessionError(KeyError):
    """No such session on this host (never opened, or ended and forgotten)."""


@dataclass(frozen=True)
class Chunk:
    """One block of video for one session."""

    block: int  # block index in the session
    first_frame: int  # index of its first video frame in the session's video
    frames: np.ndarray  # uint8 [n, H, W, 3]
    prompt: int  # index into the session's prompt timeline of the prompt it was made under


@dataclass
class LiveSession:
    session_id: str
    seed: int
    num_blocks: int | None
    prompts: list[TimelineEntry]
    buffer: deque[Chunk]
    decoder_stream: object = None
    blocks_done: int = 0
    frames_done: int = 0
    playback_start: float | None = None  # clock time of its first block
    last_read: float = 0.0
    dropped_blocks: int = 0
    finished: bool = False
    joined: bool = False
    error: str | None = None
    waiting: list[int] = field(default_factory=list)  # timeline indices posted, not yet applied
    scheduled: dict[int, str] = field(default_factory=dict)  # block -> prompt applied right before it
    paced: bool = True  # False: batch work, as fast as the device allows
    read_blocks: int = 0  # blocks handed to a reader (a restore elsewhere resumes here)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> clean latents, for checkpoints
    replay: dict[int, int] = field(default_factory=dict)  # restored: block -> timeline index applied there


class LiveHost:
    def __init__(
        self,
        pipe: LongLivePipeline,
        max_sessions: int,
        size: tuple[int, int] | None = None,
        lead_seconds: float = 1.5,
        buffer_blocks: int = 16,
        idle_timeout_s: float = 60.0,
        playback_speed: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        checkpoints: bool = False,
    ):
        """checkpoints: keep the clean latents `checkpoint()` needs for live (paced) sessions."""
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if playback_speed < 0:
            raise ValueError(f"playback_speed must be >= 0 (0: unpaced), got {playback_speed}")
        self.pipe = pipe
        self.width, self.height = pipe.check_size(size)
        # Live sessions are open-ended: relative RoPE, as the reference's 'infinity' config.
        self.config = pipe.generation_config.with_(rope_mode="relative")
        latent_size = (self.height // VAE_STRIDE, self.width // VAE_STRIDE)
        self.engine = Engine(pipe.transformer, self.config, latent_size, max_sessions, runtime=pipe.runtime)
        self.max_sessions = max_sessions
        self.lead_seconds = lead_seconds
        self.buffer_blocks = buffer_blocks
        self.idle_timeout_s = idle_timeout_s
        self.playback_speed = playback_speed
        self.clock = clock
        self.checkpoints = checkpoints
        self.window_blocks = self.config.window_frames // self.config.block_frames
        self.sessions: dict[str, LiveSession] = {}
        self.step_seconds: deque[float] = deque(maxlen=1000)  # block steps incl. decode, newest last
        self.frames_made = 0  # video frames made for any session since the host started (metrics)
        self._commands: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # commands queued / chunks produced

    # -- requests (any thread) ---------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Sessions that hold or will hold a cache slot."""
        with self._lock:
            return self._live_count()

    def open(
        self,
        session_id: str,
        prompt: str,
        seed: int = 0,
        max_seconds: float | None = None,
        scheduled: dict[int, str] | None = None,
        paced: bool = True,
    ) -> None:
        """Queue a new session; raises CapacityError when the host is full, ValueError on bad input.

        scheduled: prompts applied exactly before given blocks (a batch job's schedule); paced=False runs
        the session as fast as the device allows, whatever its playback clock."""
        if not prompt or not prompt.strip():
            raise ValueError("prompt must not be empty")
        num_blocks = None
        if max_seconds is not None:
            if max_seconds <= 0:
                raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
            num_blocks = blocks_for_seconds(max_seconds, self.config.block_frames)
        now = self.clock()
        with self._lock:
            if session_id in self.sessions:
                raise ValueError(f"session {session_id!r} exists")
            if self._live_count() >= self.max_sessions:
                raise CapacityError(f"host runs its maximum of {self.max_sessions} sessions")
            session = LiveSession(
                session_id, seed, num_blocks, [TimelineEntry(prompt, now, block=0)], deque(), last_read=now
            )
            session.scheduled = dict(scheduled or {})
            session.paced = paced
            self.sessions[session_id] = session
            self._commands.append(lambda: self._join(session))
            self._wake.notify_all()

    def post_prompt(self, session_id: str, prompt: str, event_id: str | None = None) -> int:
        """Queue a prompt switch; returns its index in the session's timeline. event_id: its id in the
        session's prompt-event log (a checkpoint records how far the log was read)."""
        if not prompt or not prompt.strip():
            raise ValueError("prompt must not be empty")
        with self._lock:
            session = self._get(session_id)
            if session.finished:
                raise ValueError(f"session {session_id!r} has ended")
            session.prompts.append(TimelineEntry(prompt, self.clock(), event_id=event_id))
            index = len(session.prompts) - 1
            session.waiting.append(index)
            self._wake.notify_all()
            return index

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self._get(session_id)
            if not session.finished:
                session.finished = True
                self._commands.append(lambda: self._leave(session))
            self._wake.notify_all()

    def next_chunk(self, session_id: str, timeout: float | None = None) -> Chunk | None:
        """The session's oldest buffered block; None once it has ended and its buffer is empty.
        Raises TimeoutError when nothing arrives within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            session = self._get(session_id)
            while True:
                session.last_read = self.clock()
                if session.buffer:
                    chunk = session.buffer.popleft()
                    session.read_blocks = chunk.block + 1
                    return chunk
                if session.finished:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no block of session {session_id!r} within {timeout} s")
                self._wake.wait(remaining)

    def status(self, session_id: str) -> dict:
        with self._lock:
            s = self._get(session_id)
            s.last_read = self.clock()
            return {
                "session_id": s.session_id,
                "state": _state(s),
                "blocks_done": s.blocks_done,
                "frames_done": s.frames_done,
                "buffered_blocks": len(s.buffer),
                "dropped_blocks": s.dropped_blocks,
                "seed": s.seed,
                "error": s.error,
                "prompts": [
                    {
                        "prompt": p.prompt,
                        "block": p.block,
                        "posted_at": p.posted_at,
                        "applied_at": p.applied_at,
                    }
                    for p in s.prompts
                ],
            }

    def checkpoint(self, session_id: str) -> SessionCheckpoint:
        """What rebuilds the session on another host (see longlive_core.checkpoint)."""
        with self._lock:
            s = self._get(session_id)
            return SessionCheckpoint(
                session_id=s.session_id,
                seed=s.seed,
                num_blocks=s.num_blocks,
                blocks_done=s.blocks_done,
                read_blocks=s.read_blocks,
                size=(self.width, self.height),
                timeline=[replace(p) for p in s.prompts],
                latents=dict(s.kept),
            )

    def restore(
        self,
        checkpoint: SessionCheckpoint,
        from_frame: int | None = None,
        recovered: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Continue a session that ran on another host; returns the block it resumes at.

        from_frame: the first video frame the viewer still needs (default: after the last block read).
        recovered: (prompt, event id) of the session's log events posted after the checkpoint was written.
        Its cache is rebuilt from the checkpoint's latents (one recache pass, plus a sink pass once the
        window slid), its decoder primed with the latest blocks, and prompt switches made after the resume
        point are made again at the same blocks. Prompts not applied in the checkpoint and the recovered
        ones then take effect one block each, in order: the old host may have applied them already (a
        viewer saw it), so none is superseded by another one that came back with it.
        Raises CheckpointError, CapacityError."""
        cp = checkpoint
        if tuple(cp.size) != (self.width, self.height):
            raise CheckpointError(
                f"checkpoint is for {cp.size[0]}x{cp.size[1]}, this host makes {self.width}x{self.height}"
            )
        if cp.num_blocks is not None and cp.blocks_done >= cp.num_blocks:
            raise CheckpointError(f"session {cp.session_id!r} had finished")
        wanted = None if from_frame is None else block_of_frame(from_frame, self.config.block_frames)
        block = cp.resume_block(self.config, wanted)
        now = self.clock()
        timeline = [replace(e) for e in cp.timeline]
        timeline += [TimelineEntry(prompt, now, event_id=event_id) for prompt, event_id in recovered]
        session = LiveSession(cp.session_id, cp.seed, cp.num_blocks, timeline, deque(), last_read=now)
        session.blocks_done, session.read_blocks = block, block
        session.frames_done = video_frames(block * self.config.block_frames) if block else 0
        pending = []
        for index, entry in enumerate(timeline):
            if entry.block is None:
                pending.append(index)
            elif entry.block > block:
                session.replay[entry.block] = index  # made again at the same block
                entry.block, entry.applied_at = None, None
        # After every block a switch is made at (again): a prompt applied at the resume block keeps it.
        taken = [*session.replay, *(e.block for e in timeline if e.block == block)]
        next_block = max(taken) + 1 if taken else block
        for offset, index in enumerate(pending):
            session.replay[next_block + offset] = index
        with self._lock:
            if cp.session_id in self.sessions:
                raise ValueError(f"session {cp.session_id!r} exists")
            if self._live_count() >= self.max_sessions:
                raise CapacityError(f"host runs its maximum of {self.max_sessions} sessions")
            self.sessions[cp.session_id] = session
            self._commands.append(lambda: self._join_restored(session, cp))
            self._wake.notify_all()
        return block

    def forget(self, session_id: str) -> None:
        """Drop an ended session's record."""
        with self._lock:
            if self._get(session_id).finished:
                del self.sessions[session_id]

    # -- the engine thread -------------------------------------------------------------------------
    def run_once(self, max_wait: float = 0.05) -> bool:
        """Apply queued commands, then make one block for every session if any of them is due.
        Waits up to `max_wait` seconds for work; returns whether a block step ran."""
        with self._lock:
            if not self._commands and not self._any_due():
                self._wake.wait(min(max_wait, self._seconds_until_due()))
            self._close_idle()
            commands, self._commands = list(self._commands), deque()
        for command in commands:
            command()
        with self._lock:  # after the commands: a session restored just now makes its switch at this block
            switches = self._take_prompt_switches()
        for session, index in switches:
            embeds = self.pipe.text_encoder.encode(session.prompts[index].prompt)
            self.engine.set_prompt(session.session_id, embeds)
        with self._lock:
            if not self._any_due():
                return False
        started = time.perf_counter()
        with torch.no_grad():
            latents = self.engine.step()
        self._deliver(latents)
        self.step_seconds.append(time.perf_counter() - started)
        return True

    def warm_up(self, blocks: int = 14, sessions: int = 1) -> None:
        """Run throwaway sessions through first blocks, a full window, recaches while the window fills and
        at every phase of the window ring, and (with checkpoints) a restore: compiles and autotunes the
        shapes of `sessions` concurrent sessions, so neither a switch nor a failover compiles later."""
        speed, self.playback_speed = self.playback_speed, 0.0
        idle, self.idle_timeout_s = self.idle_timeout_s, float("inf")  # compiling can take minutes
        ids = [f"__warm_up_{i}__" for i in range(sessions)]
        try:
            for sid in ids:
                self.open(sid, "warm up")
            filling = range(1, self.window_blocks + 1)  # recaches of 3..window frames (sink passes too)
            for b in range(blocks):
                if b in filling or blocks - 8 <= b < blocks - 4:  # then four ring phases
                    for sid in ids:
                        self.post_prompt(sid, f"warm up, switched at {b}")
                self.run_once()
                for sid in ids:
                    while self.status(sid)["buffered_blocks"]:
                        self.next_chunk(sid, timeout=0)
            if self.checkpoints:
                moved = [replace(self.checkpoint(sid), session_id=f"{sid}moved") for sid in ids]
                for sid in ids:
                    self.close(sid)
                self.run_once()
                for checkpoint in moved:
                    self.restore(checkpoint)
                    ids.append(checkpoint.session_id)
                self.run_once()
            for sid in ids:
                self.close(sid)
            self.run_once()
            for sid in ids:
                self.forget(sid)
            self.step_seconds.clear()  # compile-time steps say nothing about serving
        finally:
            self.playback_speed, self.idle_timeout_s = speed, idle

    # -- internals ---------------------------------------------------------------------------------
    def _live_count(self) -> int:
        return sum(not s.finished for s in self.sessions.values())

    def _get(self, session_id: str) -> LiveSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSessionError(session_id) from None

    def _join(self, session: LiveSession, prompt: int = 0) -> None:
        if session.finished:
            return
        embeds = self.pipe.text_encoder.encode(session.prompts[prompt].prompt)
        self.engine.add_session(session.session_id, embeds, seed=session.seed, num_blocks=session.num_blocks)
        session.decoder_stream = self.pipe.vae.new_stream()
        session.joined = True

    def _join_restored(self, session: LiveSession, cp: SessionCheckpoint) -> None:
        if session.finished:
            return
        block = session.blocks_done
        # The prompt in effect: the last applied at or before the resume block (a switch made at that very
        # block is part of the restored state: the restore's recache pass is that switch's recache).
        current = max(
            i for i, e in enumerate(session.prompts) if e.block is not None and 0 <= e.block <= block
        )
        if block == 0:
            self._join(session, current)
            return
        sink_index, sink_frames = cp.sink_source(self.config, block)
        bf, window = self.config.block_frames, self.config.window_frames
        recent_blocks = [cp.latents[b] for b in range(max(0, block - self.window_blocks), block)]
        recent = torch.cat(recent_blocks, dim=1)
        sink_latents = None
        if self.config.global_sink and block * bf > window:
            sink_latents = torch.cat([cp.latents[b] for b in range(sink_frames // bf)], dim=1)
        encode = self.pipe.text_encoder.encode
        self.engine.restore_session(
            session.session_id,
            encode(session.prompts[current].prompt),
            session.seed,
            block,
            recent[:, -window:],
            sink_prompt_embeds=encode(session.prompts[sink_index].prompt),
            sink_latents=sink_latents,
            num_blocks=session.num_blocks,
        )
        # The decoder carries a few frames of state: prime a fresh one with the latest blocks (block by
        # block: the shapes it already runs, no new compile).
        session.decoder_stream = self.pipe.vae.new_stream()
        with torch.no_grad():
            for latents in recent_blocks:
                session.decoder_stream.decode(latents[None].to(self.pipe.vae_dtype))
        session.kept = {b: cp.latents[b] for b in cp.latents if b < block}
        session.joined = True

    def _leave(self, session: LiveSession) -> None:
        if session.joined:
            self.engine.remove_session(session.session_id)
            session.joined = False
        session.decoder_stream = None

    def _playback_due(self, session: LiveSession, now: float) -> bool:
        if session.playback_start is None:
            return True
        played = (now - session.playback_start) * self.playback_speed
        return video_frames(session.blocks_done * self.config.block_frames) / FPS < played + self.lead_seconds

    def _any_due(self) -> bool:
        """Live (paced) sessions set the step rate whenever there are any: a step makes a block for every
        session, so batch sessions then move at playback speed. Alone, batch sessions run flat out."""
        now = self.clock()
        active = [s for s in self.sessions.values() if s.joined and not s.finished]
        paced = [s for s in active if s.paced and self.playback_speed]
        if paced:
            return any(self._playback_due(s, now) for s in paced)
        return bool(active)

    def _seconds_until_due(self) -> float:
        waits = []
        for s in self.sessions.values():
            if (
                s.joined
                and not s.finished
                and s.playback_start is not None
                and self.playback_speed
                and s.paced
            ):
                ahead = video_frames(s.blocks_done * self.config.block_frames) / FPS - self.lead_seconds
                waits.append(s.playback_start + ahead / self.playback_speed - self.clock())
        return max(0.0, min(waits, default=3600.0))

    def _take_prompt_switches(self) -> list[tuple[LiveSession, int]]:
        """The latest waiting prompt of each joined session (earlier ones are superseded: one recache)."""
        switches = []
        for s in self.sessions.values():
            if s.replay:  # a restored session makes its switches again first, at their blocks
                if s.joined and not s.finished and s.blocks_done in s.replay:
                    index = s.replay.pop(s.blocks_done)
                    s.prompts[index].block = s.blocks_done
                    s.prompts[index].applied_at = self.clock()
                    switches.append((s, index))
                continue
            if s.joined and not s.finished and s.blocks_done in s.scheduled:
                s.prompts.append(TimelineEntry(s.scheduled.pop(s.blocks_done), self.clock()))
                s.waiting.append(len(s.prompts) - 1)
            if s.joined and not s.finished and s.waiting:
                index = s.waiting[-1]
                for skipped in s.waiting[:-1]:
                    s.prompts[skipped].block = -1  # superseded before any block was made under it
                s.waiting.clear()
                s.prompts[index].block = s.blocks_done
                s.prompts[index].applied_at = self.clock()
                switches.append((s, index))
        return switches

    def _close_idle(self) -> None:
        """End sessions nobody reads; forget ended ones nobody asked about for as long."""
        now = self.clock()
        for s in list(self.sessions.values()):
            if now - s.last_read <= self.idle_timeout_s:
                continue
            if s.finished and not s.joined:
                del self.sessions[s.session_id]
            elif not s.finished and s.playback_start is not None:
                s.finished = True
                s.error = f"closed: no client read for {self.idle_timeout_s:g} s"
                self._commands.append(lambda s=s: self._leave(s))

    def _deliver(self, latents: dict[str, torch.Tensor]) -> None:
        decoded, kept = {}, {}
        for sid, block in latents.items():
            session = self.sessions.get(sid)
            if session is None or session.decoder_stream is None:
                continue
            with torch.no_grad():
                video = session.decoder_stream.decode(block[None].to(self.pipe.vae_dtype))
            decoded[sid] = to_uint8_frames(video)
            if self.checkpoints and session.paced:  # the DiT's dtype: what a recache reads anyway
                kept[sid] = block.to("cpu", self.pipe.transformer.dtype)
        now = self.clock()
        with self._lock:
            for sid, frames in decoded.items():
                s = self.sessions[sid]
                applied = [
                    i
                    for i, p in enumerate(s.prompts)
                    if p.block is not None and 0 <= p.block <= s.blocks_done
                ]
                chunk = Chunk(s.blocks_done, s.frames_done, frames, max(applied, default=0))
                if len(s.buffer) >= self.buffer_blocks:
                    s.buffer.popleft()
                    s.dropped_blocks += 1
                s.buffer.append(chunk)
                if sid in kept:
                    s.kept[s.blocks_done] = kept[sid]
                    oldest = s.blocks_done - self.window_blocks - ROLLBACK_BLOCKS
                    if oldest >= self.window_blocks:  # the first blocks stay: the sink was made of them
                        s.kept.pop(oldest, None)
                s.blocks_done += 1
                s.frames_done += len(frames)
                self.frames_made += len(frames)
                if s.playback_start is None:
                    s.playback_start = now
                if s.num_blocks is not None and s.blocks_done >= s.num_blocks:
                    s.finished = True
                    s.joined = False  # the engine drops it at its last block
                    s.decoder_stream = None
            self._wake.notify_all()


def _state(session: LiveSession) -> str:
    if session.error:
        return "error"
    if session.finished:
        return "ended"
    return "live" if session.joined else "queued"
