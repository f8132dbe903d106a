"""Length and switch rounding rules (docs/DESIGN.md section 5) and schedule files with line-numbered
errors."""

from __future__ import annotations

import pytest

from longlive_core.schedule import (
    PromptChange,
    ScheduleError,
    block_start_video_frame,
    blocks_for_seconds,
    frames_total,
    load_schedule,
    switch_block,
    validate_schedule,
    video_frames,
)


def test_length_rule_gives_the_fewest_blocks_with_enough_frames():
    assert video_frames(3) == 9 and video_frames(6) == 21
    assert blocks_for_seconds(0.5, 3) == 1  # 8 frames wanted, the first block gives 9
    assert blocks_for_seconds(1, 3) == 2  # 16 wanted: 9 is short, 21 is enough
    assert blocks_for_seconds(5, 3) == 7  # 80 wanted: 81
    assert blocks_for_seconds(240, 3) == 321  # 3840 wanted: 3849 frames, 963 latent frames
    for seconds in (0.1, 1, 2.5, 7, 60, 240, 300):
        n = blocks_for_seconds(seconds, 3)
        assert video_frames(3 * n) >= 16 * seconds > video_frames(3 * (n - 1))
        assert frames_total(seconds) == video_frames(3 * n)  # what a job of that length makes


def test_switch_acts_at_the_first_block_boundary_at_or_after_it():
    assert switch_block(0, 3) == 0
    # DESIGN: a switch asked for at latent frame 40 (video frame 157) acts at latent frame 42.
    assert 3 * switch_block(157 / 16, 3) == 42
    boundary = block_start_video_frame(5, 3) / 16
    assert switch_block(boundary, 3) == 5 and switch_block(boundary + 1e-3, 3) == 6


def test_validation_messages_name_the_entry():
    entries = [PromptChange(at=0, prompt="a"), PromptChange(at=5, prompt="b"), PromptChange(at=3, prompt="c")]
    with pytest.raises(ScheduleError, match="entry 3: entries must be sorted"):
        validate_schedule(entries, 10)
    with pytest.raises(ScheduleError, match="entry 2: at 5.0 s is not within the 4 s video"):
        validate_schedule(entries[:2], 4)
    with pytest.raises(ScheduleError, match="first entry must be at 0"):
        validate_schedule(entries[1:2], 10)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "- {at: 0, prompt: a}\n- {at: -1, prompt: b}\n",
            "line 2 \\(entry 2\\): at: Input should be greater",
        ),
        ("- at: 0\n  prompt: a\n- at: 2\n  prompt: '  '\n", "line 3 \\(entry 2\\): prompt: Value error"),
        ('[{"at": 0, "prompt": "a"},\n {"at": "soon", "prompt": "b"}]', "line 2 \\(entry 2\\): at:"),
        ("- {at: 0, prompt: a, speed: 2}\n", "line 1 \\(entry 1\\): speed: Extra inputs"),
        ("at: 0\n", "a schedule is a list"),
        ("- [1, 2]\n", "line 1 \\(entry 1\\): expected"),
        ("- {at: 0, prompt: [unclosed\n", "not valid YAML or JSON"),
    ],
)
def test_bad_schedule_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "story.yaml"
    path.write_text(text)
    with pytest.raises(ScheduleError, match=message):
        load_schedule(path)


def test_good_yaml_and_json_schedules_load(tmp_path):
    (tmp_path / "s.yaml").write_text("- at: 0\n  prompt: a robot\n- at: 2.5\n  prompt: in a forest\n")
    (tmp_path / "s.json").write_text('[{"at": 0, "prompt": "a robot"}, {"at": 2.5, "prompt": "in a forest"}]')
    for name in ("s.yaml", "s.json"):
        entries, where = load_schedule(tmp_path / name)
        assert [(e.at, e.prompt) for e in entries] == [(0, "a robot"), (2.5, "in a forest")]
        assert where[1].endswith("(entry 2)")
