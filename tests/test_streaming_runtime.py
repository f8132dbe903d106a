"""StreamingRuntime: mixed-phase batches, one loop for every path, encoding off the engine thread, typed
session states, the bounded list of pass shapes and admission by measured step time."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from longlive_core.cache_plan import PassShape, attention_shape, pass_shapes
from longlive_core.config import GenerationConfig
from longlive_core.live import (
    BlockGone,
    CapacityError,
    InvalidTransition,
    LiveSession,
    SessionEnded,
    SessionPhase,
    StreamingRuntime,
)
from longlive_core.pipeline import LongLivePipeline
from longlive_core.scheduler import Scheduler

SIZE = (48, 32)
RED, FOREST, SEA = "a red robot in a rainy city", "the robot walks into a forest", "a boat on a calm sea"


@pytest.fixture(scope="module")
def pipe() -> LongLivePipeline:
    return LongLivePipeline.from_pretrained("tiny-random", device="cpu")


def runtime(pipe, **kw) -> StreamingRuntime:
    kw.setdefault("playback_speed", 0)
    return StreamingRuntime(pipe, size=SIZE, **kw)


def read_all(rt: StreamingRuntime, sid: str) -> list:
    chunks = []
    while rt.status(sid)["buffered_blocks"]:
        chunks.append(rt.next_chunk(sid, timeout=0))
    return chunks


def alone(pipe, prompt: str, seed: int, blocks: int, posts: dict[int, str]) -> np.ndarray:
    rt = runtime(pipe, max_sessions=1)
    rt.open("s", prompt, seed=seed)
    chunks = []
    while len(chunks) < blocks:
        if (done := rt.status("s")["blocks_done"]) in posts:
            rt.post_prompt("s", posts.pop(done))
        rt.run_once()
        chunks += read_all(rt, "s")
    return np.concatenate([c.frames for c in chunks[:blocks]]).astype(int)


def test_sessions_in_mixed_phases_batched_equal_each_session_alone(pipe):
    """b joins while a is two blocks in (first block beside a filling window), a switches prompt at block
    4 (a recache in the same step as b's block): each equals its own run alone, decode included."""
    rt = runtime(pipe, max_sessions=3)
    rt.open("a", RED, seed=4)
    got = {"a": [], "b": []}
    for _ in range(2):
        rt.run_once()
        got["a"] += read_all(rt, "a")
    rt.open("b", SEA, seed=9)
    while len(got["b"]) < 4:
        if rt.status("a")["blocks_done"] == 4:
            rt.post_prompt("a", FOREST)
        rt.run_once()
        for sid in got:
            got[sid] += read_all(rt, sid)
    assert rt.engine.shapes_seen >= {PassShape(2, 3, 12, "keys")}  # the mixed batch did run
    frames = {sid: np.concatenate([c.frames for c in chunks]).astype(int) for sid, chunks in got.items()}
    assert np.abs(frames["a"] - alone(pipe, RED, 4, 6, {4: FOREST})).max() <= 1
    assert np.abs(frames["b"] - alone(pipe, SEA, 9, 4, {})).max() <= 1
    other_seed = alone(pipe, SEA, 10, 4, {})
    assert np.abs(frames["b"] - other_seed).mean() > 3  # control: the comparison can fail


def test_generate_a_batch_job_and_a_live_session_make_identical_frames(pipe):
    """One RoPE mode (relative, the open-ended paths' mode), one seed, one schedule: the pipeline's stream
    (what `longlive generate` runs), a job's scheduled session and a live session steered by hand."""
    relative = LongLivePipeline(
        pipe.transformer,
        pipe.text_encoder,
        pipe.vae,
        GenerationConfig(rope_mode="relative"),
        pipe.default_size,
    )
    from longlive_core.schedule import PromptChange

    schedule = [PromptChange(at=0, prompt=RED), PromptChange(at=1.3, prompt=FOREST)]  # block 2 (frame 21)
    generated = np.concatenate(list(relative.stream(schedule=schedule, seconds=2.8, seed=3, size=SIZE)))
    assert len(generated) == 9 + 3 * 12

    rt = runtime(relative, max_sessions=2)
    rt.open("job", RED, seed=3, max_seconds=2.8, scheduled={2: FOREST}, paced=False)
    rt.open("live", RED, seed=3)
    chunks = {"job": [], "live": []}
    while len(chunks["live"]) < 4:
        if rt.status("live")["blocks_done"] == 2 and len(rt.status("live")["prompts"]) == 1:
            rt.post_prompt("live", FOREST)
        rt.run_once()
        for sid in chunks:
            chunks[sid] += read_all(rt, sid)
    for sid in chunks:
        frames = np.concatenate([c.frames for c in chunks[sid]]).astype(int)
        assert np.abs(frames - generated).max() <= 1, sid
    unswitched = np.concatenate(list(relative.stream(RED, seconds=2.8, seed=3, size=SIZE))).astype(int)
    assert np.abs(unswitched[21:] - generated[21:]).max() > 1  # control: the switch shows


class GatedEncoder:
    """The tiny text encoder, held at one prompt until the test opens the gate."""

    def __init__(self, encoder, slow: str):
        self.encoder, self.slow = encoder, slow
        self.gate, self.entered = threading.Event(), threading.Event()
        self.device = encoder.device

    def encode(self, prompt: str):
        if prompt == self.slow:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return self.encoder.encode(prompt)


def test_a_prompt_is_encoded_while_steps_run(pipe):
    rt = runtime(pipe, max_sessions=2, background_encoding=True)
    rt.encoder.encoder = GatedEncoder(pipe.text_encoder, FOREST)
    rt.open("a", RED)
    rt.open("b", SEA)
    while rt.snapshot()[0].phase is SessionPhase.QUEUED or rt.snapshot()[1].phase is SessionPhase.QUEUED:
        rt.run_once()
    rt.post_prompt("a", FOREST)
    assert rt.encoder.encoder.entered.wait(10)
    steps = 0
    for _ in range(4):  # the encoder is stuck on FOREST: both sessions go on
        steps += rt.run_once()
    assert steps == 4 and rt.status("a")["prompts"][1]["block"] is None
    rt.encoder.encoder.gate.set()
    for _ in range(50):
        rt.run_once()
        if rt.status("a")["prompts"][1]["block"] is not None:
            break
    assert rt.status("a")["prompts"][1]["block"] >= 4 and rt.status("b")["blocks_done"] >= 5
    rt.shutdown()


def test_prompts_posted_faster_than_blocks_the_latest_wins(pipe):
    rt = runtime(pipe, max_sessions=1)
    rt.open("a", RED)
    rt.run_once()
    for prompt in (FOREST, SEA, "a third prompt"):
        rt.post_prompt("a", prompt)
    rt.run_once()
    assert [p["block"] for p in rt.status("a")["prompts"]] == [0, -1, -1, 1]


def test_the_state_machine_refuses_impossible_transitions(pipe):
    session = LiveSession("s", 0, None, [], True, 0.0)
    with pytest.raises(InvalidTransition):
        session.move_to(SessionPhase.QUEUED)
    session.move_to(SessionPhase.LIVE)
    session.move_to(SessionPhase.ENDED, "closed")
    for phase in (SessionPhase.ENDED, SessionPhase.FAILED, SessionPhase.LIVE):  # a second end, a revival
        with pytest.raises(InvalidTransition):
            session.move_to(phase)
    rt = runtime(pipe, max_sessions=1)
    rt.open("a", RED)
    rt.run_once()
    rt.close("a")
    rt.close("a")  # closing an ended session is a no-op, not a second end
    with pytest.raises(SessionEnded):
        rt.post_prompt("a", FOREST)
    assert rt.status("a")["state"] == "ended"


def test_a_failed_decode_fails_that_session_alone(pipe):
    rt = runtime(pipe, max_sessions=2)
    rt.open("a", RED)
    rt.open("b", SEA)
    rt.run_once()

    def broken(block):
        raise RuntimeError("CUDA out of memory (simulated)")

    rt._sessions["a"].decoder_stream.decode = broken
    for _ in range(3):
        rt.run_once()
    assert rt.status("a")["state"] == "error" and "out of memory" in rt.status("a")["error"]
    assert rt.status("b")["state"] == "live" and rt.status("b")["blocks_done"] == 4
    assert rt.load == 1  # a left the engine; b goes on


def test_the_bounded_shapes_cover_every_batch_admission_allows():
    """Pure Python: random opens, closes, restores, switches and single-session steps through the
    scheduler; every pass it plans has a shape in the bounded list the warm-up compiles."""
    config = GenerationConfig(rope_mode="relative")
    shapes = pass_shapes(config, 3, 1024)
    assert len(shapes) <= 20 and PassShape(4, 3, 12, "keys") not in shapes
    rng = random.Random(0)
    scheduler, seen, names = Scheduler(config, 3, 1024), set(), iter(range(10**6))
    for _ in range(400):
        live = [s for s, state in scheduler.sessions.items() if not state.finished]
        op = rng.random()
        if op < 0.15 and len(live) < 3:
            restore = rng.choice([0, 0, rng.randint(1, 12)])
            scheduler.add_session(f"s{next(names)}", 0, restore_blocks=restore)
        elif op < 0.25 and live:
            scheduler.remove_session(rng.choice(live))
        elif op < 0.45 and live:
            scheduler.set_prompt(rng.choice(live))
        only = {rng.choice(live)} if live and rng.random() < 0.2 else None
        out = scheduler.schedule(only)
        plans = [[w.plan for w in out.blocks]] if out.blocks else []
        plans += [[r.plan] for r in out.recaches if r.plan is not None]
        plans += [[p] for r in out.restores for p in (r.sink_plan, r.plan) if p is not None]
        for batch in plans:
            seen.add(attention_shape(batch))
        scheduler.update(out)
    assert seen <= shapes, sorted(seen - shapes)
    assert PassShape(3, 3, 12, "keys") in seen and PassShape(1, 9, 12, "none") in seen  # it got around


def test_warm_up_runs_every_shape_and_measures_each_batch_size(pipe):
    rt = runtime(pipe, max_sessions=3, checkpoints=True, playback_speed=1.0)
    assert rt.unwarmed_shapes  # control: nothing has run yet
    rt.warm_up(every_shape=True)
    assert rt.unwarmed_shapes == set() and rt.load == 0 and rt.snapshot() == []
    assert all(rt.predicted_step_seconds(b) for b in (1, 2, 3)) and rt.recompiles == 0


def test_admission_by_measured_step_time(pipe):
    """Played back 1000x faster, no tiny-model step keeps real time: live sessions are refused with the
    measured figure; batch work (unpaced) is still admitted, and a runtime that admits by slots alone
    takes the live session."""
    rt = runtime(pipe, max_sessions=2, playback_speed=1000.0)
    rt.warm_up(1)
    with pytest.raises(CapacityError, match="measured"):
        rt.open("live", RED)
    rt.open("job", RED, paced=False)
    by_slots = runtime(pipe, max_sessions=2, playback_speed=1000.0, realtime_margin=None)
    by_slots.warm_up(1)
    by_slots.open("live", RED)


def test_step_records_say_what_each_step_ran(pipe):
    """A first block, steady blocks, a switch's recache and a restore are each recorded as such; the
    GatedEncoder holds a prompt's encoding, and the steps beside it say so."""
    rt = runtime(pipe, max_sessions=2, checkpoints=True, background_encoding=True)
    rt.encoder.encoder = GatedEncoder(pipe.text_encoder, FOREST)
    rt.open("a", RED)
    while not rt.steps:
        rt.run_once()
        rt.drain()
    assert (rt.steps[-1].sessions, rt.steps[-1].joined) == (1, 1) and not rt.steps[-1].steady
    rt.run_once()
    rt.drain()
    assert rt.steps[-1].steady and rt.steps[-1].dit_seconds > 0 and rt.steps[-1].decode_seconds > 0
    rt.post_prompt("a", FOREST)
    assert rt.encoder.encoder.entered.wait(10)
    rt.run_once()
    rt.drain()
    assert rt.steps[-1].encoding and rt.steps[-1].recaches == 0
    rt.encoder.encoder.gate.set()
    while not rt.steps[-1].recaches:
        rt.run_once()
        rt.drain()
    assert rt.steps[-1].recaches == 1 and not rt.steps[-1].steady
    read_all(rt, "a")  # a restore resumes after the blocks a viewer read
    moved = rt.checkpoint("a")
    rt.close("a")
    rt.run_once()
    rt.forget("a")
    rt.restore(moved)  # the same id again, on the same runtime
    while not rt.steps[-1].restores:
        rt.run_once()
        rt.drain()
    assert rt.steps[-1].restores == 1 and rt.status("a")["state"] == "live"
    rt.shutdown()


def test_a_session_id_can_come_back_after_it_ended(pipe):
    """Closed, forgotten and opened again at once (before the engine dropped the first): the new session
    is a session of its own, equal to one on a fresh runtime; the old one's leftovers reach nobody."""
    rt = runtime(pipe, max_sessions=1)
    rt.open("s", RED, seed=3)
    rt.run_once()
    rt.close("s")
    rt.forget("s")
    rt.open("s", SEA, seed=5)
    chunks = []
    while len(chunks) < 3:
        rt.run_once()
        chunks += read_all(rt, "s")
    assert [c.block for c in chunks] == [0, 1, 2]
    frames = np.concatenate([c.frames for c in chunks]).astype(int)
    assert np.abs(frames - alone(pipe, SEA, 5, 3, {})).max() <= 1
    assert np.abs(frames - alone(pipe, RED, 3, 3, {})).mean() > 3  # control: another session's frames


def test_a_session_forgotten_while_its_block_is_made_takes_no_other_sessions_block(pipe):
    """Closed and forgotten by another thread during the step that makes its block (a moved session):
    that block reaches nobody, and the other session's block of the same step is delivered."""
    rt = runtime(pipe, max_sessions=2)
    rt.open("a", RED)
    rt.open("b", SEA)
    rt.run_once()
    step = rt.engine.step

    def step_while_a_leaves(only):
        latents = step(only)
        rt.close("a")  # as the Generator's thread does while the engine thread steps
        rt.forget("a")
        return latents

    rt.engine.step = step_while_a_leaves
    rt.run_once()
    rt.engine.step = step
    assert [c.block for c in read_all(rt, "b")] == [0, 1]
    rt.run_once()
    assert [c.block for c in read_all(rt, "b")] == [2] and rt.load == 1


def test_the_engine_thread_warms_up_on_itself_and_reports_a_failed_warm_up(pipe):
    from longlive_core.engine_thread import EngineThread

    rt = runtime(pipe, max_sessions=1)
    engine = EngineThread(rt)
    engine.start()
    assert rt._warmed_thread == engine._thread.ident and engine.warm_up_seconds > 0
    rt.open("s", RED, num_blocks=2)
    assert rt.next_chunk("s", timeout=60).block == 0 and rt.next_chunk("s", timeout=60).block == 1
    engine.stop(timeout=30)
    assert not engine.alive

    broken = runtime(pipe, max_sessions=1)
    broken.engine.model = None  # the warm-up's first step fails
    with pytest.raises(AttributeError, match="NoneType"):
        EngineThread(broken).start()


def test_every_viewer_reads_every_block_at_its_own_cursor(pipe):
    """Two viewers and the one-reader cursor each get all blocks; a watcher hears of each block and of
    the end; a viewer that fell behind the ring is told the oldest frame kept, and next_chunk's reader
    skips (and counts) what it missed."""
    rt = runtime(pipe, max_sessions=1, buffer_blocks=3)
    rt.open("s", RED, num_blocks=6)
    heard = []
    unwatch = rt.watch("s", lambda: heard.append(rt._sessions["s"].blocks_done))
    for _ in range(2):
        rt.run_once()
    first, second = rt.read_block("s", 0, timeout=0), rt.read_block("s", 0, timeout=0)
    assert first is second and rt.next_chunk("s", timeout=0) is first  # nobody takes a block from another
    assert [rt.read_block("s", b, timeout=0).block for b in (0, 1)] == [0, 1]
    with pytest.raises(TimeoutError):
        rt.read_block("s", 2, timeout=0)  # not made yet
    while not rt.snapshot()[0].ended:
        rt.run_once()
    assert heard == [1, 2, 3, 4, 5, 6]  # each block (the last one ends the session: one call)
    with pytest.raises(BlockGone) as gone:
        rt.read_block("s", 1, timeout=0)  # the ring keeps blocks 3..5
    assert gone.value.oldest_frame == rt.read_block("s", 3, timeout=0).first_frame
    assert rt.read_block("s", 6, timeout=0) is None  # never made: the session ended first
    assert [rt.next_chunk("s", timeout=0).block for _ in range(3)] == [3, 4, 5]
    assert rt.next_chunk("s", timeout=0) is None and rt.status("s")["dropped_blocks"] == 2
    unwatch()
    assert rt._sessions["s"].watchers == []


def test_a_new_viewers_first_two_blocks_run_as_steps_of_their_own(pipe):
    """While the live session has its lead buffered, the new one's first and second blocks each run alone
    (its second is due 0.56 s after its first: a step of the whole batch would be late); then steps make
    both sessions' blocks again."""
    now = [0.0]
    rt = runtime(pipe, max_sessions=2, playback_speed=1.0, clock=lambda: now[0])
    rt.open("a", RED)
    for _ in range(4):
        rt.run_once(max_wait=0)  # a: its lead made (3 blocks)
    rt.steps.clear()
    rt.open("b", SEA)
    for _ in range(2):
        rt.run_once(max_wait=0)
    assert [r.sessions for r in rt.steps] == [1, 1] and rt.steps[0].joined == 1
    assert [v.blocks_made for v in rt.snapshot()] == [3, 2]
    rt.run_once(max_wait=0)  # b's lead is not made yet: one step for both
    assert [r.sessions for r in rt.steps] == [1, 1, 2]
