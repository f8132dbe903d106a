"""StreamingRuntime: several live sessions on one engine give the frames of the single-session pipeline."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from longlive_core.live import CapacityError, StreamingRuntime, UnknownSessionError
from longlive_core.pipeline import LongLivePipeline

SIZE = (48, 32)
RED, FOREST, SEA = "a red robot in a rainy city", "the robot walks into a forest", "a boat on a calm sea"


@pytest.fixture(scope="module")
def pipe() -> LongLivePipeline:
    return LongLivePipeline.from_pretrained("tiny-random", device="cpu")


def pipeline_video(pipe, prompt: str, seed: int, blocks: int, switch: tuple[int, str] | None) -> np.ndarray:
    stream = pipe.stream(prompt, seconds=None, seed=seed, size=SIZE)  # open-ended: relative RoPE
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if switch is not None and stream.blocks_done == switch[0]:
            stream.set_prompt(switch[1])
        if len(chunks) == blocks:
            return np.concatenate(chunks)
    raise AssertionError("stream ended early")


def test_batched_live_sessions_equal_the_pipeline_with_the_same_switches(pipe):
    host = StreamingRuntime(pipe, max_sessions=3, size=SIZE, playback_speed=0)
    host.open("a", RED, seed=4)
    host.open("b", SEA, seed=9)
    chunks_a, chunks_b = [], []
    while len(chunks_a) < 5:
        host.run_once()
        chunks_a.append(host.next_chunk("a", timeout=5))
        chunks_b.append(host.next_chunk("b", timeout=5))
        if len(chunks_a) == 2:
            host.post_prompt("a", FOREST)
    timeline = host.status("a")["prompts"]
    assert [(p["prompt"], p["block"]) for p in timeline] == [(RED, 0), (FOREST, 2)]
    assert [c.prompt for c in chunks_a] == [0, 0, 1, 1, 1] and [c.block for c in chunks_a] == list(range(5))
    live_a = np.concatenate([c.frames for c in chunks_a])
    live_b = np.concatenate([c.frames for c in chunks_b])
    expected_a = pipeline_video(pipe, RED, 4, 5, (2, FOREST))
    expected_b = pipeline_video(pipe, SEA, 9, 5, None)
    assert np.abs(live_a.astype(int) - expected_a).max() <= 1
    assert np.abs(live_b.astype(int) - expected_b).max() <= 1
    unswitched = pipeline_video(pipe, RED, 4, 5, None)
    assert np.abs(unswitched[21:].astype(int) - live_a[21:]).max() > 1  # control: the switch shows


def test_capacity_unknown_sessions_and_bad_input(pipe):
    host = StreamingRuntime(pipe, max_sessions=1, size=SIZE, playback_speed=0)
    host.open("a", RED)
    with pytest.raises(CapacityError):
        host.open("b", RED)
    with pytest.raises(UnknownSessionError):
        host.post_prompt("nope", RED)
    with pytest.raises(ValueError, match="empty"):
        host.post_prompt("a", "  ")
    with pytest.raises(ValueError, match="exists"):
        host.open("a", RED)
    host.close("a")
    host.run_once()
    assert host.next_chunk("a", timeout=1) is None and host.status("a")["state"] == "ended"
    host.open("b", RED)  # the slot is free again


def test_duration_limit_ends_the_session_and_frees_its_slot(pipe):
    host = StreamingRuntime(pipe, max_sessions=1, size=SIZE, playback_speed=0)
    host.open("a", RED, max_seconds=1.0)  # 16 frames -> 2 blocks (21 frames)
    frames = 0
    while host.status("a")["state"] != "ended":
        host.run_once()
    while (chunk := host.next_chunk("a", timeout=1)) is not None:
        frames += len(chunk.frames)
    assert frames == 21 and host.load == 0


def test_pacing_keeps_generation_just_ahead_of_playback_and_sending_just_ahead_of_the_screen(pipe):
    now = [0.0]
    host = StreamingRuntime(pipe, max_sessions=1, size=SIZE, lead_seconds=1.0, clock=lambda: now[0])
    host.open("a", RED)
    for _ in range(6):
        host.run_once(max_wait=0)

    def made_and_sent() -> tuple[int, int]:
        view = host.snapshot()[0]
        return view.blocks_made, view.blocks_done

    # t=0: blocks until the video made (9, 21, ... frames at 16 fps) covers 1 s of lead; only the first is
    # sent (block 1 is due at 9/16 s, sent 0.5 s before).
    assert made_and_sent() == (2, 1)  # 21 frames = 1.31 s >= 1 s
    while now[0] < 3.0:  # 3 s played + 1 s lead = 4 s = 64 frames -> 6 blocks (69 frames); sent: due by 3.5 s
        now[0] += 0.05
        host.run_once(max_wait=0)
    assert made_and_sent() == (6, 5)  # block 4 starts at frame 45 (2.81 s), block 5 at 57 (3.56 s)
    assert host.stalled_blocks == 0


def test_a_restored_session_is_paced_from_where_it_resumes(pipe):
    """Its playback clock starts at its first block on the new host, at the frame it resumes at: it keeps
    its lead from there (a clock counted from frame 0 froze it for as long as it had played)."""
    a = StreamingRuntime(pipe, max_sessions=1, size=SIZE, playback_speed=0, checkpoints=True)
    a.open("a", RED)
    for _ in range(12):
        a.run_once()
    now = [0.0]
    b = StreamingRuntime(
        pipe, max_sessions=1, size=SIZE, lead_seconds=1.0, checkpoints=True, clock=lambda: now[0]
    )
    assert b.restore(a.checkpoint("a"), from_frame=a.status("a")["frames_done"]) == 12
    for _ in range(50):
        b.run_once(max_wait=0.01)
    view = b.snapshot()[0]
    assert (view.blocks_made, view.blocks_done) == (14, 13)  # 2 blocks = 24 frames = 1.5 s >= 1 s of lead
    while now[0] < 3.0:  # 3 s played + 1 s lead = 64 frames -> 6 blocks (72 frames), none late
        now[0] += 0.05
        b.run_once(max_wait=0)
    view = b.snapshot()[0]
    assert (view.blocks_made, view.blocks_done) == (18, 17) and b.stalled_blocks == 0  # sent: due by 3.5 s


def test_slow_client_loses_old_blocks_not_the_others_progress(pipe):
    host = StreamingRuntime(pipe, max_sessions=2, size=SIZE, playback_speed=0, buffer_blocks=2)
    host.open("slow", RED)
    host.open("fast", SEA)
    got = []
    for _ in range(5):
        host.run_once()
        got.append(host.next_chunk("fast", timeout=1).block)
    status = host.status("slow")
    assert got == list(range(5)) and status["buffered_blocks"] == 2 and status["dropped_blocks"] == 3
    assert host.next_chunk("slow", timeout=1).block == 3


def test_engine_thread_and_reader_threads(pipe):
    host = StreamingRuntime(pipe, max_sessions=1, size=SIZE, playback_speed=0)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [host.run_once() for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    try:
        host.open("a", RED, max_seconds=2)
        blocks = []
        while (chunk := host.next_chunk("a", timeout=30)) is not None:
            blocks.append(chunk.block)
        assert blocks == [0, 1, 2]
    finally:
        stop.set()
        thread.join(5)


def test_scheduled_prompts_apply_exactly_at_their_blocks_unpaced(pipe):
    now = [0.0]  # a frozen playback clock: only an unpaced session can get ahead of it
    host = StreamingRuntime(pipe, max_sessions=2, size=SIZE, lead_seconds=0.5, clock=lambda: now[0])
    host.open("job", RED, seed=4, max_seconds=3, scheduled={2: FOREST}, paced=False)
    host.open("live", SEA, seed=9)
    for _ in range(5):
        host.run_once(max_wait=0)
    # A live session sets the pace: past the first two blocks (steps of their own for new sessions), no
    # more, as its blocks cover the 0.5 s lead of the frozen clock.
    assert [v.blocks_made for v in host.snapshot()] == [2, 2]
    host.close("live")
    while host.status("job")["state"] != "ended":  # alone, the batch session runs flat out
        host.run_once(max_wait=0)
    chunks = [host.next_chunk("job", timeout=1) for _ in range(5)]
    assert [(p["prompt"], p["block"]) for p in host.status("job")["prompts"]] == [(RED, 0), (FOREST, 2)]
    expected = pipeline_video(pipe, RED, 4, 5, (2, FOREST))
    assert np.abs(np.concatenate([c.frames for c in chunks]).astype(int) - expected).max() <= 1


def run_until(host: StreamingRuntime, sid: str, blocks: int, posts: dict[int, str], read_upto: int) -> list:
    """Step until `blocks` blocks exist; post prompts before given blocks; read chunks below read_upto."""
    chunks, start = [], host.status(sid)["blocks_done"]
    while host.status(sid)["blocks_done"] < blocks:
        if (done := host.status(sid)["blocks_done"]) in posts:
            host.post_prompt(sid, posts.pop(done), event_id=f"{1000 + done}-0")
        host.run_once()
        while start + len(chunks) < min(read_upto, host.status(sid)["blocks_done"]):
            chunks.append(host.next_chunk(sid, timeout=5))
    return chunks


def test_a_session_moved_twice_in_a_row_resumes_both_times(pipe):
    """Its second host dies right after the restore, before the engine joined it: the checkpoint that
    host wrote meanwhile (a replica saves a new session at once) still holds what a restore needs."""
    from longlive_core.checkpoint import CheckpointError, SessionCheckpoint

    def host() -> StreamingRuntime:
        return StreamingRuntime(pipe, max_sessions=1, size=SIZE, playback_speed=0, checkpoints=True)

    a = host()
    a.open("s", RED, seed=4)
    run_until(a, "s", 9, {}, read_upto=9)
    b = host()
    assert b.restore(a.checkpoint("s")) == 9
    saved = b.checkpoint("s")  # before any step of b
    assert sorted(saved.latents) == sorted(a.checkpoint("s").latents)
    c = host()
    with pytest.raises(CheckpointError, match="lacks the latents"):  # control: what was lost before
        c.restore(SessionCheckpoint.from_parts(json.loads(saved.meta_json()), {}))
    assert c.restore(saved) == 9
    assert [chunk.block for chunk in run_until(c, "s", 10, {}, read_upto=10)] == [9]


def test_a_prompt_posted_right_after_a_restore_takes_the_block_after_the_resume_switch(pipe):
    """The checkpoint holds a switch made at the very block the restore resumes at (its old host took it
    for the block it was making): a prompt posted before the new host's first step comes one block later,
    never at that block too (it superseded the first one unseen)."""
    from dataclasses import replace

    from longlive_core.checkpoint import TimelineEntry

    a = StreamingRuntime(pipe, max_sessions=1, size=SIZE, playback_speed=0, checkpoints=True)
    a.open("s", RED, seed=4)
    run_until(a, "s", 4, {}, read_upto=4)
    cp = a.checkpoint("s")
    cp = replace(cp, timeline=[*cp.timeline, TimelineEntry(FOREST, 0.0, block=4, applied_at=0.0)])
    b = StreamingRuntime(pipe, max_sessions=1, size=SIZE, playback_speed=0, checkpoints=True)
    assert b.restore(cp) == 4
    b.post_prompt("s", SEA)
    run_until(b, "s", 6, {}, read_upto=6)
    assert [(p["prompt"], p["block"]) for p in b.status("s")["prompts"]] == [(RED, 0), (FOREST, 4), (SEA, 5)]


def test_a_restored_session_resumes_where_the_viewer_is_with_its_prompts(pipe):
    """Host A dies after 9 blocks, its viewer having read 7; host B restores the checkpoint (through its
    serialised form) and continues at block 7: the switch A made at block 8 is made again there, a prompt
    still waiting is applied after it and one posted to the log after the checkpoint after that (neither
    supersedes the other), and the latents equal those of a session that never moved and had its prompt
    re-posted at block 7. Decoded frames differ only by the primed decoder's warm-up."""
    from longlive_core.checkpoint import SessionCheckpoint, tensor_bytes

    def host() -> StreamingRuntime:
        return StreamingRuntime(pipe, max_sessions=2, size=SIZE, playback_speed=0, checkpoints=True)

    a = host()
    a.open("s", RED, seed=4)
    run_until(a, "s", 9, {2: FOREST, 8: SEA}, read_upto=7)
    a.post_prompt("s", "late prompt", event_id="2000-0")  # posted, not applied when A dies
    cp = a.checkpoint("s")
    assert cp.last_event_id == "2000-0" and cp.read_blocks == 7 and cp.blocks_done == 9
    assert sorted(cp.latents) == list(range(9))  # first 4 blocks + the last 4 + rollback 4: all so far
    blobs = {b: tensor_bytes(t) for b, t in cp.latents.items()}
    moved = SessionCheckpoint.from_parts(json.loads(cp.meta_json()), blobs)

    b = host()
    b.open("neighbour", SEA, seed=1)  # B is busy with another session
    b.run_once()
    recovered = [("posted while A was gone", "2001-0")]
    assert b.restore(moved, recovered=recovered) == 7
    chunks = run_until(b, "s", 11, {}, read_upto=11)
    assert [c.block for c in chunks] == [7, 8, 9, 10]
    assert chunks[0].first_frame == 81  # video frames continue without a gap: 9 + 6 x 12
    timeline = [(p["prompt"], p["block"]) for p in b.status("s")["prompts"]]
    assert timeline == [(RED, 0), (FOREST, 2), (SEA, 8), ("late prompt", 9), ("posted while A was gone", 10)]

    stayed = host()  # never moved: the same prompts at the same blocks, and FOREST re-posted at block 7
    stayed.open("s", RED, seed=4)
    posts = {2: FOREST, 7: FOREST, 8: SEA, 9: "late prompt", 10: "posted while A was gone"}
    expected = run_until(stayed, "s", 11, posts, read_upto=11)
    got_latents, expected_latents = b.checkpoint("s").latents, stayed.checkpoint("s").latents
    for block in range(7, 11):
        error = (got_latents[block] - expected_latents[block]).norm() / expected_latents[block].norm()
        assert error < 1e-5, (block, error)
    frames = np.concatenate([c.frames for c in chunks]).astype(int)
    reference = np.concatenate([c.frames for c in expected[7:]])
    error = np.abs(frames - reference).mean()
    shifted = np.abs(frames[12:] - reference[:-12]).mean()  # control: the neighbouring block's frames
    assert error < 2.0 and shifted > 3 * error, (error, shifted)

    # Resumed at its newest block (the viewer read all 9): the waiting prompt takes effect at that very
    # block and the recovered one at the next (a restored session joins before switches are taken).
    c = host()
    from_frame = 9 + 8 * 12  # the first frame of block 9
    assert c.restore(moved, from_frame=from_frame, recovered=recovered) == 9
    run_until(c, "s", 11, {}, read_upto=11)
    timeline = [(p["prompt"], p["block"]) for p in c.status("s")["prompts"]]
    assert timeline[-2:] == [("late prompt", 9), ("posted while A was gone", 10)]

    # Resumed at block 8, where A switched to SEA: SEA keeps its block (the restore's recache is that
    # switch), the others follow it, one block each (none supersedes SEA before a block was made of it).
    d = host()
    assert d.restore(moved, from_frame=9 + 7 * 12, recovered=recovered) == 8
    run_until(d, "s", 11, {}, read_upto=11)
    timeline = [(p["prompt"], p["block"]) for p in d.status("s")["prompts"]]
    assert timeline[-3:] == [(SEA, 8), ("late prompt", 9), ("posted while A was gone", 10)]
