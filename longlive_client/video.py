"""The live fMP4 stream, decoded as it comes (PyAV) and written to a playable file.

The service sends an init segment (ftyp + moov) and then a fragment (moof + mdat) per block, each fragment
starting with a keyframe and carrying its decode time from the session's first frame (longlive_core/
fmp4.py). So every complete fragment decodes alone behind the init segment, its frames' times give their
indices, and a stream resumed with `from_frame` (a new init segment, the same bytes) continues the first:
only complete fragments are decoded and written, so what a dropped connection cut off is asked for again.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from longlive_core.schedule import FPS

from .errors import LongliveError

INIT_BOXES = (b"ftyp", b"moov")


@dataclass(frozen=True)
class Frame:
    index: int  # video frame index from the session's start
    image: np.ndarray  # uint8 RGB [H, W, 3]
    prompt: str | None  # the timeline's prompt in force at the frame's block (None if not asked for)


@dataclass(frozen=True)
class Fragment:
    data: bytes  # moof + mdat, as received
    frames: list[tuple[int, np.ndarray]]  # (index, uint8 RGB [H, W, 3])

    @property
    def end(self) -> int:
        """The frame after this fragment's last."""
        return self.frames[-1][0] + 1


class Fmp4Reader:
    """`feed(bytes)` -> the fragments completed by them, decoded; `restart()` before a resumed stream."""

    def __init__(self) -> None:
        self.init: bytes | None = None
        self._pending = bytearray()
        self._moof: bytes | None = None
        self._new_init = bytearray()  # a resumed stream's init segment, checked against the first

    def restart(self) -> None:
        self._pending.clear()
        self._moof = None
        self._new_init.clear()

    def feed(self, data: bytes) -> list[Fragment]:
        self._pending += data
        fragments = []
        while len(self._pending) >= 8:
            size, kind = struct.unpack_from(">I4s", self._pending)
            if size < 8:
                raise LongliveError(f"the video stream is not fMP4: box {kind!r} of size {size}")
            if len(self._pending) < size:
                break
            box = bytes(self._pending[:size])
            del self._pending[:size]
            if kind in INIT_BOXES:
                self._take_init(kind, box)
            elif kind == b"moof":
                self._moof = box
            elif kind == b"mdat" and self._moof is not None:
                fragments.append(self._decode(self._moof + box))
                self._moof = None
        return fragments

    def _take_init(self, kind: bytes, box: bytes) -> None:
        if self.init is None:
            self._new_init += box
            if kind == b"moov":
                self.init = bytes(self._new_init)
            return
        self._new_init += box
        if kind == b"moov" and bytes(self._new_init) != self.init:
            raise LongliveError("the resumed stream's codec settings differ from the first's")

    def _decode(self, fragment: bytes) -> Fragment:
        if self.init is None:
            raise LongliveError("the video stream sent a fragment before its init segment")
        with av.open(io.BytesIO(self.init + fragment), format="mp4") as container:
            frames = [
                (round(frame.time * FPS), frame.to_ndarray(format="rgb24"))
                for frame in container.decode(video=0)
            ]
        if not frames:
            raise LongliveError("a fragment of the video stream held no frame")
        return Fragment(fragment, frames)


class Mp4File:
    """An fMP4 file that grows a fragment at a time: playable (PyAV, browsers, ffmpeg) whenever it stops."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.frames = 0
        self._file = self.path.open("wb")
        self._started = False

    def write(self, reader: Fmp4Reader, fragment: Fragment) -> None:
        if not self._started:
            self._file.write(reader.init or b"")
            self._started = True
        self._file.write(fragment.data)
        self._file.flush()  # a fragment at a time: the file is playable as it grows
        self.frames += len(fragment.frames)

    def close(self) -> None:
        self._file.close()
