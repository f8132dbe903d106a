"""StreamingRuntime: the one generation loop. Many sessions on one Engine, each block decoded and delivered.

Every path runs on it: `longlive generate` and `LongLivePipeline.stream` (one unpaced session, stepped by
the caller), batch job workers (unpaced sessions) and Generator replicas (live sessions paced to playback).
One thread owns the engine and calls `run_once()` in a loop; other threads queue commands (open, prompt,
close), read chunks and read snapshots, all under the runtime's one lock, never its internals.

A step: (1) wait until the DiT of the block in flight is done, so a prompt posted while it was made takes
effect at the next block; (2) apply commands and prompt switches whose text is encoded; (3) launch the
next DiT step; (4) on a second CUDA stream, decode and send the blocks whose send time has come while
that step runs. Text encoding runs on its own thread (PromptEncoder). A session is queued -> live -> ended
or failed.

Pacing: a live session is generated at most `lead_seconds` ahead of its playback clock (which starts when
its first block is out), and each block is sent (decoded, then handed to readers) only `send_lead_seconds`
ahead of it: the clean latents of blocks made but not sent wait on the device. A new prompt throws away the
unsent blocks that can be made again in time and remakes them under it (a rewind and a recache from the
kept latents: instant steering); the status lists each replacement. A new session's first block runs as a
step of its own when the others have their lead buffered.

Each session keeps its newest `buffer_blocks` sent blocks in a ring that reading never empties: every
viewer reads all of them at its own cursor (`read_block`, woken by `watch`), and a slow one never stalls
the others; `next_chunk` is the one-reader cursor that jobs and scripts use.
`playback_speed=0` turns pacing off (batch work runs as fast as the device allows).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from .cache_plan import PassShape, pass_shapes
from .checkpoint import ROLLBACK_BLOCKS, CheckpointError, SessionCheckpoint, TimelineEntry
from .config import GenerationConfig
from .engine import Engine
from .pipeline import VAE_STRIDE, LongLivePipeline, decode_block, to_uint8_frames
from .prompt_encoder import PromptEncoder
from .schedule import FPS, block_of_frame, blocks_for_seconds, video_frames

logger = logging.getLogger(__name__)
COST_SAMPLES = 50  # step costs kept per batch size, for admission
# A new viewer's first blocks here run as steps of their own while the others have their lead: its second
# block is due 0.56 s after its first, sooner than a step of the whole batch (~650 ms for 2 TAE sessions).
SOLO_BLOCKS = 2
REMAKE_MARGIN_S = 0.1  # a remade block is ready this long before it is due on screen (network, player)


class CapacityError(RuntimeError):
    """The runtime runs as many sessions as it may (slots, or measured step time against real time)."""


class UnknownSessionError(KeyError):
    """No such session here (never opened, or ended and forgotten)."""


class BlockGone(LookupError):
    """The block asked for has left the session's ring (or was made before a restore here)."""

    def __init__(self, session_id: str, block: int, oldest_frame: int):
        super().__init__(f"block {block} of {session_id!r} is gone; the oldest frame kept is {oldest_frame}")
        self.oldest_frame = oldest_frame


class SessionEnded(ValueError):
    """The session has ended: it takes no more prompts."""


class InvalidTransition(RuntimeError):
    """A session state change the state machine does not allow (a bug in the caller)."""


class SessionPhase(str, Enum):
    QUEUED = "queued"  # waiting for its prompt's encoding and an engine slot
    LIVE = "live"
    ENDED = "ended"
    FAILED = "error"

    @property
    def final(self) -> bool:
        return self in (SessionPhase.ENDED, SessionPhase.FAILED)


_NEXT_PHASES = {
    SessionPhase.QUEUED: {SessionPhase.LIVE, SessionPhase.ENDED, SessionPhase.FAILED},
    SessionPhase.LIVE: {SessionPhase.ENDED, SessionPhase.FAILED},
    SessionPhase.ENDED: set(),
    SessionPhase.FAILED: set(),
}


@dataclass(frozen=True)
class Chunk:
    """One block of video for one session."""

    block: int  # block index in the session
    first_frame: int  # index of its first video frame in the session's video
    frames: np.ndarray  # uint8 [n, H, W, 3]
    prompt: int  # index into the session's prompt timeline of the prompt it was made under


@dataclass(frozen=True)
class Replacement:
    """Blocks made under an older prompt, thrown away before anyone was sent them, and made again."""

    block: int  # the first block made again, under `prompt`
    first_frame: int  # its first video frame
    frames: int  # video frames thrown away
    prompt: str
    at: float  # Unix time


@dataclass
class _Made:
    """A block whose DiT step was launched and that is not sent yet: its clean latents, on the device."""

    block: int
    latents: Tensor  # [C, block_frames, h, w]
    done: torch.cuda.Event | None  # the end of its step (CUDA): the decode stream waits for it


@dataclass(frozen=True)
class SessionView:
    """A snapshot of one session for other threads (metrics, Redis sync)."""

    session_id: str
    phase: SessionPhase
    paced: bool
    blocks_made: int
    blocks_done: int
    frames_done: int
    prompt_blocks: tuple[
        int | None, ...
    ]  # per timeline entry: the block it took effect at (see TimelineEntry)

    @property
    def ended(self) -> bool:
        return self.phase.final


@dataclass
class LiveSession:
    session_id: str
    seed: int
    num_blocks: int | None
    prompts: list[TimelineEntry]
    paced: bool
    last_read: float
    engine_id: str = ""  # its key in the engine: unique per runtime, so a session id can come back
    phase: SessionPhase = SessionPhase.QUEUED
    end_reason: str | None = None
    in_engine: bool = False  # holds an engine slot
    solo_blocks: int = SOLO_BLOCKS  # of its first blocks here, those that may still run as steps of their own
    ring: deque[Chunk] = field(default_factory=deque)  # the newest delivered blocks, in order
    cursor: int = 0  # next_chunk's next block
    watchers: list[Callable[[], None]] = field(default_factory=list)  # called on each block and the end
    decoder_stream: object = None
    blocks_made: int = 0  # blocks whose DiT step was launched (pacing)
    blocks_done: int = 0  # blocks decoded and delivered
    frames_done: int = 0
    playback_start: float | None = None  # clock time of its first block (a restored one: here)
    playback_origin: int = 0  # video frames made before that block (a restored session's history)
    dropped_blocks: int = 0  # blocks next_chunk's reader never got (they left the ring first)
    stalled_blocks: int = 0  # paced: delivered after its first frame was due on the viewer's screen
    waiting: list[int] = field(default_factory=list)  # timeline indices posted, not yet applied
    encoding: dict[int, Future[Tensor]] = field(default_factory=dict)  # timeline index -> its embedding
    scheduled: dict[int, str] = field(default_factory=dict)  # block -> prompt applied right before it
    read_blocks: int = 0  # blocks handed to a reader, the furthest one (a restore elsewhere resumes here)
    kept: dict[int, Tensor] = field(default_factory=dict)  # block -> clean latents, for checkpoints
    unsent: deque[_Made] = field(default_factory=deque)  # made, waiting for their send time, in order
    sending: bool = False  # a block of it is being decoded (one at a time: the decoder carries state)
    clean: dict[int, Tensor] = field(default_factory=dict)  # block -> clean latents on the device: rewinds
    replacements: list[Replacement] = field(default_factory=list)
    replay: dict[int, int] = field(default_factory=dict)  # restored: block -> timeline index applied there

    @property
    def ended(self) -> bool:
        return self.phase.final

    def move_to(self, phase: SessionPhase, reason: str | None = None) -> None:
        if phase not in _NEXT_PHASES[self.phase]:
            raise InvalidTransition(f"session {self.session_id!r}: {self.phase.value} -> {phase.value}")
        self.phase = phase
        self.end_reason = reason
        if phase.final:
            self.notify()

    def notify(self) -> None:
        for watcher in self.watchers:
            watcher()

    def block(self, index: int) -> Chunk | None:
        """Block `index` from the ring; None while it is not made yet. Raises BlockGone."""
        if index >= self.blocks_done:
            return None
        if not self.ring or index < self.ring[0].block:
            oldest = self.ring[0].first_frame if self.ring else self.frames_done
            raise BlockGone(self.session_id, index, oldest)
        chunk = self.ring[index - self.ring[0].block]
        self.read_blocks = max(self.read_blocks, index + 1)
        return chunk


@dataclass
class _Command:
    """Engine-thread work queued by a request; runs once every future it needs is done."""

    run: Callable[[], None]
    needs: tuple[Future, ...] = ()

    def ready(self) -> bool:
        return all(f.done() for f in self.needs)


@dataclass(frozen=True)
class StepRecord:
    """One block step as measured: what it made and ran, and its times (CUDA: GPU event times)."""

    sessions: int  # blocks made
    joined: int  # of them, first blocks of new sessions
    recaches: int  # prompt switches recached right before the blocks
    restores: int  # moved sessions' caches rebuilt right before the blocks
    encoding: bool  # a prompt was being encoded on the encoder's thread as the step launched or delivered
    launch_seconds: float  # host time to launch the step (the engine thread's share)
    dit_seconds: float  # the DiT's time (beside the previous block's decode when overlapped)
    decode_seconds: float  # decoding its blocks (GPU time on the decode stream when overlapped)
    cost: float  # what the step costs the step rate: max(DiT, decode) overlapped, their sum in series

    @property
    def steady(self) -> bool:
        """Only blocks of running sessions: no first block, recache, restore or encoding beside it."""
        return not (self.joined or self.recaches or self.restores or self.encoding)


@dataclass(frozen=True)
class _Switch:
    """A prompt switch to make before a session's next block; rewind_to: remade from that block on."""

    session: LiveSession
    embeds: Future[Tensor]
    rewind_to: int | None = None
    recent: Tensor | None = None  # the clean latents of the window before rewind_to


@dataclass
class _InFlight:
    """A launched DiT step, recorded (StepRecord) once its DiT is done."""

    sessions: int  # blocks it makes
    started: float  # perf_counter at launch
    launch_seconds: float
    done: torch.cuda.Event | None  # recorded after the step (CUDA); None: the step ran synchronously
    begin: torch.cuda.Event | None
    joined: int
    recaches: int
    restores: int
    encoding: bool  # at launch; the delivery adds whether encoding still went on after the decode
    dit_seconds: float | None = None

    def wait(self) -> None:
        if self.dit_seconds is not None:
            return
        if self.done is not None:
            self.done.synchronize()
            self.dit_seconds = self.begin.elapsed_time(self.done) / 1e3
        else:
            self.dit_seconds = time.perf_counter() - self.started


class StreamingRuntime:
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
        config: GenerationConfig | None = None,
        background_encoding: bool = False,
        realtime_margin: float | None = 1.0,
        overlap_decode: bool = True,
        send_lead_seconds: float | None = 0.5,
        remake_seconds: float | None = None,
    ):
        """checkpoints: keep the clean latents `checkpoint()` needs for live (paced) sessions.
        config: default the pipeline's with relative RoPE, the one mode for open-ended sessions (as the
        reference's 'infinity' config). background_encoding: encode prompts on their own thread (a served
        runtime); off, the engine thread encodes them at its next step. realtime_margin: a new live session
        is admitted while the measured step time stays under this share of a block's playback time (None:
        by free slots only).
        overlap_decode (CUDA): decode each block on a second stream while the next block's DiT runs.
        send_lead_seconds: a live session's blocks are decoded and handed to readers this much video ahead
        of their playback (the player's buffer; above the time a remake takes it only delays steering);
        made blocks wait unsent until then, and a new prompt remakes those it can. None: every block is
        sent as soon as it is made, and a prompt applies after the blocks made already.
        remake_seconds: the time a remake (a step with a recache, then the block's decode) is planned with;
        None: predicted from the measured steps."""
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if playback_speed < 0:
            raise ValueError(f"playback_speed must be >= 0 (0: unpaced), got {playback_speed}")
        if realtime_margin is not None and not 0 < realtime_margin <= 1:
            raise ValueError(f"realtime_margin must be in (0, 1], got {realtime_margin}")
        if send_lead_seconds is not None and not 0 <= send_lead_seconds <= lead_seconds:
            raise ValueError(f"send_lead_seconds must be in [0, lead_seconds], got {send_lead_seconds}")
        self.pipe = pipe
        self.width, self.height = pipe.check_size(size)
        self.config = config or pipe.generation_config.with_(rope_mode="relative")
        latent_size = (self.height // VAE_STRIDE, self.width // VAE_STRIDE)
        self.engine = Engine(pipe.transformer, self.config, latent_size, max_sessions, runtime=pipe.runtime)
        self.encoder = PromptEncoder(pipe.text_encoder, background=background_encoding, on_done=self._notify)
        self.max_sessions = max_sessions
        self.lead_seconds = lead_seconds
        self.send_lead_seconds = send_lead_seconds
        self.remake_seconds = remake_seconds
        self.buffer_blocks = buffer_blocks
        self.idle_timeout_s = idle_timeout_s
        self.playback_speed = playback_speed
        self.realtime_margin = realtime_margin
        self.clock = clock
        self.checkpoints = checkpoints
        self.window_blocks = self.config.window_frames // self.config.block_frames
        bf = self.config.block_frames
        self.block_seconds = (
            video_frames(2 * bf) - video_frames(bf)
        ) / FPS  # playback time of a steady block (12 frames: 0.75 s)
        self.steps: deque[StepRecord] = deque(maxlen=1000)  # newest last
        self.frames_made = 0  # video frames delivered for any session since start (metrics)
        self.stalled_blocks = 0  # paced blocks delivered late, any session (metrics)
        self.remade_blocks = 0  # blocks thrown away unsent and made again under a new prompt (metrics)
        self._costs: dict[int, deque[float]] = {}  # batch size -> recent step costs (s)
        self._switch_costs: dict[int, deque[float]] = {}  # batch size -> costs of steps with a recache
        self._decode_times: deque[float] = deque(maxlen=COST_SAMPLES)  # per block sent (s)
        self._decode_spent = 0.0  # decoding since the last step record (s)
        self._stopping = False
        self._sessions: dict[str, LiveSession] = {}
        self._commands: deque[_Command] = deque()
        # Reentrant: an encoding already done when submitted (under the lock) notifies at once.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)  # commands queued or ready / chunks produced
        self._in_flight: _InFlight | None = None  # the step launched last (CUDA)
        self._decode_thread: threading.Thread | None = None
        device = pipe.transformer.device
        on_cuda = device.type == "cuda" and overlap_decode
        # High priority: a block's decode (what a viewer waits for) goes ahead of the next step's DiT.
        self._decode_stream = torch.cuda.Stream(device, priority=-1) if on_cuda else None
        self._graphs_at_ready: int | None = None
        self._warmed_thread: int | None = None  # the thread warm_up() ran on
        self._incarnations = itertools.count()

    # -- requests (any thread) ---------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Sessions that hold or will hold an engine slot."""
        with self._lock:
            return self._live_count()

    def has_session(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def open(
        self,
        session_id: str,
        prompt: str,
        seed: int = 0,
        max_seconds: float | None = None,
        scheduled: dict[int, str] | None = None,
        paced: bool = True,
        num_blocks: int | None = None,
    ) -> None:
        """Queue a new session; raises CapacityError when the runtime is full, ValueError on bad input.

        scheduled: prompts applied exactly before given blocks (a batch job's schedule); paced=False runs
        the session as fast as the device allows, whatever its playback clock. The length: max_seconds,
        or num_blocks (neither: until closed)."""
        _check_prompt(prompt)
        if num_blocks is not None and (max_seconds is not None or num_blocks < 1):
            raise ValueError("give max_seconds or num_blocks (>= 1), not both")
        if max_seconds is not None:
            if max_seconds <= 0:
                raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
            num_blocks = blocks_for_seconds(max_seconds, self.config.block_frames)
        with self._lock:
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} exists")
            self._check_capacity(paced)
            session = LiveSession(
                session_id,
                seed,
                num_blocks,
                [TimelineEntry(prompt, time.time(), block=0)],
                paced,
                self.clock(),
            )
            session.engine_id = self._new_engine_id(session_id)
            session.scheduled = dict(scheduled or {})
            for text in session.scheduled.values():  # encoded ahead: they apply exactly at their blocks
                self.encoder.submit(text)
            first = self.encoder.submit(prompt)
            session.encoding[0] = first
            self._sessions[session_id] = session
            self._commands.append(_Command(lambda: self._join(session, first), (first,)))
            self._wake.notify_all()

    def post_prompt(self, session_id: str, prompt: str, event_id: str | None = None) -> int:
        """Queue a prompt switch; returns its index in the session's timeline. event_id: its id in the
        session's prompt-event log (a checkpoint records how far the log was read). Raises SessionEnded."""
        _check_prompt(prompt)
        with self._lock:
            session = self._get(session_id)
            if session.ended:
                raise SessionEnded(f"session {session_id!r} has ended")
            session.prompts.append(TimelineEntry(prompt, time.time(), event_id=event_id))
            index = len(session.prompts) - 1
            session.encoding[index] = self.encoder.submit(prompt)
            session.waiting.append(index)
            self._wake.notify_all()
            return index

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self._get(session_id)
            if not session.ended:
                session.move_to(SessionPhase.ENDED, "closed")
                self._commands.append(_Command(lambda: self._leave(session)))
            self._wake.notify_all()

    def next_chunk(self, session_id: str, timeout: float | None = None) -> Chunk | None:
        """The one-reader cursor: the next block it has not read (skipping, and counting as dropped, blocks
        that left the ring first); None once the session has ended and it read every block.
        Raises TimeoutError when nothing arrives within `timeout` seconds."""
        with self._lock:
            session = self._get(session_id)

            def take() -> Chunk | None:
                if session.ring and session.cursor < session.ring[0].block:
                    session.dropped_blocks += session.ring[0].block - session.cursor
                    session.cursor = session.ring[0].block
                chunk = session.block(session.cursor)
                if chunk is not None:
                    session.cursor += 1
                return chunk

            return self._wait_for(session, take, timeout)

    def read_block(self, session_id: str, block: int, timeout: float | None = None) -> Chunk | None:
        """Block `block` of the session, for a viewer that keeps its own cursor (any number of them read
        the same blocks); waits up to `timeout` s for it to be made. None: the session ended before it.
        Raises BlockGone (it left the ring; the error says the oldest frame kept), TimeoutError."""
        with self._lock:
            session = self._get(session_id)
            return self._wait_for(session, lambda: session.block(block), timeout)

    def watch(self, session_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` whenever a block of the session is delivered, and when it ends; returns the
        function that stops it. It runs on the runtime's threads under its lock: keep it to a hand-off,
        e.g. `loop.call_soon_threadsafe(event.set)` for an asyncio stream."""
        with self._lock:
            session = self._get(session_id)
            session.watchers.append(callback)

        def unwatch() -> None:
            with self._lock:
                with contextlib.suppress(ValueError):
                    session.watchers.remove(callback)

        return unwatch

    def _wait_for(
        self, session: LiveSession, take: Callable[[], Chunk | None], timeout: float | None
    ) -> Chunk | None:
        """Under the lock: `take()`'s chunk once there is one; None once the session ended without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            session.last_read = self.clock()
            if (chunk := take()) is not None:
                return chunk
            if session.ended:
                return None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no block of session {session.session_id!r} within {timeout} s")
            self._wake.wait(remaining)

    def status(self, session_id: str) -> dict:
        with self._lock:
            s = self._get(session_id)
            s.last_read = self.clock()
            return {
                "session_id": s.session_id,
                "state": s.phase.value,
                "blocks_done": s.blocks_done,
                "frames_done": s.frames_done,
                "buffered_blocks": s.blocks_done
                - max(s.cursor, s.ring[0].block if s.ring else s.blocks_done),
                "dropped_blocks": s.dropped_blocks + max(0, (s.ring[0].block if s.ring else 0) - s.cursor),
                "seed": s.seed,
                "error": s.end_reason if s.phase is SessionPhase.FAILED else None,
                "prompts": [
                    {
                        "prompt": p.prompt,
                        "block": p.block,
                        "posted_at": p.posted_at,
                        "applied_at": p.applied_at,
                    }
                    for p in s.prompts
                ],
                "replacements": [
                    {
                        "block": r.block,
                        "first_frame": r.first_frame,
                        "frames": r.frames,
                        "prompt": r.prompt,
                        "at": r.at,
                    }
                    for r in s.replacements
                ],
            }

    def snapshot(self) -> list[SessionView]:
        with self._lock:
            return [
                SessionView(
                    s.session_id,
                    s.phase,
                    s.paced,
                    s.blocks_made,
                    s.blocks_done,
                    s.frames_done,
                    tuple(p.block for p in s.prompts),
                )
                for s in self._sessions.values()
            ]

    def checkpoint(self, session_id: str) -> SessionCheckpoint:
        """What rebuilds the session on another runtime (see longlive_core.checkpoint)."""
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
        """Continue a session that ran on another runtime; returns the block it resumes at.

        from_frame: the first video frame the viewer still needs (default: after the last block read).
        recovered: (prompt, event id) of the session's log events posted after the checkpoint was written.
        Its cache is rebuilt from the checkpoint's latents (one recache pass, plus a sink pass once the
        window slid), its decoder primed with the latest blocks, and prompt switches made after the resume
        point are made again at the same blocks. Prompts not applied in the checkpoint and the recovered
        ones then take effect one block each, in order: the old runtime may have applied them already (a
        viewer saw it), so none is superseded by another one that came back with it.
        Raises CheckpointError, CapacityError."""
        cp = checkpoint
        if tuple(cp.size) != (self.width, self.height):
            raise CheckpointError(
                f"checkpoint is for {cp.size[0]}x{cp.size[1]}, this runtime makes {self.width}x{self.height}"
            )
        if cp.num_blocks is not None and cp.blocks_done >= cp.num_blocks:
            raise CheckpointError(f"session {cp.session_id!r} had finished")
        wanted = None if from_frame is None else block_of_frame(from_frame, self.config.block_frames)
        block = cp.resume_block(self.config, wanted)
        timeline = [replace(e) for e in cp.timeline]
        timeline += [TimelineEntry(prompt, time.time(), event_id=event_id) for prompt, event_id in recovered]
        session = LiveSession(cp.session_id, cp.seed, cp.num_blocks, timeline, True, self.clock())
        session.engine_id = self._new_engine_id(cp.session_id)
        session.blocks_done = session.blocks_made = session.read_blocks = session.cursor = block
        session.frames_done = video_frames(block * self.config.block_frames) if block else 0
        # Kept from the start: a checkpoint taken before the engine joins it (the Redis thread saves a new
        # session at once) must still hold what a restore needs, or a second move finds nothing to resume.
        session.kept = {b: cp.latents[b] for b in cp.latents if b < block}
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
        # The prompt in effect: the last applied at or before the resume block (a switch made at that very
        # block is part of the restored state: the restore's recache pass is that switch's recache).
        current = max(i for i, e in enumerate(timeline) if e.block is not None and 0 <= e.block <= block)
        sink_index = cp.sink_source(self.config, block)[0] if block else current
        with self._lock:
            if cp.session_id in self._sessions:
                raise ValueError(f"session {cp.session_id!r} exists")
            self._check_capacity(paced=True)
            for index in {current, sink_index, *session.replay.values()}:
                session.encoding[index] = self.encoder.submit(timeline[index].prompt)
            self._sessions[cp.session_id] = session
            needs = (session.encoding[current], session.encoding[sink_index])
            self._commands.append(
                _Command(lambda: self._join_restored(session, cp, current, sink_index), needs)
            )
            self._wake.notify_all()
        return block

    def forget(self, session_id: str) -> None:
        """Drop an ended session's record."""
        with self._lock:
            if self._get(session_id).ended:
                del self._sessions[session_id]

    def shutdown(self) -> None:
        self.encoder.close()
        if self._decode_thread is not None:
            with self._lock:
                self._stopping = True
                self._wake.notify_all()
            self._decode_thread.join()
            self._decode_thread = None

    # -- measurements --------------------------------------------------------------------------------
    def predicted_step_seconds(self, sessions: int) -> float | None:
        """A step's cost with `sessions` sessions, from measured steps (scaled from the largest measured
        batch below it); None while nothing was measured."""
        with self._lock:
            return self._predicted_cost(sessions)

    @property
    def recompiles(self) -> int:
        """Graphs torch.compile made since the warm-up ended (0 when nothing is compiled)."""
        if self._graphs_at_ready is None:
            return 0
        return compiled_graphs() - self._graphs_at_ready

    @property
    def unwarmed_shapes(self) -> set[PassShape]:
        """Pass shapes admission allows that no step has run yet (empty after a full warm-up)."""
        return pass_shapes(self.config, self.max_sessions, self.engine.scheduler.max_positions) - (
            self.engine.shapes_seen
        )

    # -- the engine thread -------------------------------------------------------------------------
    def run_once(self, max_wait: float = 0.05) -> bool:
        """One step: apply queued commands and prompt switches (rewinding for a remake), launch a block for
        the sessions that are due, and send the blocks whose send time has come (with a second stream, the
        decode thread sends them while this step runs). Waits up to `max_wait` seconds for work; returns
        whether a block step was launched."""
        if self._warmed_thread not in (None, threading.get_ident()) and self._decode_stream is not None:
            logger.warning(
                "run_once on a thread the warm-up did not run on: its first steps create CUDA library"
                " handles while serving (warm up on the stepping thread, see longlive_core.engine_thread)"
            )
            self._warmed_thread = None  # said once
        if self._in_flight is not None:  # its DiT done: prompts posted meanwhile apply at the next block
            self._record(self._in_flight)
            self._in_flight = None
        self.encoder.run_pending()
        here = self._decode_stream is None  # no second stream: this thread decodes and sends
        with self._lock:
            if not self._ready_commands() and not self._plan_step()[0] and not (here and self._sends_due()):
                self._wake.wait(min(max_wait, self._seconds_until_due(sends=here)))
            self._close_idle()
            commands = self._take_ready_commands()
        self.encoder.run_pending()
        for command in commands:
            command.run()
        with self._lock:  # after the commands: a session restored just now makes its switch at this block
            switches = self._take_prompt_switches()
        for switch in switches:
            self._set_prompt(switch)
        with self._lock:
            due, only = self._plan_step()
        made = self._launch(only) if due else None
        if here:
            if made is not None:
                made.wait()  # the DiT's time, before this thread decodes
            self._send_due()
            if made is not None:
                self._record(made)
            return made is not None
        if made is None:
            return False
        self._in_flight = made
        self._start_decoding()
        return True

    def drain(self) -> None:
        """Wait until every launched step is recorded and every block due to be sent is sent (the caller
        stops stepping; an unpaced session's blocks are due at once). Call it on the stepping thread."""
        if self._in_flight is not None:
            self._record(self._in_flight)
            self._in_flight = None
        if self._decode_stream is None:
            self._send_due()
            return
        with self._lock:
            while self._decode_thread is not None and (
                self._sends_due() or any(s.sending for s in self._sessions.values())
            ):
                self._wake.wait(0.05)

    def _start_decoding(self) -> None:
        if self._decode_thread is None:
            self._decode_thread = threading.Thread(target=self._decode_loop, name="decode", daemon=True)
            self._decode_thread.start()

    def _decode_loop(self) -> None:
        """The decode thread (CUDA): sends each block at its send time, decoded on the decode stream while
        the engine thread launches the next steps."""
        while True:
            with self._lock:
                while not self._stopping and not (due := self._take_due()):
                    self._wake.wait(min(1.0, self._seconds_until_send()))
                if self._stopping:
                    return
            try:
                self._send(due)
            except Exception:  # noqa: BLE001 - a bug: logged, and the next blocks still go out
                logger.exception("sending blocks failed (a bug)")

    def warm_up(self, sessions: int | None = None, every_shape: bool | None = None) -> None:
        """Run every pass shape that up to `sessions` (default max_sessions) concurrent sessions can take:
        first blocks, a window filling, steady blocks, batches that mix phases, recaches at every fill
        phase and (with checkpoints) a restore. Compiles and autotunes them all, so neither a new viewer,
        a switch nor a failover compiles later; the steady steps of each batch size are what admission
        measures against real time. every_shape: run the shapes of every batch size (default: when there is
        something to compile or autotune, i.e. compiled blocks or a CUDA device; else one batch size runs
        the code paths once). Run it on the thread that then steps (longlive_core.engine_thread does): CUDA
        libraries keep per-thread handles, which another thread's first step would create while serving."""
        self._warmed_thread = threading.get_ident()
        sessions = min(sessions or self.max_sessions, self.max_sessions)
        if every_shape is None:
            every_shape = self.pipe.runtime.compile or self.pipe.transformer.device.type == "cuda"
        speed, self.playback_speed = self.playback_speed, 0.0
        idle, self.idle_timeout_s = self.idle_timeout_s, float("inf")  # compiling can take minutes
        try:
            for batch in range(1, sessions + 1 if every_shape else 2):
                self._warm_up_batch(batch)
            # Compile time is no step cost: measure each batch size once compiled.
            for measured in (self._costs, self._switch_costs, self._decode_times):
                measured.clear()
            for batch in range(1, sessions + 1 if self.realtime_margin is not None else 1):
                self._measure_batch(batch)
            self.steps.clear()  # compile-time steps say nothing about serving
            if every_shape and (missing := self.unwarmed_shapes):
                logger.warning("warm-up left pass shapes uncompiled: %s", sorted(missing))
            self._graphs_at_ready = compiled_graphs()
            # What loading and compiling left (weights' wrappers, tokenizer, dynamo's caches) lives as long
            # as the process: out of the collector's reach, so a full collection is no pause in a step.
            gc.collect()
            gc.freeze()
        finally:
            self.playback_speed, self.idle_timeout_s = speed, idle

    def _warm_up_batch(self, batch: int) -> None:
        ids = [f"__warm_up_{batch}_{i}__" for i in range(batch)]
        for sid in ids:
            self.open(sid, "warm up", paced=False)
        for b in range(self.window_blocks + 3):
            if batch == 1 and b >= 1:  # a recache at every fill phase, then steady ones
                self.post_prompt(ids[0], f"warm up, switched at {b}")
            self._warm_up_step(ids)
        if batch > 1:
            # One leaves and a new one joins (the last slot): its first block alone, as a new viewer's on a
            # runtime whose live sessions have their lead (a barely moving playback clock), then a step
            # mixing first and steady blocks.
            self.close(ids[0])
            ids.append(f"__warm_up_{batch}_{batch}__")
            self.open(ids[-1], "warm up", paced=False)
            with self._lock:
                for sid in ids:
                    self._sessions[sid].paced = True
            self.playback_speed = 1e-9
            self._warm_up_step(ids)
            self.playback_speed = 0.0
            self._warm_up_step(ids)
        if batch == 1 and self.checkpoints:
            moved = replace(self.checkpoint(ids[0]), session_id=f"{ids[0]}moved")
            self.close(ids[0])
            self._warm_up_step(ids)
            self.restore(moved)
            ids.append(moved.session_id)
            self._warm_up_step(ids)
        for sid in ids:
            if not self._sessions[sid].ended:
                self.close(sid)
        self._warm_up_step(ids)
        for sid in ids:
            self.forget(sid)

    def _measure_batch(self, batch: int, samples: int = 3) -> None:
        """Steady steps of `batch` sessions (compiled already), what admission predicts from, then a step
        with a switch: what a remake is expected to take."""
        ids = [f"__measure_{batch}_{i}__" for i in range(batch)]
        for sid in ids:
            self.open(sid, "warm up", paced=False)
        for _ in range(self.window_blocks + 1):
            self._warm_up_step(ids)
        self._costs.pop(batch, None)
        for _ in range(samples):
            self._warm_up_step(ids)
        self.post_prompt(ids[0], "warm up, switched")
        self._warm_up_step(ids)
        for sid in ids:
            self.close(sid)
        self._warm_up_step(ids)
        for sid in ids:
            self.forget(sid)

    def _warm_up_step(self, ids: list[str]) -> None:
        self.encoder.run_pending()
        with self._lock:  # each warm-up step runs what was asked for: its prompts encoded first
            futures = [f for c in self._commands for f in c.needs]
            futures += [f for sid in ids for f in self._sessions[sid].encoding.values()]
        for future in futures:
            future.exception()
        self.run_once()
        self.drain()
        with self._lock:
            for sid in ids:
                s = self._sessions[sid]
                s.ring.clear()
                s.cursor = s.blocks_done
                self._sessions[sid].last_read = self.clock()

    # -- internals (engine thread, or under the lock where said) -----------------------------------
    def _new_engine_id(self, session_id: str) -> str:
        return f"{session_id}#{next(self._incarnations)}"

    def _live_count(self) -> int:
        return sum(not s.ended for s in self._sessions.values())

    def _get(self, session_id: str) -> LiveSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSessionError(session_id) from None

    def _check_capacity(self, paced: bool) -> None:
        """Under the lock: slots, then (live sessions) measured step time against real time."""
        live = self._live_count()
        if live >= self.max_sessions:
            raise CapacityError(f"runtime runs its maximum of {self.max_sessions} sessions")
        if not paced or not self.playback_speed or self.realtime_margin is None:
            return
        predicted = self._predicted_cost(live + 1)
        budget = self.realtime_margin * self.block_seconds / self.playback_speed
        if predicted is not None and predicted > budget:
            raise CapacityError(
                f"a step of {live + 1} sessions takes {predicted * 1e3:.0f} ms (measured), over the"
                f" {budget * 1e3:.0f} ms that keeps every live session real time"
            )

    def _predicted_cost(self, sessions: int) -> float | None:
        measured = {b: c for b, c in self._costs.items() if len(c) >= 3}
        if sessions in measured:
            return statistics.median(measured[sessions])
        below = [b for b in measured if b < sessions]
        if not below:
            return None
        b = max(below)
        return statistics.median(measured[b]) * sessions / b

    def _ready_commands(self) -> bool:
        return any(c.ready() for c in self._commands)

    def _take_ready_commands(self) -> list[_Command]:
        ready, waiting = [], deque()
        for command in self._commands:
            (ready if command.ready() else waiting).append(command)
        self._commands = waiting
        return ready

    def _join(self, session: LiveSession, first: Future[Tensor]) -> None:
        if session.ended:
            return
        if (err := first.exception()) is not None:
            self._fail(session, f"encoding its prompt failed: {err}")
            return
        self.engine.add_session(
            session.engine_id, self._embeds(first), seed=session.seed, num_blocks=session.num_blocks
        )
        session.decoder_stream = self.pipe.vae.new_stream()
        with self._lock:
            session.in_engine = True
            session.move_to(SessionPhase.LIVE)

    def _join_restored(
        self, session: LiveSession, cp: SessionCheckpoint, current: int, sink_index: int
    ) -> None:
        if session.ended:
            return
        block = session.blocks_done
        if block == 0:
            self._join(session, session.encoding[current])
            return
        bf, window = self.config.block_frames, self.config.window_frames
        recent_blocks = [cp.latents[b] for b in range(max(0, block - self.window_blocks), block)]
        recent = torch.cat(recent_blocks, dim=1)
        sink_latents = None
        if self.config.global_sink and block * bf > window:
            sink_frames = cp.sink_source(self.config, block)[1]
            sink_latents = torch.cat([cp.latents[b] for b in range(sink_frames // bf)], dim=1)
        self.engine.restore_session(
            session.engine_id,
            self._embeds(session.encoding[current]),
            session.seed,
            block,
            recent[:, -window:],
            sink_prompt_embeds=self._embeds(session.encoding[sink_index]),
            sink_latents=sink_latents,
            num_blocks=session.num_blocks,
        )
        # The decoder carries a few frames of state: prime a fresh one with the latest blocks (block by
        # block: the shapes it already runs, no new compile).
        session.decoder_stream = self.pipe.vae.new_stream()
        with torch.no_grad(), self._on_decode_stream():  # ordered before its blocks' decodes
            for latents in recent_blocks:
                decode_block(
                    session.decoder_stream, latents, self.pipe.vae_dtype, self.pipe.runtime.low_memory
                )
        with self._lock:
            if self._remakes(session):  # the window at the resume block, as a rewind there needs it
                device = self.pipe.transformer.device
                first = block - len(recent_blocks)
                session.clean = {first + i: b.to(device) for i, b in enumerate(recent_blocks)}
            session.in_engine = True
            session.move_to(SessionPhase.LIVE)

    def _leave(self, session: LiveSession) -> None:
        if session.in_engine:
            self.engine.remove_session(session.engine_id)
            session.in_engine = False
        with self._lock:
            session.unsent.clear()
            session.clean.clear()
            session.decoder_stream = None

    def _fail(self, session: LiveSession, reason: str) -> None:
        """The session ends with `reason` (it leaves the engine at the next step); the others go on."""
        with self._lock:
            if not session.ended:
                session.move_to(SessionPhase.FAILED, reason)
                self._commands.append(_Command(lambda: self._leave(session)))
            self._wake.notify_all()

    @staticmethod
    def _embeds(future: Future[Tensor]) -> Tensor:
        embeds = future.result()
        if embeds.is_cuda:  # made on the encoder's stream, read on this one
            embeds.record_stream(torch.cuda.current_stream(embeds.device))
        return embeds

    def _set_prompt(self, switch: _Switch) -> None:
        session, future = switch.session, switch.embeds
        self.encoder.run_pending()  # an exact switch's prompt, submitted just now
        if (err := future.exception()) is not None:  # waits for an exact (scheduled) switch's encoding
            self._fail(session, f"encoding a prompt failed: {err}")
            return
        if switch.rewind_to is not None:  # remade from there: the blocks made since are thrown away
            self.engine.rewind_session(session.engine_id, switch.rewind_to, switch.recent)
        self.engine.set_prompt(session.engine_id, self._embeds(future))

    def _remakes(self, session: LiveSession) -> bool:
        """Whether a prompt may remake the session's unsent blocks (a live session, sent at its pace)."""
        return (
            self.send_lead_seconds is not None
            and session.paced
            and bool(self.playback_speed)
            and self.config.recache != "off"
        )

    def _due_at(self, session: LiveSession, block: int) -> float:
        """Clock time block `block`'s first frame is due on the viewer's screen (its playback started)."""
        frames = video_frames(block * self.config.block_frames) - session.playback_origin
        return session.playback_start + frames / FPS / self.playback_speed

    def _send_at(self, session: LiveSession, block: int) -> float:
        """Clock time to send block `block`: at once, unless it is a live session's whose playback began."""
        if not (session.paced and self.playback_speed and self.send_lead_seconds is not None):
            return float("-inf")
        if session.playback_start is None:
            return float("-inf")  # its first block here: it starts the playback clock
        return self._due_at(session, block) - self.send_lead_seconds / self.playback_speed

    def _remake_seconds(self, batch: int) -> float:
        """What a step with a switch, then the block's decode, is expected to take (measured)."""
        if self.remake_seconds is not None:
            return self.remake_seconds
        if samples := self._switch_costs.get(batch):
            step = statistics.median(samples)
        elif (steady := self._predicted_cost(batch)) is not None:
            step = 2 * steady
        else:
            step = self.block_seconds
        return step + (statistics.median(self._decode_times) if self._decode_times else 0.0)

    def _rewind_point(self, session: LiveSession, now: float) -> int | None:
        """Under the lock: the first unsent block a remake under a new prompt still has on screen in time
        (None: none; the prompt applies after the blocks made)."""
        if not (self._remakes(session) and session.unsent and session.playback_start is not None):
            return None
        ready = now + self._remake_seconds(len(self._active())) + REMAKE_MARGIN_S
        for made in session.unsent:
            if made.block >= 1 and self._due_at(session, made.block) >= ready:
                window = range(max(0, made.block - self.window_blocks), made.block)
                return made.block if all(b in session.clean for b in window) else None
        return None

    def _rewind(self, session: LiveSession, block: int, prompt: str) -> Tensor:
        """Under the lock: throw the blocks from `block` on away (the timeline's switches among them are
        superseded); returns the clean latents of the window before it, for the engine's rewind."""
        bf = self.config.block_frames
        made_frames, first = video_frames(session.blocks_made * bf), video_frames(block * bf)
        session.replacements.append(Replacement(block, first, made_frames - first, prompt, time.time()))
        self.remade_blocks += session.blocks_made - block
        session.unsent = deque(m for m in session.unsent if m.block < block)
        for entry in session.prompts:
            if entry.block is not None and entry.block >= block:
                entry.block = -1
        window = range(max(0, block - self.window_blocks), block)
        recent = torch.cat([session.clean[b] for b in window], dim=1)
        session.clean = {b: t for b, t in session.clean.items() if b < block}
        session.blocks_made = block
        return recent[:, -min(block * bf, self.config.window_frames) :]

    def _playback_due(self, session: LiveSession, now: float) -> bool:
        if session.playback_start is None:
            return True
        played = (now - session.playback_start) * self.playback_speed
        return self._made_seconds(session) < played + self.lead_seconds

    def _made_seconds(self, session: LiveSession) -> float:
        """Video launched since its playback began (pacing)."""
        return (video_frames(session.blocks_made * self.config.block_frames) - session.playback_origin) / FPS

    def _active(self) -> list[LiveSession]:
        return [s for s in self._sessions.values() if s.in_engine and not s.ended]

    def _plan_step(self) -> tuple[bool, set[str] | None]:
        """Under the lock: (a step is due, the sessions it makes blocks for; None: all). Live (paced)
        sessions set the step rate whenever there are any: a step makes a block for every session, so
        batch sessions then move at playback speed. Alone, batch sessions run flat out. A new session's
        first SOLO_BLOCKS blocks step on their own while the others have their lead buffered."""
        active = self._active()
        if not active:
            return False, None
        if self._decode_stream is not None and any(self._due_unsent(s) >= 2 for s in active):
            return False, None  # decoding fell behind: hold the next launch back
        paced = [s for s in active if s.paced and self.playback_speed]
        if not paced:
            return True, None
        now = self.clock()
        if any(self._playback_due(s, now) for s in paced if not s.solo_blocks):
            return True, None
        fresh = {s.engine_id for s in active if s.solo_blocks}
        return (True, fresh) if fresh else (False, None)

    def _seconds_until_due(self, sends: bool = False) -> float:
        """Until the next step is due (and with `sends`, the next block is to be sent)."""
        waits = [self._seconds_until_send()] if sends else []
        for s in self._active():
            if s.playback_start is not None and self.playback_speed and s.paced:
                ahead = self._made_seconds(s) - self.lead_seconds
                waits.append(s.playback_start + ahead / self.playback_speed - self.clock())
        return max(0.0, min(waits, default=3600.0))

    def _next_send_at(self, session: LiveSession) -> float | None:
        """Under the lock: when its next block is to be sent (None: none waits, or one is being sent)."""
        if not session.unsent or session.sending or session.ended:
            return None
        return self._send_at(session, session.unsent[0].block)

    def _seconds_until_send(self) -> float:
        now = self.clock()
        times = [t for s in self._sessions.values() if (t := self._next_send_at(s)) is not None]
        return max(0.0, min(times, default=now + 3600.0) - now)

    def _due_unsent(self, session: LiveSession) -> int:
        """Under the lock: its blocks whose send time has come, being sent or not."""
        now = self.clock()
        return session.sending + sum(self._send_at(session, m.block) <= now for m in session.unsent)

    def _sends_due(self) -> bool:
        now = self.clock()
        return any((t := self._next_send_at(s)) is not None and t <= now for s in self._sessions.values())

    def _take_prompt_switches(self) -> list[_Switch]:
        """Under the lock: per session, the switch to make before its next block. A restored session's
        replays and a batch job's schedule apply exactly at their blocks (waiting for their encoding if it
        must); a live session's latest posted prompt applies once encoded (earlier ones are superseded:
        one recache), at the first unsent block a remake still has on screen in time (the blocks from
        there on are thrown away), else after the blocks made."""
        switches = []
        now, clock = time.time(), self.clock()
        for s in self._active():
            block = s.blocks_made
            if s.replay:  # a restored session makes its switches again first, at their blocks
                if block in s.replay:
                    index = s.replay.pop(block)
                    s.prompts[index].block, s.prompts[index].applied_at = block, now
                    switches.append(_Switch(s, s.encoding.pop(index)))
                continue
            exact = block in s.scheduled
            if not exact and any(p.block == block for p in s.prompts):
                continue  # a switch is at this block already (a restore's resume block): the next goes after
            if exact:  # the schedule's prompt at its block, whatever was posted before
                s.prompts.append(TimelineEntry(s.scheduled.pop(block), now))
                index = len(s.prompts) - 1
                s.encoding[index] = self.encoder.submit(s.prompts[index].prompt)
                s.waiting.append(index)
            if not s.waiting:
                continue
            index = s.waiting[-1]
            if not s.encoding[index].done() and not exact:
                continue  # encoding: applies at a later block, the others' steps do not wait
            for skipped in s.waiting[:-1]:
                s.prompts[skipped].block = -1  # superseded before any block was made under it
            s.waiting.clear()
            switch = _Switch(s, s.encoding.pop(index))
            if not exact and (rewind_to := self._rewind_point(s, clock)) is not None:
                recent = self._rewind(s, rewind_to, s.prompts[index].prompt)
                switch = replace(switch, rewind_to=rewind_to, recent=recent)
                block = rewind_to
            s.prompts[index].block, s.prompts[index].applied_at = block, now
            switches.append(switch)
        return switches

    def _close_idle(self) -> None:
        """Under the lock: end sessions nobody reads; forget ended ones nobody asked about for as long."""
        now = self.clock()
        for s in list(self._sessions.values()):
            if now - s.last_read <= self.idle_timeout_s:
                continue
            if s.ended and not s.in_engine:
                del self._sessions[s.session_id]
            elif not s.ended and s.playback_start is not None:
                s.move_to(SessionPhase.FAILED, f"closed: no client read for {self.idle_timeout_s:g} s")
                self._commands.append(_Command(lambda s=s: self._leave(s)))

    def _launch(self, only: set[str] | None) -> _InFlight:
        begin = done = None
        if self._decode_stream is not None:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        encoding = self.encoder.busy
        started = time.perf_counter()
        with torch.no_grad():
            latents = self.engine.step(only)
        launch_seconds = time.perf_counter() - started
        if self._decode_stream is not None:
            done = torch.cuda.Event(enable_timing=True)
            done.record()
        work = self.engine.last_schedule
        with self._lock:
            for s in self._sessions.values():
                if s.engine_id not in latents:
                    continue  # not stepped, or it left before the launch's lock
                block = latents[s.engine_id]
                s.unsent.append(_Made(s.blocks_made, block, done))
                if self._remakes(s):
                    s.clean[s.blocks_made] = block
                s.blocks_made += 1
                s.solo_blocks = max(0, s.solo_blocks - 1)
                if s.prompts[0].applied_at is None:
                    s.prompts[0].applied_at = time.time()
                if s.num_blocks is not None and s.blocks_made >= s.num_blocks:
                    s.in_engine = False  # the engine drops it at its last block
            self._wake.notify_all()  # the decode thread: a block to send
        return _InFlight(
            len(latents),
            started,
            launch_seconds,
            done,
            begin,
            joined=len(work.new_sessions),
            recaches=len(work.recaches),
            restores=len(work.restores),
            encoding=encoding,
        )

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _on_decode_stream(self) -> contextlib.AbstractContextManager:
        stream = self._decode_stream
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _decode(self, session: LiveSession, block: Tensor) -> np.ndarray:
        video = decode_block(session.decoder_stream, block, self.pipe.vae_dtype, self.pipe.runtime.low_memory)
        return to_uint8_frames(video)

    def _take_due(self) -> list[tuple[LiveSession, _Made]]:
        """Under the lock: per session, its next block if its send time has come (marked as sending)."""
        now, due = self.clock(), []
        for s in self._sessions.values():
            if (t := self._next_send_at(s)) is not None and t <= now:
                s.sending = True
                due.append((s, s.unsent.popleft()))
        return due

    def _send_due(self) -> None:
        """Send every block whose send time has come, here (no second stream)."""
        while due := self._take_due_locked():
            self._send(due)

    def _take_due_locked(self) -> list[tuple[LiveSession, _Made]]:
        with self._lock:
            return self._take_due()

    def _send(self, due: list[tuple[LiveSession, _Made]]) -> None:
        """Decode blocks (on the decode stream, beside the steps launched meanwhile) and hand them to their
        sessions' rings. A failed decode fails its session alone."""
        started = time.perf_counter()
        decoded: dict[int, tuple[np.ndarray, Tensor | None]] = {}
        failed: dict[int, str] = {}
        stream = self._decode_stream
        begin = end = None
        try:
            with torch.no_grad(), self._on_decode_stream():
                if stream is not None:
                    begin = torch.cuda.Event(enable_timing=True)
                    begin.record(stream)
                for i, (session, made) in enumerate(due):
                    if session.decoder_stream is None:
                        continue  # it left meanwhile
                    if stream is not None:
                        stream.wait_event(made.done)
                        made.latents.record_stream(stream)
                    try:
                        frames = self._decode(session, made.latents)
                    except (RuntimeError, ValueError) as err:  # e.g. out of memory: this session fails alone
                        logger.exception("decoding block %d of %s failed", made.block, session.session_id)
                        failed[i] = f"decode failed: {err}"
                        continue
                    kept = None
                    if self.checkpoints and session.paced:  # the DiT's dtype: what a recache reads anyway
                        kept = made.latents.to("cpu", self.pipe.transformer.dtype)
                    decoded[i] = (frames, kept)
                if stream is not None:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record(stream)
            if end is not None:
                end.synchronize()
                seconds = begin.elapsed_time(end) / 1e3
            else:
                seconds = time.perf_counter() - started
            now = self.clock()
            with self._lock:
                self._decode_spent += seconds
                if decoded:
                    self._decode_times.append(seconds / len(decoded))
                for i, (frames, kept) in decoded.items():
                    session = due[i][0]
                    if not session.ended:
                        self._hand_over(session, frames, kept, now)
        finally:
            with self._lock:
                for session, _ in due:
                    session.sending = False
                self._wake.notify_all()
        for i, reason in failed.items():
            self._fail(due[i][0], reason)

    def _record(self, made: _InFlight) -> None:
        """A step's record, once its DiT is done: its DiT time and the decoding done beside it."""
        made.wait()
        with self._lock:
            decode, self._decode_spent = self._decode_spent, 0.0
            # Overlapped, the DiT (timed on the GPU, slowed by the decode beside it) and the decode share
            # the step's time; in series they add up.
            dit = made.dit_seconds
            cost = max(dit, decode) if self._decode_stream is not None else dit + decode
            record = StepRecord(
                sessions=made.sessions,
                joined=made.joined,
                recaches=made.recaches,
                restores=made.restores,
                encoding=made.encoding or self.encoder.busy,
                launch_seconds=made.launch_seconds,
                dit_seconds=made.dit_seconds,
                decode_seconds=decode,
                cost=cost,
            )
            self.steps.append(record)
            if not record.restores:  # a switch's extra pass is no steady cost, but a remake's
                costs = self._switch_costs if record.recaches else self._costs
                costs.setdefault(record.sessions, deque(maxlen=COST_SAMPLES)).append(cost)

    def _hand_over(self, s: LiveSession, frames: np.ndarray, kept: Tensor | None, now: float) -> None:
        """Under the lock: one decoded block into the session's ring."""
        applied = [
            i for i, p in enumerate(s.prompts) if p.block is not None and 0 <= p.block <= s.blocks_done
        ]
        chunk = Chunk(s.blocks_done, s.frames_done, frames, max(applied, default=0))
        if len(s.ring) >= self.buffer_blocks:
            s.ring.popleft()
        s.ring.append(chunk)
        if kept is not None:
            s.kept[s.blocks_done] = kept
            oldest = s.blocks_done - self.window_blocks - ROLLBACK_BLOCKS
            if oldest >= self.window_blocks:  # the first blocks stay: the sink was made of them
                s.kept.pop(oldest, None)
        s.clean.pop(s.blocks_done - self.window_blocks, None)  # a rewind goes back to this block at most
        if s.playback_start is None:
            s.playback_start, s.playback_origin = now, s.frames_done
        elif s.paced and self.playback_speed:
            if now > self._due_at(s, s.blocks_done):
                s.stalled_blocks += 1
                self.stalled_blocks += 1
        s.blocks_done += 1
        s.frames_done += len(frames)
        self.frames_made += len(frames)
        if s.num_blocks is not None and s.blocks_done >= s.num_blocks and not s.ended:
            s.move_to(SessionPhase.ENDED, "finished")  # tells the watchers
            s.decoder_stream = None
        else:
            s.notify()


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _check_prompt(prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise ValueError("prompt must not be empty")
