"""What the sync and the async client share: the request bodies, the timeline's prompt of a frame, and the
bookkeeping of a live stream across reconnects."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from longlive_core.schedule import PromptChange, block_of_frame, load_schedule, validate_schedule

from .errors import JobTokenLost, LongliveError, SessionNotFound
from .http import Retries
from .schemas import JobCreated, SessionStatus, SubmitJob
from .video import Fmp4Reader, Fragment, Frame, Mp4File

BLOCK_FRAMES = 3  # latent frames per block (docs/DESIGN.md section 5): 9 video frames, then 12 a block
ENDED = ("ended", "error")
Schedule = Sequence[PromptChange | dict] | str | Path


def job_body(schedule: Schedule, seconds: float, seed: int, callback_url: str | None) -> dict:
    """The submission's JSON, validated here first: a schedule file's errors name its line."""
    if isinstance(schedule, str | Path):
        entries, where = load_schedule(Path(schedule))
        validate_schedule(entries, seconds, where)
    else:
        entries = [PromptChange.model_validate(entry) for entry in schedule]
    body = SubmitJob(schedule=entries, seconds=seconds, seed=seed, callback_url=callback_url)
    return body.model_dump(mode="json", exclude_none=True)


def job_token(created: JobCreated) -> str:
    if created.token is None:  # a duplicate: the first submission's reply carried the token
        raise JobTokenLost(created.job_id)
    return created.token


def prompt_at(status: SessionStatus, block: int) -> str | None:
    """The timeline's entry in force at `block`: the last applied at or before it (block -1: superseded,
    None: not applied yet). Remade blocks (status.replacements) were never streamed, so this holds for
    every frame a viewer gets."""
    applied = [entry for entry in status.prompts if entry.block is not None and 0 <= entry.block <= block]
    return max(applied, key=lambda entry: entry.block).prompt if applied else None


class StreamState:
    """One `frames()` iteration: the decoder, where to resume, the recording and the timeline seen."""

    def __init__(self, from_frame: int, prompts: bool, record: Path | None, retries: Retries):
        self.reader = Fmp4Reader()
        self.next_frame = from_frame
        self.prompts = prompts
        self.file = Mp4File(record) if record is not None else None
        self.retries = retries
        self.drops = 0
        self.status: SessionStatus | None = None

    def needs_status(self, fragment: Fragment) -> bool:
        """A status made before the fragment's last block began may not name its prompt yet."""
        last_block = block_of_frame(fragment.end - 1, BLOCK_FRAMES)
        return self.prompts and (self.status is None or self.status.blocks_done <= last_block)

    def frames(self, fragment: Fragment) -> list[Frame]:
        if self.file is not None:
            self.file.write(self.reader, fragment)
        self.next_frame, self.drops = fragment.end, 0
        return [
            Frame(
                index,
                image,
                prompt_at(self.status, block_of_frame(index, BLOCK_FRAMES)) if self.prompts else None,
            )
            for index, image in fragment.frames
        ]

    def dropped(self, why: str) -> float:
        """A lost connection: the wait before resuming at next_frame; raises past the retries."""
        self.drops += 1
        if self.drops >= self.retries.attempts:
            raise LongliveError(
                f"the video stream dropped {self.drops} times in a row at frame {self.next_frame}: {why}"
            )
        self.reader.restart()
        return self.retries.wait(self.drops)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def stream_over(status_or_error: SessionStatus | SessionNotFound) -> bool:
    """After a stream ended without error: whether the session has (else the stream is resumed)."""
    return isinstance(status_or_error, SessionNotFound) or status_or_error.state in ENDED
