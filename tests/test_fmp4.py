"""Fragmented MP4 for live streams: each block is its own fragment, sent as soon as it is encoded."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from longlive_core.fmp4 import FragmentedMp4Encoder, JpegEncoder, _boxes

W, H = 64, 48


def blocks(sizes: list[int]) -> list[np.ndarray]:
    """Flat frames whose grey level encodes the frame index, so decoded order can be checked."""
    out, index = [], 0
    for n in sizes:
        out.append(np.stack([np.full((H, W, 3), (index + i) * 7 % 250, np.uint8) for i in range(n)]))
        index += n
    return out


def decode(data: bytes) -> list[tuple[int, int, bool]]:
    with av.open(io.BytesIO(data)) as container:
        return [
            (int(f.pts * f.time_base * 16), int(f.to_ndarray(format="rgb24")[0, 0, 0]), f.key_frame)
            for f in container.decode(video=0)
        ]


def test_every_prefix_of_chunks_is_a_playable_stream():
    encoder = FragmentedMp4Encoder(W, H)
    chunks = []
    for k, block in enumerate(blocks([9, 12, 12])):
        chunks.append(encoder.encode_block(block))
        frames = decode(b"".join(chunks))  # the block is out without waiting for the next one
        n = 9 + 12 * k
        assert [pts for pts, _, _ in frames] == list(range(n))
        assert [abs(grey - i * 7 % 250) <= 2 for i, (_, grey, _) in enumerate(frames)] == [True] * n
        assert [i for i, (_, _, key) in enumerate(frames) if key] == [0, 9, 21][: k + 1]
    kinds = [[kind for kind, _, _ in _boxes(chunk)] for chunk in chunks]
    assert kinds == [[b"ftyp", b"moov", b"moof", b"mdat"], [b"moof", b"mdat"], [b"moof", b"mdat"]]
    assert encoder.mime_type.startswith('video/mp4; codecs="avc1.')


def test_control_plain_concatenation_of_block_files_is_not_a_stream():
    """Without the rewritten decode times the blocks overlap in time: the control the test above needs."""
    parts = []
    for k, block in enumerate(blocks([9, 12])):
        data = FragmentedMp4Encoder(W, H).encode_block(block)
        if k:
            data = data[next(o for kind, o, _ in _boxes(data) if kind == b"moof") :]
        parts.append(data)
    assert [pts for pts, _, _ in decode(b"".join(parts))] != list(range(21))


def test_a_second_encoder_continues_the_stream_where_the_first_stopped():
    """Failover: another replica's encoder continues at the next block without a new init segment; the
    joined bytes are one stream whose decode times run on without a gap."""
    data = blocks([9, 12, 12, 12])
    first = FragmentedMp4Encoder(W, H)
    head = first.encode_block(data[0]) + first.encode_block(data[1])
    second = FragmentedMp4Encoder(W, H, start_frame=21, start_fragment=2, send_init=False)
    tail = second.encode_block(data[2]) + second.encode_block(data[3])
    assert [kind for kind, _, _ in _boxes(tail)] == [b"moof", b"mdat"] * 2
    frames = decode(head + tail)
    assert [pts for pts, _, _ in frames] == list(range(45))
    assert [abs(grey - i * 7 % 250) <= 2 for i, (_, grey, _) in enumerate(frames)] == [True] * 45
    restarted = FragmentedMp4Encoder(W, H, send_init=False)  # control: a fresh clock overlaps the head
    assert [pts for pts, _, _ in decode(head + restarted.encode_block(data[2]))] != list(range(33))


def test_bad_frames_raise():
    with pytest.raises(ValueError, match="even"):
        FragmentedMp4Encoder(63, 48)
    encoder = FragmentedMp4Encoder(W, H)
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode_block(np.zeros((3, H, W), np.uint8))
    with pytest.raises(ValueError, match="at least one"):
        encoder.encode_block(np.zeros((0, H, W, 3), np.uint8))


def test_jpeg_frames_decode_back():
    frame = blocks([1])[0][0].copy()
    frame[:, : W // 2] = 200
    data = JpegEncoder(W, H).encode(frame)
    assert data[:2] == b"\xff\xd8"
    with av.open(io.BytesIO(data), format="mjpeg") as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(decoded.astype(int) - frame).mean() < 4
