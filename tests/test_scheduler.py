"""The torch-free scheduler and cache planner, tested without running a model."""

from __future__ import annotations

import json
import pickle
import sys

import pytest

from longlive_core.cache_plan import EMPTY, CacheLayout
from longlive_core.config import GenerationConfig
from longlive_core.scheduler import Scheduler


def test_scheduler_and_planner_do_not_import_torch():
    # A fresh interpreter proves it: importing the scheduler must not pull torch in.
    import subprocess

    code = "import sys, longlive_core.scheduler as s; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _frames(plan, slots):
    return sorted(plan.slot_frames[s] for s in slots)


def _sees_every_slot(plan) -> bool:
    return all(v == tuple(range(len(plan.slot_frames))) for v in plan.visible_slots)


def test_block_plans_follow_the_design_table():
    layout = CacheLayout(GenerationConfig(), max_positions=1024)
    first = layout.plan_block(0)
    assert first.query_frames == (0, 1, 2) and first.write_slots == (0, 1, 2)
    assert all(_frames(first, v) == [0, 1, 2] for v in first.visible_slots)  # the first block sees itself
    for n in range(3, 18, 3):
        layout.plan_block(n)
    plan = layout.plan_block(18)  # frames 18..20: sink 0-2 + last 6 committed (12..17) + itself
    assert all(_frames(plan, v) == [0, 1, 2, *range(12, 21)] for v in plan.visible_slots)
    assert _sees_every_slot(plan) and plan.query_positions == (18, 19, 20)


def test_relative_positions_put_the_window_right_after_the_sink():
    layout = CacheLayout(GenerationConfig(rope_mode="relative"), max_positions=1024)
    for n in range(0, 18, 3):
        layout.plan_block(n)
    plan = layout.plan_block(18)
    by_frame = {f: plan.slot_positions[s] for s, f in enumerate(plan.slot_frames)}
    assert by_frame == {0: 0, 1: 1, 2: 2, **{f: f - 9 for f in range(12, 21)}}
    assert plan.query_positions == (9, 10, 11)


@pytest.mark.parametrize(
    "changes, committed, recached, sink",
    [
        ({}, 18, list(range(9, 18)), [0, 1, 2]),  # n > 12: only n-9..n-1, sink kept
        ({}, 6, list(range(6)), [0, 1, 2]),  # n <= 12: everything, the sink too
        ({}, 12, list(range(12)), [0, 1, 2]),
        ({"global_sink": False}, 18, list(range(6, 18)), [6, 7, 8]),  # first recached = new sink
        ({"global_sink": False}, 6, list(range(6)), [0, 1, 2]),
    ],
)
def test_recache_plans_follow_the_design_table(changes, committed, recached, sink):
    cfg = GenerationConfig(**changes)
    layout = CacheLayout(cfg, max_positions=1024)
    for n in range(0, committed, 3):
        layout.plan_block(n)
    plan = layout.plan_recache(committed)
    assert list(plan.query_frames) == recached
    assert _sees_every_slot(plan) or committed <= 12  # unmasked: every query sees every held frame
    held = [f for f in plan.slot_frames if f != EMPTY]
    assert sorted(held) == sorted(set(sink) | set(recached))
    assert [plan.slot_frames[s] for s in range(3)] == sink


def test_block_causal_recache_masks_future_blocks():
    layout = CacheLayout(GenerationConfig(recache="block_causal"), max_positions=1024)
    for n in range(0, 18, 3):
        layout.plan_block(n)
    plan = layout.plan_recache(18)
    first, last = plan.visible_slots[0], plan.visible_slots[-1]  # frames 9 and 17
    assert _frames(plan, first) == [0, 1, 2, 9, 10, 11]
    assert _frames(plan, last) == [0, 1, 2, *range(9, 18)]


def test_no_recache_before_the_first_block_or_when_off():
    assert CacheLayout(GenerationConfig(), 1024).plan_recache(0) is None
    layout = CacheLayout(GenerationConfig(recache="off"), 1024)
    layout.plan_block(0)
    assert layout.plan_recache(3) is None


@pytest.mark.parametrize(
    "sink, window, block", [(3, 12, 3), (2, 10, 3), (1, 4, 3), (6, 12, 3), (3, 9, 2), (1, 7, 1)]
)
def test_window_holds_exactly_sink_plus_recent_for_any_geometry(sink, window, block):
    """For many blocks: a block sees the sink + the last (window - sink - block) committed + itself."""
    cfg = GenerationConfig(sink_frames=sink, window_frames=window, block_frames=block)
    layout = CacheLayout(cfg, max_positions=10_000)
    for n in range(0, 60 * block, block):
        plan = layout.plan_block(n)
        recent = range(max(0, n - (window - sink - block)), n)
        expected = sorted(set(range(min(sink, n))) | set(recent) | set(range(n, n + block)))
        assert _frames(plan, plan.visible_slots[0]) == expected, n
        assert len(set(plan.write_slots)) == block


def test_scheduler_joins_waits_compacts_and_reports_departures():
    s = Scheduler(GenerationConfig(), max_sessions=2, max_positions=1024)
    s.add_session("a", seed=0)
    s.add_session("b", seed=1, num_blocks=1)
    s.add_session("c", seed=2)
    out = s.schedule()
    assert [n.session_id for n in out.new_sessions] == ["a", "b"]
    assert [(w.session_id, w.slot, w.block_index) for w in out.blocks] == [("a", 0, 0), ("b", 1, 0)]
    assert s.update(out) == ["b"]
    out = s.schedule()  # b leaves, c joins its slot
    assert out.finished_ids == ["b"] and not out.moves
    assert [(n.session_id, n.slot) for n in out.new_sessions] == [("c", 1)]
    assert [(w.session_id, w.block_index, w.plan.query_frames) for w in out.blocks] == [
        ("a", 1, (3, 4, 5)),
        ("c", 0, (0, 1, 2)),
    ]
    s.update(out)
    s.remove_session("a")  # a leaves from slot 0: c moves down so the batch stays slots 0..k-1
    out = s.schedule()
    assert out.finished_ids == ["a"]
    assert [(m.session_id, m.src, m.dst) for m in out.moves] == [("c", 1, 0)]
    assert [(w.session_id, w.slot) for w in out.blocks] == [("c", 0)]


def test_prompt_switch_is_applied_once_at_the_next_block():
    s = Scheduler(GenerationConfig(), max_sessions=1, max_positions=1024)
    s.add_session("a", seed=0)
    s.set_prompt("a")  # before the first block: no recache, the new prompt is simply the prompt
    out = s.schedule()
    assert not out.recaches
    s.update(out)
    s.set_prompt("a")
    s.set_prompt("a")  # two switches between blocks: one recache, with the latest prompt
    out = s.schedule()
    assert [(r.session_id, r.plan.query_frames) for r in out.recaches] == [("a", (0, 1, 2))]
    s.update(out)
    assert not s.schedule().recaches


def test_scheduler_rejects_bad_requests():
    s = Scheduler(GenerationConfig(), max_sessions=1, max_positions=1024)
    s.add_session("a", seed=0)
    with pytest.raises(ValueError, match="session_id"):
        s.add_session("a", seed=0)
    with pytest.raises(ValueError, match="num_blocks"):
        s.add_session("b", seed=0, num_blocks=0)
    with pytest.raises(KeyError, match="nope"):
        s.set_prompt("nope")
    with pytest.raises(ValueError, match="max_sessions"):
        Scheduler(GenerationConfig(), max_sessions=0, max_positions=1024)


def _busy_scheduler(config: GenerationConfig) -> Scheduler:
    """Sessions in every state: running (one restored, one with a pending prompt switch), waiting, leaving."""
    s = Scheduler(config, max_sessions=2, max_positions=1024)
    s.add_session("a", seed=0)
    s.add_session("b", seed=1, num_blocks=9, first_frame=30)
    for _ in range(5):
        s.update(s.schedule())
    s.add_session("c", seed=2)
    s.add_session("d", seed=3, num_blocks=20, restore_blocks=6, sink_frames=3)
    s.set_prompt("b")
    s.remove_session("a")
    return s


@pytest.mark.parametrize("changes", [{}, {"global_sink": False}])
def test_scheduler_state_is_json_and_continues_every_session_as_before(changes):
    config = GenerationConfig(**changes)
    original = _busy_scheduler(config)
    state = json.loads(json.dumps(original.state_dict()))  # plain data: nothing a pickle would carry
    assert state["version"] == 1
    restored = Scheduler.from_state_dict(config, 2, 1024, state)
    for _ in range(12):
        a, b = original.schedule(), restored.schedule()
        assert a == b
        assert original.update(a) == restored.update(b)
    assert restored.state_dict() == original.state_dict()


def test_scheduler_state_of_an_unknown_version_or_a_pickle_is_refused():
    config = GenerationConfig()
    state = _busy_scheduler(config).state_dict()
    with pytest.raises(ValueError, match="version 2 is unknown"):
        Scheduler.from_state_dict(config, 2, 1024, {**state, "version": 2})
    with pytest.raises(ValueError, match="must be a versioned dict, got bytes"):
        Scheduler.from_state_dict(config, 2, 1024, pickle.dumps(state))
    with pytest.raises(ValueError, match="malformed"):
        Scheduler.from_state_dict(config, 2, 1024, {"version": 1, "sessions": [{"seed": 0}]})
    with pytest.raises(ValueError, match="more than max_sessions"):
        Scheduler.from_state_dict(config, 1, 1024, state)
