"""Write H.264 MP4 while frames are generated (PyAV), finalised atomically."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import av
import numpy as np


class Mp4Writer:
    """Encode uint8 RGB frames [n, H, W, 3] to H.264 as they arrive.

    Frames go to `<path>.partial.mp4`; `close()` finishes the stream and renames it to `path`, so a
    file at `path` is always complete. After an error or interrupt, `abort()` still finishes the
    partial file, which stays playable with what was written.
    """

    def __init__(self, path: Path, width: int, height: int, fps: int = 16, crf: int = 18):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.stem + ".partial.mp4")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.partial), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        if frames.ndim != 4 or frames.shape[1:] != (self.stream.height, self.stream.width, 3):
            raise ValueError(
                f"frames must be [n, {self.stream.height}, {self.stream.width}, 3] uint8, got {frames.shape}"
            )
        for frame in frames:
            packet_source = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            self.container.mux(self.stream.encode(packet_source))
            self.frames_written += 1

    def _finish(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()

    def close(self) -> Path:
        self._finish()
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> Path:
        """Finish the partial file (playable, shorter) and leave it under its .partial.mp4 name."""
        self._finish()
        return self.partial

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
