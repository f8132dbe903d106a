"""Live video as fragmented MP4 (one fragment per block, each starting with a keyframe) and JPEG frames.

FFmpeg's mp4 muxer closes a fragment only when the next keyframe arrives, which would hold every block
back until the next one is made. So each block is encoded by its own short-lived encoder and container:
closing it flushes the block's fragment at once. Every block's init segment (ftyp + moov) is identical
(same codec settings), so it is sent once; each later fragment gets its sequence number and decode time
(mfhd, tfdt) rewritten in place to continue the stream. The chunks, concatenated, are one valid fMP4
file that Media Source Extensions and PyAV play.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+skip_trailer"
CONTAINERS = {b"moof", b"traf"}  # boxes whose children we walk to reach mfhd and tfdt


def _boxes(
    data: bytes | bytearray, start: int = 0, end: int | None = None
) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, size) of the ISO-BMFF boxes in data[start:end]."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        if size < 8 or offset + size > end:
            raise ValueError(f"malformed MP4 box {kind!r} at byte {offset}")
        yield kind, offset, size
        offset += size


class FragmentedMp4Encoder:
    """`encode_block(frames)` -> bytes to send: the init segment + first fragment, then one fragment per
    block. Frames are uint8 RGB [n, H, W, 3] with H and W even."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: int = 16,
        crf: int = 23,
        preset: str = "veryfast",
        start_frame: int = 0,
        start_fragment: int = 0,
        send_init: bool = True,
    ):
        """start_frame, start_fragment: continue a stream another encoder began (same size and settings,
        hence the same init segment; send_init=False leaves it out): decode times count from start_frame
        and sequence numbers from start_fragment + 1."""
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        if start_frame < 0 or start_fragment < 0:
            raise ValueError(
                f"start_frame and start_fragment must be >= 0, got {start_frame}, {start_fragment}"
            )
        self.width, self.height, self.fps = width, height, fps
        self.options = {"crf": str(crf), "preset": preset, "tune": "zerolatency"}
        self.init_segment: bytes | None = None
        self.frames_encoded = start_frame
        self.fragments = start_fragment
        self._init_pending = send_init

    @property
    def mime_type(self) -> str | None:
        """`video/mp4; codecs="avc1.PPCCLL"` from the stream's avcC box (for MSE); None before a block."""
        if self.init_segment is None:
            return None
        at = self.init_segment.find(b"avcC") + 4  # configurationVersion, profile, compatibility, level
        profile, compatibility, level = self.init_segment[at + 1 : at + 4]
        return f'video/mp4; codecs="avc1.{profile:02x}{compatibility:02x}{level:02x}"'

    def encode_block(self, frames: np.ndarray) -> bytes:
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [n, {self.height}, {self.width}, 3], got {frames.shape}")
        if len(frames) == 0:
            raise ValueError("frames must hold at least one frame")
        # 1. Encode the block alone: its first frame is an IDR frame, and closing flushes the fragment.
        buffer = io.BytesIO()
        container = av.open(buffer, "w", format="mp4", options={"movflags": MOVFLAGS})
        stream = container.add_stream("libx264", rate=self.fps, options=self.options)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        stream.time_base = Fraction(1, self.fps)
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts, video_frame.time_base = i, Fraction(1, self.fps)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
        container.close()
        data = bytearray(buffer.getvalue())

        # 2. Split off the init segment; keep it from the first block only.
        media_start = next(offset for kind, offset, _ in _boxes(data) if kind == b"moof")
        init, media = bytes(data[:media_start]), data[media_start:]
        timescale = self._timescale(init)
        if self.init_segment is None:
            self.init_segment = init
        elif init != self.init_segment:
            raise RuntimeError("encoder settings changed between blocks: init segments differ")

        # 3. Continue the stream: sequence number and base decode time of each fragment.
        base_time = self.frames_encoded * timescale // self.fps
        for kind, offset, size in _boxes(media):
            if kind == b"moof":
                self.fragments += 1
                self._patch_moof(media, offset, size, self.fragments, base_time)
        self.frames_encoded += len(frames)
        head, self._init_pending = (init if self._init_pending else b""), False
        return head + bytes(media)

    @staticmethod
    def _timescale(init: bytes) -> int:
        at = init.find(b"mdhd")  # media header: version(1) flags(3) then times, timescale
        version = init[at + 4]
        return struct.unpack_from(">I", init, at + (24 if version == 1 else 16))[0]

    @staticmethod
    def _patch_moof(data: bytearray, start: int, size: int, sequence: int, base_time: int) -> None:
        def walk(begin: int, end: int) -> None:
            for kind, offset, box_size in _boxes(data, begin, end):
                if kind == b"mfhd":
                    struct.pack_into(">I", data, offset + 12, sequence)
                elif kind == b"tfdt":
                    version = data[offset + 8]
                    struct.pack_into(">Q" if version == 1 else ">I", data, offset + 12, base_time)
                elif kind in CONTAINERS:
                    walk(offset + 8, offset + box_size)

        walk(start, start + size)


class JpegEncoder:
    """uint8 RGB frames -> one JPEG per frame (the WebSocket fallback for clients without MSE)."""

    def __init__(self, width: int, height: int, quality: int = 5):
        self.context = av.CodecContext.create("mjpeg", "w")
        self.context.width, self.context.height = width, height
        self.context.pix_fmt = "yuvj420p"
        self.context.time_base = Fraction(1, 16)
        self.context.options = {"q:v": str(quality)}
        self.context.qmin = self.context.qmax = quality

    def encode(self, frame: np.ndarray) -> bytes:
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        return b"".join(bytes(p) for p in self.context.encode(video_frame.reformat(format="yuvj420p")))
