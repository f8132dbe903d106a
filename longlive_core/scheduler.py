"""Engine scheduler: which sessions join, recache, step and leave. Torch-free, tested on its own.

Every engine step is one block for every running session. Running sessions occupy cache slots
0..k-1 in order, so a step's batch is the slice [0, k) of the preallocated cache (views, no gather);
when a session leaves, the one in the last slot moves into the hole.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

from .cache_plan import CacheLayout, PassPlan
from .config import GenerationConfig


@dataclass
class SessionState:
    session_id: str
    seed: int
    num_blocks: int | None  # stop after this many blocks; None: until removed
    layout: CacheLayout
    slot: int = -1
    committed_frames: int = 0  # latent frames whose final KV is in the cache
    blocks_done: int = 0
    prompt_version: int = 0  # bumped by every set_prompt
    applied_version: int = 0  # the version the cache was last built under
    finished: bool = False
    sink_frames: int = 0  # restored sessions: frames of the pass that last wrote the sink (0: not restored)

    def state_dict(self) -> dict:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}
        return {**plain, "layout": self.layout.state_dict()}

    @classmethod
    def from_state_dict(cls, config: GenerationConfig, max_positions: int, state: dict) -> SessionState:
        plain = {k: v for k, v in state.items() if k != "layout"}
        return cls(**plain, layout=CacheLayout.from_state_dict(config, max_positions, state["layout"]))


@dataclass(frozen=True)
class SlotMove:
    """Copy slot `src` to slot `dst` before anything else runs (compaction)."""

    session_id: str
    src: int
    dst: int


@dataclass(frozen=True)
class NewSession:
    """A session that got a slot this step: load its prompt's cross-attention K/V there."""

    session_id: str
    slot: int


@dataclass(frozen=True)
class RecacheWork:
    """A prompt switch applied before this step's block: new cross-attention K/V, then `plan`.

    plan is None when there is nothing to recompute (no frames yet, or recache 'off').
    """

    session_id: str
    slot: int
    plan: PassPlan | None


@dataclass(frozen=True)
class RestoreWork:
    """A session moved here: rebuild its cache from clean latents (sink pass, then recache pass)."""

    session_id: str
    slot: int
    sink_plan: PassPlan | None
    plan: PassPlan


@dataclass(frozen=True)
class BlockWork:
    """One block of one session: its denoising passes and the commit pass all follow `plan`."""

    session_id: str
    slot: int
    seed: int
    block_index: int
    plan: PassPlan


@dataclass
class SchedulerOutput:
    moves: list[SlotMove] = field(default_factory=list)  # 1. compaction after departures
    finished_ids: list[str] = field(default_factory=list)  # 2. left since last step: free their state
    new_sessions: list[NewSession] = field(default_factory=list)  # 3. joined: load prompt context
    restores: list[RestoreWork] = field(default_factory=list)  # 4. moved here: rebuild their caches
    recaches: list[RecacheWork] = field(default_factory=list)  # 5. prompt switches, one pass each
    blocks: list[BlockWork] = field(default_factory=list)  # 6. one block each; slots 0..len-1 in order

    @property
    def is_empty(self) -> bool:
        parts = (self.moves, self.finished_ids, self.new_sessions, self.restores, self.recaches, self.blocks)
        return not any(parts)


STATE_VERSION = 1  # of Scheduler.state_dict: bump on any change to its keys or their meaning


class Scheduler:
    def __init__(self, config: GenerationConfig, max_sessions: int, max_positions: int):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.config = config
        self.max_sessions = max_sessions
        self.max_positions = max_positions
        self.sessions: dict[str, SessionState] = {}
        self.waiting: deque[str] = deque()
        self.running: list[str] = []  # index = slot
        self._leaving: list[str] = []

    # -- requests ----------------------------------------------------------------------------------
    def add_session(
        self,
        session_id: str,
        seed: int,
        num_blocks: int | None = None,
        first_frame: int = 0,
        restore_blocks: int = 0,
        sink_frames: int | None = None,
    ) -> None:
        """restore_blocks > 0: the session moved here after that many blocks; its cache is rebuilt when it
        joins (sink_frames: frames of the pass that last wrote its sink, see CacheLayout.plan_restore)."""
        if session_id in self.sessions:
            raise ValueError(f"session_id {session_id!r} already exists")
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 or None, got {num_blocks}")
        if restore_blocks < 0 or (num_blocks is not None and restore_blocks >= num_blocks):
            raise ValueError(f"restore_blocks must be in [0, num_blocks), got {restore_blocks}")
        layout = CacheLayout(self.config, self.max_positions, first_frame)
        state = SessionState(session_id, seed, num_blocks, layout)
        if restore_blocks:
            state.blocks_done = restore_blocks
            state.committed_frames = restore_blocks * self.config.block_frames
            state.sink_frames = sink_frames or self.config.sink_frames
        self.sessions[session_id] = state
        self.waiting.append(session_id)

    def set_prompt(self, session_id: str) -> None:
        """Note a new prompt; it takes effect at the session's next block boundary."""
        self._get(session_id).prompt_version += 1

    def rewind(self, session_id: str, blocks_done: int) -> None:
        """Take a running session back to after `blocks_done` blocks: the later ones are made again (with
        the same noise: it depends on the block index). A prompt set now recaches from there."""
        state = self._get(session_id)
        if state.slot < 0 or state.finished:
            raise ValueError(f"session {session_id!r} is not running")
        if not 1 <= blocks_done <= state.blocks_done:
            raise ValueError(f"blocks_done must be in [1, {state.blocks_done}], got {blocks_done}")
        state.blocks_done = blocks_done
        state.committed_frames = blocks_done * self.config.block_frames
        state.layout.rewind(state.committed_frames)

    def remove_session(self, session_id: str) -> None:
        state = self._get(session_id)
        if not state.finished:
            state.finished = True
            self._leaving.append(session_id)

    def _get(self, session_id: str) -> SessionState:
        if session_id not in self.sessions:
            raise KeyError(f"unknown session_id {session_id!r}")
        return self.sessions[session_id]

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._leaving)

    # -- state (plain data: checkpoints load with torch.load(weights_only=True), no pickle) --------------
    def state_dict(self) -> dict:
        """Versioned, JSON-able: everything `from_state_dict` needs to continue every session."""
        return {
            "version": STATE_VERSION,
            "sessions": [state.state_dict() for state in self.sessions.values()],
            "waiting": list(self.waiting),
            "running": list(self.running),
            "leaving": list(self._leaving),
        }

    @classmethod
    def from_state_dict(
        cls, config: GenerationConfig, max_sessions: int, max_positions: int, state: dict
    ) -> Scheduler:
        if not isinstance(state, dict):  # e.g. the pickle that states before version 1 were: never read
            raise ValueError(f"scheduler state must be a versioned dict, got {type(state).__name__}")
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"scheduler state version {version!r} is unknown: this code reads {STATE_VERSION}"
            )
        scheduler = cls(config, max_sessions, max_positions)
        try:
            for session in state["sessions"]:
                restored = SessionState.from_state_dict(config, max_positions, session)
                scheduler.sessions[restored.session_id] = restored
            scheduler.waiting = deque(state["waiting"])
            scheduler.running = list(state["running"])
            scheduler._leaving = list(state["leaving"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed scheduler state: {e!r}") from e
        named = {*scheduler.waiting, *scheduler.running, *scheduler._leaving}
        if not named <= scheduler.sessions.keys() or len(scheduler.running) > max_sessions:
            raise ValueError("scheduler state names unknown sessions or runs more than max_sessions")
        return scheduler

    # -- the step --------------------------------------------------------------------------------
    def schedule(self, only: set[str] | None = None) -> SchedulerOutput:
        """only: step just these running sessions (with the ones joining now), if their slots are
        contiguous (a batch is a slice of the cache); otherwise, or when None, every running session."""
        out = SchedulerOutput()
        # 1. Departures: free slots and keep the running sessions compact in slots 0..k-1.
        for session_id in self._leaving:
            state = self.sessions.pop(session_id)
            out.finished_ids.append(session_id)
            if session_id in self.waiting:
                self.waiting.remove(session_id)
                continue
            hole = state.slot
            last_id = self.running.pop()
            if last_id != session_id:
                self.running[hole] = last_id
                self.sessions[last_id].slot = hole
                out.moves.append(SlotMove(last_id, src=len(self.running), dst=hole))
        self._leaving = []
        # 2. Arrivals, first come first served, while slots are free.
        while self.waiting and len(self.running) < self.max_sessions:
            session_id = self.waiting.popleft()
            state = self.sessions[session_id]
            state.slot = len(self.running)
            state.applied_version = state.prompt_version  # its first prompt needs no recache
            self.running.append(session_id)
            out.new_sessions.append(NewSession(session_id, state.slot))
            if state.committed_frames:
                sink_plan, plan = state.layout.plan_restore(state.committed_frames, state.sink_frames)
                out.restores.append(RestoreWork(session_id, state.slot, sink_plan, plan))
        # 3. Prompt switches, then one block for every stepped session.
        stepped = self.running
        if only is not None:
            joined = {n.session_id for n in out.new_sessions}
            chosen = [sid for sid in self.running if sid in only or sid in joined]
            slots = [self.sessions[sid].slot for sid in chosen]
            if chosen and slots == list(range(slots[0], slots[0] + len(slots))):
                stepped = chosen
        for session_id in stepped:
            state = self.sessions[session_id]
            if state.prompt_version != state.applied_version:
                state.applied_version = state.prompt_version
                plan = state.layout.plan_recache(state.committed_frames)
                out.recaches.append(RecacheWork(session_id, state.slot, plan))
            plan = state.layout.plan_block(state.committed_frames)
            out.blocks.append(BlockWork(session_id, state.slot, state.seed, state.blocks_done, plan))
        return out

    def update(self, out: SchedulerOutput) -> list[str]:
        """Record the executed blocks; returns the sessions that just produced their last block."""
        done = []
        for work in out.blocks:
            state = self.sessions[work.session_id]
            state.committed_frames += self.config.block_frames
            state.blocks_done += 1
            if state.num_blocks is not None and state.blocks_done >= state.num_blocks:
                self.remove_session(work.session_id)
                done.append(work.session_id)
        return done
