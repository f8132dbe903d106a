"""Cached incremental generation and KV-recache equal the uncached masked reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

from longlive_core.config import GenerationConfig
from longlive_core.session import GenerationSession
from tests.helpers import prompt, rel_err, tiny_model
from tests.reference import ReferenceGenerator

TOL = 1e-5  # our float32 engine vs the float64 reference (measured ~3e-7)
SIZE = (4, 6)  # latent height, width: 2x3 patches per frame
SEED = 3


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def _run(model, cfg, blocks, switch_before=None, seed=SEED):
    """Engine and reference side by side; returns (engine blocks, reference blocks, session, reference)."""
    prompts = [prompt(0), prompt(1)]
    session = GenerationSession(model, cfg, SIZE, prompts[0], seed=seed)
    ref = ReferenceGenerator(model, cfg, prompts, seed=seed, latent_size=SIZE)
    ours, theirs = [], []
    for b in range(blocks):
        if b == switch_before:
            session.set_prompt(prompts[1])
            ref.switch_prompt(1)
        ours.append(session.next_block())
        theirs.append(ref.next_block())
    return ours, theirs, session, ref


def _max_err(ours, theirs):
    return max(rel_err(a.double(), b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
def test_blocks_match_masked_reference_beyond_the_window(model, rope_mode):
    # 8 blocks = 24 latent frames, twice the 12-frame window: sink + eviction are exercised.
    ours, theirs, _, _ = _run(model, GenerationConfig(rope_mode=rope_mode), blocks=8)
    assert _max_err(ours, theirs) < TOL


def test_negative_control_without_eviction_differs(model):
    """A reference that keeps every frame visible (no window) disagrees once the window is full."""
    cfg = GenerationConfig()
    ours, _, _, _ = _run(model, cfg, blocks=6)
    no_window = ReferenceGenerator(
        model, cfg, [prompt(0)], seed=SEED, latent_size=SIZE, visible_fn=lambda n: list(range(n))
    )
    theirs = [no_window.next_block() for _ in range(6)]
    assert _max_err(ours[:4], theirs[:4]) < TOL  # identical while everything fits in the window
    assert rel_err(ours[5].double(), theirs[5]) > 100 * TOL


def test_relative_rope_differs_from_absolute_after_the_window_fills(model):
    absolute, _, _, _ = _run(model, GenerationConfig(), blocks=5)
    relative, _, _, _ = _run(model, GenerationConfig(rope_mode="relative"), blocks=5)
    assert torch.equal(absolute[0], relative[0])  # positions agree while nothing was evicted
    assert rel_err(relative[4].double(), absolute[4].double()) > 100 * TOL


def _expected_cache_frames(cfg: GenerationConfig, committed: int, sink: list[int]) -> set[int]:
    """Frames the cache holds after `committed` frames: the sink + the last (window - sink) frames."""
    return set(sink) | set(range(max(0, committed - (cfg.window_frames - cfg.sink_frames)), committed))


def _check_cache_against_reference(session: GenerationSession, ref: ReferenceGenerator, cfg):
    engine = session.engine
    layout = engine.scheduler.sessions[GenerationSession.SESSION_ID].layout
    held = {f: s for s, f in enumerate(layout.slot_frames) if f >= 0}
    assert set(held) == _expected_cache_frames(cfg, ref.committed, ref.sink)
    tokens = engine.tokens_per_frame
    for frame, slot in held.items():
        keys, values = ref.committed_kv(frame)
        for layer in range(len(keys)):
            cached_k = engine.cache.keys[layer][0, slot * tokens : (slot + 1) * tokens]
            cached_v = engine.cache.values[layer][0, slot * tokens : (slot + 1) * tokens]
            assert rel_err(cached_k.double(), keys[layer]) < TOL, (frame, layer)
            assert rel_err(cached_v.double(), values[layer]) < TOL, (frame, layer)


@pytest.mark.parametrize(
    "switch_before, blocks",
    [(6, 8), (2, 4)],  # n = 18 > window (sink kept, 9 frames recached) and n = 6 <= window (all recached)
    ids=["after-window-full", "before-window-full"],
)
def test_recache_matches_reference_and_leaves_the_right_slots(model, switch_before, blocks):
    cfg = GenerationConfig()
    ours, theirs, session, ref = _run(model, cfg, blocks=switch_before + 1, switch_before=switch_before)
    assert _max_err(ours, theirs) < TOL
    _check_cache_against_reference(session, ref, cfg)

    # Frames before the switch are bit-identical to a run that never switches.
    plain = GenerationSession(model, cfg, SIZE, prompt(0), seed=SEED)
    for b in range(switch_before):
        assert torch.equal(plain.next_block(), ours[b])
    # Negative control: switching without recache gives something else after the switch.
    no_recache, _, _, _ = _run(
        model, cfg.with_(recache="off"), blocks=switch_before + 1, switch_before=switch_before
    )
    assert rel_err(no_recache[switch_before].double(), theirs[switch_before]) > 100 * TOL


@pytest.mark.parametrize(
    "changes, switch_before, differs_from_default",
    [
        ({"recache": "block_causal"}, 6, True),
        ({"global_sink": False}, 6, True),
        ({"global_sink": False}, 2, False),  # n <= window: the sink is recached either way
        ({"rope_mode": "relative"}, 6, True),
    ],
    ids=["block-causal", "no-global-sink-full", "no-global-sink-early", "relative"],
)
def test_recache_options_match_reference(model, changes, switch_before, differs_from_default):
    cfg = GenerationConfig(**changes)
    ours, theirs, session, ref = _run(model, cfg, blocks=switch_before + 2, switch_before=switch_before)
    assert _max_err(ours, theirs) < TOL
    if cfg.rope_mode == "absolute":
        _check_cache_against_reference(session, ref, cfg)
    # Against the default recache: the option matters where the table says it does (block-causal
    # masking moves the next block least: ~2e-4, 20x the tolerance and ~700x the measured error).
    default, _, _, _ = _run(model, GenerationConfig(), blocks=switch_before + 1, switch_before=switch_before)
    err = rel_err(default[switch_before].double(), theirs[switch_before])
    assert err > 10 * TOL if differs_from_default else err < TOL
