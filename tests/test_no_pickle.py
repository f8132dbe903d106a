"""No pickle of our own: a crafted pickle where a training checkpoint or a rollout is expected is refused
with a clear error, and the code it carries never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from longlive_core.training import DMDTrainer
from longlive_core.training.trainer import CRITIC_FILE, LORA_FILE, STATE_FILE
from tests.test_training import tiny_config


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
    assert (directory / "rollout" / "rank0.pt").is_file()
    return trainer, directory


@pytest.mark.parametrize("name", ["rollout/rank0.pt", STATE_FILE, LORA_FILE, CRITIC_FILE])
def test_a_pickled_object_in_a_checkpoint_file_is_refused_unrun(checkpoint, tmp_path, name):
    trainer, directory = checkpoint
    target = directory / name
    original = target.read_bytes()
    marker = tmp_path / "ran"
    try:
        torch.save({"payload": Payload(marker)}, target)
        with pytest.raises(ValueError, match=f"{name} is not a checkpoint this trainer wrote"):
            trainer.load(directory)
    finally:
        target.write_bytes(original)
    assert not marker.exists()


def test_a_rollout_whose_scheduler_is_a_pickle_is_refused_unrun(checkpoint, tmp_path):
    """The rollout format before scheduler state version 1: tensors, and the scheduler as pickled bytes
    (which weights_only lets through as bytes). Those bytes are never unpickled."""
    trainer, directory = checkpoint
    target = directory / "rollout" / "rank0.pt"
    original = target.read_bytes()
    marker = tmp_path / "ran"
    state = torch.load(target, weights_only=True)
    try:
        torch.save({**state, "scheduler": pickle.dumps(Payload(marker))}, target)
        with pytest.raises(ValueError, match="scheduler state must be a versioned dict, got bytes"):
            trainer.load(directory)
    finally:
        target.write_bytes(original)
    assert not marker.exists()
    trainer.load(directory)  # the real rollout still loads
