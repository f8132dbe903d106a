"""Prompt schedules and the video-length rules of docs/DESIGN.md section 5.

Video frames = 1 + 4 * (latent frames - 1); latent frames come in whole blocks (the first block of 3
gives 9 video frames, every later one 12). S seconds -> the fewest blocks with >= 16 * S frames.
A switch at `at` seconds acts at the first block boundary at or after it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

FPS = 16
TEMPORAL_STRIDE = 4  # video frames per latent frame (after the first)
MAX_PROMPT_CHARS = 2000  # well above what the text encoder reads (512 tokens)
# C0 and C1 control characters except tab and newline, DEL, and lone surrogates (not encodable as UTF-8).
_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def check_prompt(prompt: str) -> str:
    """The one prompt-text rule (CLI, schedules, the session and jobs APIs): text that encodes as UTF-8
    (no lone surrogates), no NUL or other control character but newline and tab, and something visible
    (not only whitespace or zero-width characters). Returns the prompt; the message never quotes it."""
    bad = _FORBIDDEN.search(prompt)
    if bad is not None:
        char = ord(bad.group())
        what = "a lone surrogate (not UTF-8 text)" if 0xD800 <= char <= 0xDFFF else "a control character"
        raise ValueError(f"prompt has {what}, U+{char:04X}, at character {bad.start()}")
    if all(c.isspace() or unicodedata.category(c) == "Cf" for c in prompt):
        raise ValueError("prompt must not be empty or only whitespace")
    return prompt


PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(check_prompt)]


class PromptChange(BaseModel):
    """One schedule entry: from `at` seconds on, generate under `prompt`."""

    model_config = ConfigDict(extra="forbid")

    at: float = Field(ge=0, allow_inf_nan=False, description="seconds from the start of the video")
    prompt: PromptText


class ScheduleError(ValueError):
    """A bad schedule; the message names the file line or entry."""


def video_frames(latent_frames: int) -> int:
    return 1 + TEMPORAL_STRIDE * (latent_frames - 1) if latent_frames > 0 else 0


def block_start_video_frame(block: int, block_frames: int) -> int:
    """Index of the first video frame that block `block` produces."""
    return 0 if block == 0 else video_frames(block * block_frames)


def block_of_frame(frame: int, block_frames: int) -> int:
    """The block that produces video frame `frame` (inverse of block_start_video_frame)."""
    first = video_frames(block_frames)
    return 0 if frame < first else 1 + (frame - first) // (TEMPORAL_STRIDE * block_frames)


def blocks_for_seconds(seconds: float, block_frames: int, fps: int = FPS) -> int:
    """The fewest blocks whose video has at least fps * seconds frames (at least one block)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    needed = math.ceil(fps * seconds - 1e-9)
    blocks = 1
    while video_frames((blocks) * block_frames) < needed:
        blocks += 1
    return blocks


def frames_total(seconds: float, block_frames: int = 3) -> int:
    """Video frames of a `seconds`-long video (what a job makes and its status counts up to)."""
    return video_frames(blocks_for_seconds(seconds, block_frames) * block_frames)


def switch_block(at: float, block_frames: int, fps: int = FPS) -> int:
    """The first block whose first video frame is at or after `at` seconds."""
    block = 0
    while block_start_video_frame(block, block_frames) < at * fps - 1e-9:
        block += 1
    return block


def validate_schedule(entries: list[PromptChange], seconds: float, where: list[str] | None = None) -> None:
    """Sorted, within the duration, starting at 0. `where[i]` names entry i in messages."""
    where = where or [f"entry {i + 1}" for i in range(len(entries))]
    if not entries:
        raise ScheduleError("the schedule is empty")
    if entries[0].at != 0:
        raise ScheduleError(f"{where[0]}: the first entry must be at 0 seconds, got {entries[0].at}")
    for i in range(1, len(entries)):
        if entries[i].at <= entries[i - 1].at:
            raise ScheduleError(
                f"{where[i]}: entries must be sorted by time: {entries[i].at} s comes after "
                f"{entries[i - 1].at} s"
            )
    for i, entry in enumerate(entries):
        if entry.at >= seconds:
            raise ScheduleError(
                f"{where[i]}: at {entry.at} s is not within the {seconds} s video (raise --seconds)"
            )


def load_schedule(path: Path) -> tuple[list[PromptChange], list[str]]:
    """Read a YAML or JSON list of {at, prompt}; returns the entries and a 'file line N' label each.

    JSON is read through the YAML parser too, so both report line numbers.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScheduleError(f"cannot read schedule {path}: {exc.strerror}") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ScheduleError(f"{path}: not valid YAML or JSON: {exc}") from None
    if root is None or not isinstance(root, yaml.SequenceNode):
        raise ScheduleError(f"{path}: a schedule is a list of {{at: seconds, prompt: text}} entries")
    entries, where = [], []
    for i, node in enumerate(root.value):
        label = f"{path} line {node.start_mark.line + 1} (entry {i + 1})"
        value = yaml.safe_load(yaml.serialize(node))
        if not isinstance(value, dict):
            raise ScheduleError(f"{label}: expected {{at: seconds, prompt: text}}, got {value!r}")
        try:
            entries.append(PromptChange.model_validate(value))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors()
            )
            raise ScheduleError(f"{label}: {problems}") from None
        where.append(label)
    return entries, where
