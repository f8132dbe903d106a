"""No pickle of our own: a crafted pickle where a training checkpoint or a rollout is expected is refused
with a clear error, and the code it carries never runs. Our state files are safetensors + JSON
(longlive_core/state_file.py); the LoRA files (LongLive's format) are read with weights_only."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from longlive_core.state_file import load_state, save_state
from longlive_core.training import DMDTrainer
from longlive_core.training.trainer import CRITIC_FILE, LORA_FILE, STATE_FILE, rollout_file
from tests.test_training import tiny_config

ROLLOUT = rollout_file(0)


class Payload:
    """Unpickling it creates `marker`: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[DMDTrainer, Path]:
    """A trainer and a checkpoint it saved in the middle of a sequence (so with its rollout)."""
    tmp_path = tmp_path_factory.mktemp("no-pickle")
    trainer = DMDTrainer.from_config(tiny_config(tmp_path), "cpu")
    trainer.train_step()
    directory = trainer.save(tmp_path / "step1")
    assert (directory / ROLLOUT).is_file()
    return trainer, directory


@pytest.mark.parametrize(
    "name, refusal",
    [
        (ROLLOUT, "is not a state file this code wrote"),
        (STATE_FILE, "is not a state file this code wrote"),
        (LORA_FILE, "is not a checkpoint this trainer wrote"),
        (CRITIC_FILE, "is not a checkpoint this trainer wrote"),
    ],
)
def test_a_pickled_object_in_a_checkpoint_file_is_refused_unrun(checkpoint, tmp_path, name, refusal):
    trainer, directory = checkpoint
    target = directory / name
    original = target.read_bytes()
    marker = tmp_path / "ran"
    try:
        torch.save({"payload": Payload(marker)}, target)
        with pytest.raises(ValueError, match=f"{name} {refusal}, refused unread"):
            trainer.load(directory)
    finally:
        target.write_bytes(original)
    assert not marker.exists()
    trainer.load(directory)  # the real checkpoint still loads


def test_state_files_hold_no_pickle_and_round_trip_exactly(checkpoint, tmp_path):
    """The rollout and trainer state are safetensors with a JSON header (no pickle opcodes at all), and
    what they hold comes back with its types: int keys, tuples, tensors bit for bit."""
    trainer, directory = checkpoint
    for name in (ROLLOUT, STATE_FILE):
        data = (directory / name).read_bytes()  # safetensors: u64 header length, JSON header, raw tensors
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        assert json.loads(header["__metadata__"]["state"]), name
    state = {
        "optimizer": trainer.generator_optimizer.state_dict(),
        "engine": trainer.engine.state_dict(),
        "plain": {"betas": (0.9, 0.99), "none": None, "flag": True, "name": "x", "n": 3, "x": 0.5},
    }
    save_state(state, tmp_path / "s.safetensors")
    loaded = load_state(tmp_path / "s.safetensors")
    assert loaded["plain"] == state["plain"] and isinstance(loaded["plain"]["betas"], tuple)
    saved_opt, loaded_opt = state["optimizer"], loaded["optimizer"]
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    assert sorted(loaded_opt["state"]) == sorted(saved_opt["state"]) and saved_opt["state"]
    for pid, entry in saved_opt["state"].items():
        for key, value in entry.items():
            assert torch.equal(loaded_opt["state"][pid][key], value), (pid, key)
    assert loaded["engine"]["scheduler"] == state["engine"]["scheduler"]
    for a, b in zip(loaded["engine"]["cache"], state["engine"]["cache"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [{"$tensor": "0"}, {1: "a", "b": 2}, {"model": object()}])
def test_state_that_json_cannot_carry_faithfully_is_refused_when_saved(tmp_path, bad):
    with pytest.raises((ValueError, TypeError)):
        save_state({"x": bad}, tmp_path / "s.safetensors")


def test_a_rollout_whose_scheduler_is_a_pickle_is_refused_unrun(checkpoint, tmp_path):
    """The rollout format before scheduler state version 1: tensors, and the scheduler as pickled bytes.
    A state file cannot even carry bytes; the engine's loader refuses them too, never unpickling."""
    trainer, directory = checkpoint
    marker = tmp_path / "ran"
    state = load_state(directory / ROLLOUT)
    with pytest.raises(ValueError, match="scheduler state must be a versioned dict, got bytes"):
        trainer.engine.load_state_dict({**state, "scheduler": pickle.dumps(Payload(marker))})
    with pytest.raises(TypeError, match="got bytes"):
        save_state({**state, "scheduler": pickle.dumps(Payload(marker))}, tmp_path / "s.safetensors")
    assert not marker.exists()
