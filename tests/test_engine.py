"""The batched Engine equals running each session alone; memory stays constant; output is deterministic."""

from __future__ import annotations

import resource

import pytest
import torch

from longlive_core.config import GenerationConfig
from longlive_core.engine import Engine, padded_prompt
from longlive_core.session import GenerationSession
from tests.helpers import prompt, rel_err, tiny_model

SIZE = (4, 6)
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def _alone(model, cfg, prompts, seed, blocks, switch_before=None):
    session = GenerationSession(model, cfg, SIZE, prompts[0], seed=seed)
    out = []
    for b in range(blocks):
        if b == switch_before:
            session.set_prompt(prompts[1])
        out.append(session.next_block())
    return out


def test_batched_sessions_equal_each_alone(model):
    """Four sessions, different prompts, seeds and frame offsets; one joins late and waits for a slot,
    one leaves early (its slot is compacted), one switches prompt mid-run after the window is full."""
    cfg = GenerationConfig()
    engine = Engine(model, cfg, SIZE, max_sessions=3)
    plan = {  # id: (seed, prompts, join step, blocks, switch before its block)
        "a": (1, [prompt(0), prompt(4)], 0, 8, None),
        "b": (2, [prompt(1), prompt(5)], 1, 3, None),
        "c": (3, [prompt(2), prompt(6)], 2, 7, 5),
        "d": (4, [prompt(3), prompt(7)], 2, 4, None),  # engine full at step 2: waits until b leaves
    }
    got: dict[str, list[torch.Tensor]] = {k: [] for k in plan}
    step = 0
    while step == 0 or engine.has_work():
        for sid, (seed, prompts, join, blocks, _) in plan.items():
            if join == step:
                engine.add_session(sid, prompts[0], seed=seed, num_blocks=blocks)
        for sid, (_, prompts, _, _, switch) in plan.items():
            if switch is not None and len(got[sid]) == switch:
                engine.set_prompt(sid, prompts[1])
        for sid, block in engine.step().items():
            got[sid].append(block.clone())
        step += 1
        assert step < 20
    assert len(got["d"]) == 4 and step > 4  # d really waited
    for sid, (seed, prompts, _, blocks, switch) in plan.items():
        expected = _alone(model, cfg, prompts, seed, blocks, switch)
        assert len(got[sid]) == blocks
        for b, (x, y) in enumerate(zip(got[sid], expected, strict=True)):
            assert rel_err(x, y) < TOL, (sid, b)
    # Negative control: the session that switched differs from its no-switch run after the switch.
    seed, prompts, _, blocks, switch = plan["c"]
    assert rel_err(got["c"][switch], _alone(model, cfg, prompts, seed, blocks)[switch]) > 100 * TOL


def _session_bytes(engine: Engine) -> int:
    tensors = [*engine.cache.tensors(), engine.history, *engine.prompts.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_memory_is_constant_and_output_deterministic(model):
    cfg = GenerationConfig(rope_mode="relative")  # relative: no 1024-frame cap, any length
    session = GenerationSession(model, cfg, SIZE, prompt(0), seed=9)
    first = [session.next_block() for _ in range(8)][0]
    bytes_8, peak_8 = _session_bytes(session.engine), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for b in range(72):
        if b == 40:
            session.set_prompt(prompt(1))
        last = session.next_block()
    bytes_80, peak_80 = _session_bytes(session.engine), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert bytes_80 == bytes_8
    assert peak_80 - peak_8 < 8 * 1024  # KiB: no growth beyond allocator noise over 72 more blocks
    # Same seed and prompts: the same frames, bit for bit.
    again = GenerationSession(model, cfg, SIZE, prompt(0), seed=9)
    for b in range(80):
        if b == 48:
            again.set_prompt(prompt(1))
        replay = again.next_block()
    assert torch.equal(replay, last)
    other_seed = GenerationSession(model, cfg, SIZE, prompt(0), seed=10).next_block()
    assert rel_err(other_seed, first) > 0.5


def test_absolute_rope_beyond_1024_frames_is_a_clear_error(model):
    cfg = GenerationConfig(block_frames=3, sink_frames=3, window_frames=12)
    session = GenerationSession(model, cfg, SIZE, prompt(0))
    layout = session.engine.scheduler.sessions["session"].layout
    with pytest.raises(ValueError, match="relative"):
        layout.plan_block(1023)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(6, 31), "prompt_embeds"),
        (torch.randn(129, 32), "tokens"),
        (torch.randn(0, 32), "tokens"),
    ],
)
def test_bad_prompt_embeddings_are_rejected(model, bad, match):
    engine = Engine(model, GenerationConfig(), SIZE)
    with pytest.raises(ValueError, match=match):
        engine.add_session("x", bad)


def test_bad_latent_size_is_rejected(model):
    with pytest.raises(ValueError, match="divisible"):
        Engine(model, GenerationConfig(), (5, 6))


def test_bfloat16_model_runs_and_stays_close_to_float32(model):
    """The GPU dtype path on the CPU: bf16 weights and cache, float32 norms and sampler."""
    cfg = GenerationConfig()
    reference = _alone(model, cfg, [prompt(0), prompt(1)], seed=5, blocks=5, switch_before=4)
    bf16 = tiny_model(seed=0).to(torch.bfloat16)
    got = _alone(bf16, cfg, [prompt(0), prompt(1)], seed=5, blocks=5, switch_before=4)
    assert all(torch.isfinite(b).all() for b in got)
    assert max(rel_err(a, b) for a, b in zip(got, reference, strict=True)) < 0.05


@pytest.mark.parametrize("rope_mode, tolerance", [("absolute", 1e-5), ("relative", 0.0)])  # measured 1.4e-7
def test_a_session_can_start_at_a_late_frame_index(model, rope_mode, tolerance):
    """RoPE only sees position differences, so a session whose frames start at index 950 (the state of
    a ~4 minute video) makes the same latents as one starting at 0: exactly in relative mode, up to the
    float rounding of large angles in absolute mode. Past the 1024-position table it is a clear error."""
    cfg = GenerationConfig(rope_mode=rope_mode)

    def run(first_frame: int) -> list[torch.Tensor]:
        engine = Engine(model, cfg, SIZE)
        engine.add_session("s", prompt(0), seed=2, first_frame=first_frame)
        out = []
        for b in range(6):
            if b == 5:
                engine.set_prompt("s", prompt(1))
            out.append(engine.step()["s"])
        return out

    late, early = run(950), run(0)
    assert max(rel_err(a, b) for a, b in zip(late, early, strict=True)) <= tolerance
    if rope_mode == "absolute":
        engine = Engine(model, cfg, SIZE)
        engine.add_session("s", prompt(0), first_frame=1020)
        engine.step()  # frames 1020..1022
        with pytest.raises(ValueError, match="beyond the 1024 positions"):
            engine.step()


@pytest.mark.parametrize("rope_mode", ["relative", "absolute"])
@pytest.mark.parametrize("restore_at", [3, 6])  # 9 frames: window filling; 18: the window slid
def test_a_restored_session_continues_exactly_like_one_that_recached_in_place(model, rope_mode, restore_at):
    """A session rebuilt elsewhere from its clean latents (checkpoint restore) makes the same blocks as
    the session that stayed and had its current prompt re-posted at that block (one recache): the same
    noise (a function of seed, block, step) and the same cache. Its prompt switched at block 2, so the
    sink was rewritten by that recache over 6 frames; the restore must rebuild it the same way."""
    cfg = GenerationConfig(rope_mode=rope_mode)
    seed, blocks, first, second = 5, restore_at + 3, prompt(0), prompt(1)

    def stayed(repost: bool) -> list[torch.Tensor]:
        session = GenerationSession(model, cfg, SIZE, first, seed=seed)
        out = []
        for b in range(blocks):
            if b == 2 or (repost and b == restore_at):
                session.set_prompt(second)
            out.append(session.next_block())
        return out

    reposted, original = stayed(repost=True), stayed(repost=False)
    frames = torch.cat(original[:restore_at], dim=1)  # [C, 3 * restore_at, H, W] clean latents

    def restored(sink_frames: int = 6, sink_prompt: torch.Tensor = second, recent: int = 12) -> list:
        engine = Engine(model, cfg, SIZE, max_sessions=2)
        engine.add_session("other", prompt(2), seed=9)  # a neighbour in the batch, joined earlier
        engine.step()
        committed = 3 * restore_at
        engine.restore_session(
            "moved",
            second,
            seed,
            restore_at,
            frames[:, committed - min(committed, recent) :],
            sink_prompt_embeds=sink_prompt,
            sink_latents=frames[:, :sink_frames],
        )
        return [engine.step()["moved"] for _ in range(blocks - restore_at)]

    got = restored()
    for b, block in enumerate(got):
        assert rel_err(block, reposted[restore_at + b]) < TOL, b
    # Negative controls: the restore is a recache, so it differs from the block the session made without
    # one; a sink rebuilt from the wrong frames or under the wrong prompt moves it beyond the tolerance.
    # (On this tiny model a same-prompt recache moves a block by ~6e-4, as much as another first prompt.)
    assert rel_err(got[0], original[restore_at]) > 20 * TOL
    if restore_at * 3 > cfg.window_frames:
        assert rel_err(restored(sink_frames=3)[0], reposted[restore_at]) > 20 * TOL
        assert rel_err(restored(sink_prompt=first)[0], reposted[restore_at]) > 20 * TOL
    with pytest.raises(ValueError, match="recent_latents"):
        restored(recent=6)


def _switched(model, cfg, seed: int, first, switches: dict, blocks: int) -> list[torch.Tensor]:
    session = GenerationSession(model, cfg, SIZE, first, seed=seed)
    out = []
    for b in range(blocks):
        if b in switches:
            session.set_prompt(switches[b])
        out.append(session.next_block())
    return out


@pytest.mark.parametrize("rope_mode", ["relative", "absolute"])
@pytest.mark.parametrize("rewind_at", [3, 6])  # 9 frames: the window still filling; 18: it slid
def test_a_rewound_session_remakes_the_blocks_of_one_that_got_the_prompt_there(model, rope_mode, rewind_at):
    """Instant steering: blocks made ahead under the old prompt are thrown away and made again under the
    new one. Rewound to `rewind_at` (two blocks past it were made) with the new prompt, the session makes
    exactly the blocks of a session that got that prompt at that block. While the window fills, the
    thrown blocks' slots must not be seen by the recache; later, their latents have overwritten the
    history the recache reads, so the kept ones go back."""
    cfg = GenerationConfig(rope_mode=rope_mode)
    seed, p0, p1, p2 = 5, prompt(0), prompt(1), prompt(2)
    expected = _switched(model, cfg, seed, p0, {2: p1, rewind_at: p2}, rewind_at + 2)

    def rewound(recent_from: str = "kept", recache: bool = True, new_prompt=p2) -> tuple[list, list]:
        engine = Engine(model, cfg, SIZE, max_sessions=2)
        engine.add_session("s", p0, seed=seed)
        engine.add_session("other", prompt(3), seed=9)  # a neighbour in the batch
        made, other = [], []
        for b in range(rewind_at + 2):
            if b == 2:
                engine.set_prompt("s", p1)
            out = engine.step()
            made.append(out["s"].clone())
            other.append(out["other"].clone())
        frames = min(3 * rewind_at, cfg.window_frames)
        kept = torch.cat(made[:rewind_at], dim=1)[:, -frames:]
        thrown = torch.cat(made, dim=1)[:, -frames:]  # the newest frames: the wrong ones
        engine.rewind_session("s", rewind_at, kept if recent_from == "kept" else thrown)
        if recache:
            engine.set_prompt("s", new_prompt)
        else:  # control: the new prompt's cross-attention only, the window's K/V as the thrown blocks left it
            slot = engine.scheduler.sessions["s"].slot
            engine.prompts["s"] = padded_prompt(model, new_prompt)
            engine.cache.set_context(slot, model.encode_context(engine.prompts["s"]))
        del made[rewind_at:]
        for _ in range(2):
            out = engine.step()
            made.append(out["s"].clone())
            other.append(out["other"].clone())
        return made, other

    got, other = rewound()
    for b in range(rewind_at + 2):
        assert rel_err(got[b], expected[b]) < TOL, b
    neighbour = _alone(model, cfg, [prompt(3)], 9, rewind_at + 4)
    assert all(rel_err(x, y) < TOL for x, y in zip(other, neighbour, strict=True))
    # Negative controls: no recache, a recache under the old prompt, the history left as the thrown blocks
    # wrote it: each moves the remade block far beyond the tolerance.
    for broken in (rewound(recache=False), rewound(new_prompt=p1), rewound(recent_from="thrown")):
        assert rel_err(broken[0][rewind_at], expected[rewind_at]) > 20 * TOL
    engine = Engine(model, cfg, SIZE)
    engine.add_session("s", p0)
    engine.step()
    with pytest.raises(ValueError, match="recent_latents"):
        engine.rewind_session("s", 1, torch.zeros(1))
    with pytest.raises(ValueError, match="blocks_done"):
        engine.rewind_session("s", 2, torch.cat(got[:1], dim=1))
