"""Instant steering: a live session's blocks are sent just ahead of its playback, and a new prompt remakes
the blocks made but not sent under it (StreamingRuntime with a hand-driven clock, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

from longlive_client.schemas import SessionStatus
from longlive_core.live import StreamingRuntime
from longlive_core.pipeline import LongLivePipeline

SIZE = (48, 32)
RED, FOREST, SEA = "a red robot in a rainy city", "the robot walks into a forest", "a boat on a calm sea"
SEED = 4


@pytest.fixture(scope="module")
def pipe() -> LongLivePipeline:
    return LongLivePipeline.from_pretrained("tiny-random", device="cpu")


class Driven:
    """A live session on a runtime whose clock the test moves (lead 1.5 s, sent 0.5 s ahead; a remake is
    planned to take 0.3 s, whatever this machine's load makes the measured steps)."""

    def __init__(self, pipe: LongLivePipeline, remake_seconds: float = 0.3):
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        self.host = StreamingRuntime(
            pipe, max_sessions=2, size=SIZE, checkpoints=True, clock=clock, remake_seconds=remake_seconds
        )
        self.host.open("s", RED, seed=SEED)
        self.chunks = []

    def until(self, t: float) -> None:
        """Step and read (as a viewer does) until clock time t."""
        while True:
            self.host.run_once(max_wait=0)
            while True:
                try:
                    self.chunks.append(self.host.next_chunk("s", timeout=0))
                except TimeoutError:
                    break
            if self.now >= t:
                return
            self.now = round(self.now + 0.05, 6)

    def timeline(self) -> list[tuple[str, int | None]]:
        return [(p["prompt"], p["block"]) for p in self.host.status("s")["prompts"]]


def uninterrupted(pipe: LongLivePipeline, switches: dict[int, str], blocks: int) -> StreamingRuntime:
    """The session that got each prompt exactly at its block (a paced session, for its kept latents, on an
    unpaced clock)."""
    host = StreamingRuntime(pipe, max_sessions=1, size=SIZE, checkpoints=True, playback_speed=0)
    host.open("s", RED, seed=SEED, scheduled=switches)
    while host.status("s")["blocks_done"] < blocks:
        host.run_once()
    return host


def latent_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_a_prompt_remakes_the_unsent_blocks_as_a_session_that_got_it_there(pipe):
    run = Driven(pipe)
    run.until(0.1)  # made: blocks 0-2 (2.06 s >= 1.5 s of lead); sent: 0 and 1 (due at 0.56 s)
    view = run.host.snapshot()[0]
    assert (view.blocks_made, view.blocks_done) == (3, 2)
    run.host.post_prompt("s", SEA)
    run.host.post_prompt("s", FOREST)  # faster than blocks are made: the latest wins
    run.until(2.5)
    assert run.timeline() == [(RED, 0), (SEA, -1), (FOREST, 2)]  # block 2 made again, under FOREST
    (replacement,) = run.host.status("s")["replacements"]
    assert (replacement["block"], replacement["first_frame"], replacement["frames"]) == (2, 21, 12)
    assert replacement["prompt"] == FOREST
    # What the status route answers (the replica adds its id): the API's model, times in UTC.
    api = SessionStatus.model_validate({**run.host.status("s"), "replica": "r"})
    assert api.replacements[0].block == 2 and api.replacements[0].at.utcoffset() is not None
    assert [c.block for c in run.chunks] == list(range(len(run.chunks))) and len(run.chunks) >= 5
    assert [c.prompt for c in run.chunks[:4]] == [0, 0, 2, 2] and run.host.stalled_blocks == 0

    reference = uninterrupted(pipe, {2: FOREST}, len(run.chunks))
    got, expected = run.host.checkpoint("s").latents, reference.checkpoint("s").latents
    for block in range(len(run.chunks)):
        assert latent_error(got[block], expected[block]) < 1e-5, block
    frames = np.concatenate([c.frames for c in run.chunks]).astype(int)
    reference_frames = [reference.next_chunk("s", timeout=1).frames for _ in run.chunks]
    assert np.abs(frames - np.concatenate(reference_frames)).max() <= 1
    # Control: the block first made under RED (what the viewer would have got) is far from the remade one.
    unswitched = uninterrupted(pipe, {}, 3).checkpoint("s").latents
    assert latent_error(unswitched[2], expected[2]) > 1e-2


def test_two_remakes_one_while_the_window_fills_then_a_restore_continues_the_same_video(pipe):
    run = Driven(pipe)
    run.until(0.1)
    run.host.post_prompt("s", FOREST)  # remade from block 2: the window (4 blocks) is still filling
    run.until(4.4)  # made: 0-8 (5.81 s >= 4.4 s + 1.5 s); sent: 0-6 (block 7 is due at 5.06 s)
    view = run.host.snapshot()[0]
    assert (view.blocks_made, view.blocks_done) == (9, 7)
    run.host.post_prompt("s", SEA)  # remade from block 7: the window has slid, and 2 blocks go
    run.until(5.5)
    assert run.timeline() == [(RED, 0), (FOREST, 2), (SEA, 7)]
    replacements = run.host.status("s")["replacements"]
    assert [(r["block"], r["frames"]) for r in replacements] == [(2, 12), (7, 24)]
    assert run.host.remade_blocks == 3
    assert run.host.stalled_blocks == 0
    checkpoint = run.host.checkpoint("s")
    assert checkpoint.blocks_done == checkpoint.read_blocks == len(run.chunks)
    assert max(checkpoint.latents) == checkpoint.blocks_done - 1  # never a block that was not sent

    moved = StreamingRuntime(pipe, max_sessions=1, size=SIZE, checkpoints=True, playback_speed=0)
    resume = moved.restore(checkpoint)
    assert resume == len(run.chunks)
    while moved.status("s")["blocks_done"] < resume + 3:
        moved.run_once()
    # The restore's recache is a re-post of the prompt in effect at the resume block.
    reference = uninterrupted(pipe, {2: FOREST, 7: SEA, resume: SEA}, resume + 3)
    got, expected = moved.checkpoint("s").latents, reference.checkpoint("s").latents
    for block in range(resume, resume + 3):
        assert latent_error(got[block], expected[block]) < 1e-5, block
    kept = reference.checkpoint("s").latents
    assert all(latent_error(checkpoint.latents[b], kept[b]) < 1e-5 for b in checkpoint.latents)
    # Control: without the second remake (SEA applied after the blocks made), the video differs.
    late = uninterrupted(pipe, {2: FOREST, 8: SEA, resume: SEA}, resume + 1).checkpoint("s").latents
    assert latent_error(late[7], kept[7]) > 1e-2


def test_a_remake_that_would_be_late_is_not_made(pipe):
    """Block 2 (unsent) is due at 1.31 s: a remake planned to take 1.5 s from t = 0.1 would be late, so the
    prompt applies after the blocks made, and nothing is thrown away."""
    run = Driven(pipe, remake_seconds=1.5)
    run.until(0.1)
    run.host.post_prompt("s", FOREST)
    run.until(1.0)
    assert run.timeline() == [(RED, 0), (FOREST, 3)] and run.host.status("s")["replacements"] == []


def test_a_prompt_too_late_for_any_unsent_block_applies_after_the_blocks_made(pipe):
    """Sent at once (send_lead = lead), nothing waits unsent: the prompt takes the next block made."""
    now = [0.0]
    host = StreamingRuntime(
        pipe, max_sessions=1, size=SIZE, lead_seconds=1.0, send_lead_seconds=1.0, clock=lambda: now[0]
    )
    host.open("s", RED, seed=SEED)
    for _ in range(4):
        host.run_once(max_wait=0)
    view = host.snapshot()[0]
    assert view.blocks_made == view.blocks_done == 2
    host.post_prompt("s", FOREST)
    host.run_once(max_wait=0)
    now[0] = 1.0
    host.run_once(max_wait=0)
    status = host.status("s")
    assert [p["block"] for p in status["prompts"]] == [0, 2] and status["replacements"] == []
    with pytest.raises(ValueError, match="send_lead_seconds"):
        StreamingRuntime(pipe, max_sessions=1, size=SIZE, lead_seconds=1.0, send_lead_seconds=2.0)


def test_the_service_config_keeps_sending_within_the_lead():
    from pydantic import ValidationError

    from deployments.config import ServiceConfig

    with pytest.raises(ValidationError, match="send_lead_seconds"):
        ServiceConfig(lead_seconds=1.0, send_lead_seconds=1.5)
    assert ServiceConfig(send_lead_seconds=None).send_lead_seconds is None
