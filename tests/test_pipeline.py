"""LongLivePipeline: whole-video and streaming APIs, and loading from every official layout."""

from __future__ import annotations

import numpy as np
import pytest

from longlive_core.config import RuntimeConfig
from longlive_core.pipeline import LongLivePipeline
from longlive_core.schedule import PromptChange, block_start_video_frame
from tests.checkpoints import write_diffusers_layout, write_longlive_checkpoint, write_original_layout

SIZE = (48, 32)


@pytest.fixture(scope="module")
def pipe() -> LongLivePipeline:
    return LongLivePipeline.from_pretrained("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def video(pipe) -> np.ndarray:
    return pipe("a red robot in a rainy city", seconds=2, seed=4, size=SIZE)


def test_call_returns_uint8_frames_of_the_rounded_length(video):
    assert video.dtype == np.uint8 and video.shape == (33, 32, 48, 3)  # 2 s: 3 blocks = 33 frames
    assert video.std() > 5


def test_stream_with_a_live_switch_equals_the_schedule(pipe):
    schedule = [
        PromptChange(at=0, prompt="a red robot in a rainy city"),
        PromptChange(at=block_start_video_frame(2, 3) / 16, prompt="the robot walks into a forest"),
    ]
    scheduled = pipe(schedule=schedule, seconds=3, seed=4, size=SIZE)
    stream = pipe.stream("a red robot in a rainy city", seconds=3, seed=4, size=SIZE)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if stream.blocks_done == 2:
            stream.set_prompt("the robot walks into a forest")
    live = np.concatenate(chunks)
    assert [len(c) for c in chunks] == [9, 12, 12, 12, 12]
    assert np.array_equal(live, scheduled)
    unswitched = pipe("a red robot in a rainy city", seconds=3, seed=4, size=SIZE)
    assert np.array_equal(unswitched[:21], live[:21])  # identical before the switch
    assert (
        np.abs(unswitched[21:].astype(float) - live[21:]).mean() > 0.1
    )  # the switch matters (live == scheduled exactly)


def test_open_ended_stream_uses_relative_rope(pipe):
    stream = pipe.stream("waves on a beach", seconds=None, size=SIZE)
    assert stream.plan.num_blocks is None
    assert stream.runtime.config.rope_mode == "relative"
    assert len(next(stream)) == 9 and len(next(stream)) == 12


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_checkpoint_layouts_load_to_the_same_video(pipe, video, tmp_path, layout):
    write = write_original_layout if layout == "original" else write_diffusers_layout
    root = write(pipe, tmp_path / layout)
    loaded = LongLivePipeline.from_pretrained(str(root), device="cpu")
    assert np.array_equal(loaded("a red robot in a rainy city", seconds=2, seed=4, size=SIZE), video)


def test_longlive_checkpoint_replaces_the_base_dit(pipe, video, tmp_path):
    from longlive_core.models.transformer_causal_wan import init_random_weights

    root = write_original_layout(pipe, tmp_path / "wan")
    tuned = init_random_weights(type(pipe.transformer)(pipe.transformer.config), seed=9)
    write_longlive_checkpoint(tuned, root)
    loaded = LongLivePipeline.from_pretrained(str(root), device="cpu")
    other = loaded("a red robot in a rainy city", seconds=2, seed=4, size=SIZE)
    assert np.abs(other.astype(float) - video).mean() > 1


def test_tiny_decoder_option_streams_the_same_length(pipe):
    tae = LongLivePipeline.from_pretrained("tiny-random", device="cpu", decoder="tae")
    out = tae("a red robot in a rainy city", seconds=2, seed=4, size=SIZE)
    assert out.shape == (33, 32, 48, 3) and out.std() > 1


@pytest.mark.parametrize("decoder", ["wan", "tae"])
def test_low_memory_mode_makes_the_same_video(video, decoder):
    """Frame-by-frame decoding and a host-offloaded text encoder change memory, not the frames."""
    low = LongLivePipeline.from_pretrained(
        "tiny-random", device="cpu", decoder=decoder, runtime=RuntimeConfig(low_memory=True)
    )
    low.text_encoder.offload("cpu")  # CPU runs skip the offload: force it to run the whole path
    out = low("a red robot in a rainy city", seconds=2, seed=4, size=SIZE)
    if decoder == "wan":
        assert np.abs(out.astype(int) - video).max() <= 1  # float rounding at uint8 boundaries only
    normal = LongLivePipeline.from_pretrained("tiny-random", device="cpu", decoder=decoder)
    expected = normal("a red robot in a rainy city", seconds=2, seed=4, size=SIZE)
    assert np.abs(out.astype(int) - expected).max() <= 1
    other = low("a red robot in a rainy city", seconds=2, seed=5, size=SIZE)
    assert np.abs(other.astype(int) - out).max() > 50  # control: a tolerance of 1 level is tight


def test_bad_requests(pipe):
    with pytest.raises(ValueError, match="either prompt or schedule"):
        pipe.stream()
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe("a cat", size=(40, 32))
    with pytest.raises(ValueError, match="decoder"):
        LongLivePipeline.from_pretrained("tiny-random", decoder="vqgan")
