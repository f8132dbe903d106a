"""jobs/train.py as a real Ray Train job (no mocks): two workers of the tiny recipe on CPU shares (gloo).

The reference for the crash and `--resume-from` runs is an uninterrupted run: training is a function of
(seed, step, rank), so resuming exactly gives the same weights bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train import CRASH_AT_STEP, CRASH_MARKER, build_config, load_config, main, run
from longlive_core.state_file import load_state
from longlive_core.training.trainer import STATE_FILE, rollout_file
from tests.helpers import TINY_TRAINING

PROMPTS = ["a red robot in a rainy city", "the robot walks into a forest", "a cat on a sofa", "waves at dusk"]
STEPS, EVERY = 6, 2
# 2 blocks (6 latent frames) a step, 24-frame sequences: 4 steps a sequence, so the checkpoints of steps
# 2 and 6 are in the middle of a sequence (each rank's live rollout saved) and that of step 4 is at its end.
TINY = dict(
    preset="streaming-long-tuning",
    **TINY_TRAINING,
    batch_size=1,
    sequence_frames=24,
    steps=STEPS,
    checkpoint_every=EVERY,
)
JOB = dict(workers=2, cpus_per_worker=0.25, max_failures=0)


@pytest.fixture(scope="module")
def cluster():
    """Ray with 2 CPUs: the service tests' (tests/conftest.py), when they ran first, else our own."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False)
    with pytest.MonkeyPatch.context() as env:
        # The controller takes one report per poll (2 s by default); the tiny steps take 0.05 s.
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def uninterrupted(cluster, prompts, storage):
    return run(build_config({**TINY, "prompts": prompts}), storage=str(storage), name="uninterrupted", **JOB)


def lora(checkpoint: Path, file: str = "models/lora.pt") -> dict[str, torch.Tensor]:
    saved = torch.load(checkpoint / file, weights_only=True)
    return saved["generator_lora" if file == "models/lora.pt" else "critic_lora"]


def assert_same_weights(a: Path, b: Path) -> None:
    for file in ("models/lora.pt", "models/critic_lora.pt"):
        first, second = lora(a, file), lora(b, file)
        assert first.keys() == second.keys() and first
        for key in first:
            assert torch.equal(first[key], second[key]), f"{file}: {key} differs"


def test_config_validation(prompts, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="learning_rate: unknown training option"):
        build_config({**TINY, "prompts": prompts, "learning_rate": 1e-4})
    with pytest.raises(ValueError, match="steps: expected int"):
        load_config(None, ["preset=self-forcing-dmd", f"prompts={prompts}", "steps=many"])
    with pytest.raises(ValueError, match="size: expected a list of 2 ints"):
        build_config({**TINY, "prompts": prompts, "size": [48]})
    with pytest.raises(ValueError, match="preset: 'stage-3'"):
        build_config({**TINY, "prompts": prompts, "preset": "stage-3"})
    with pytest.raises(ValueError, match="prompts: no such file"):
        build_config({**TINY, "prompts": str(tmp_path / "missing.txt")})
    with pytest.raises(ValueError, match="--set: expected key=value"):
        load_config(None, ["steps"])
    with pytest.raises(ValueError, match="resume_from: .* is no training checkpoint"):
        run(build_config({**TINY, "prompts": prompts}), resume_from=str(tmp_path), storage=str(tmp_path))
    # --set values are YAML (1e-5 without a dot too); relative paths become absolute for the workers.
    monkeypatch.chdir(Path(prompts).parent)
    config = load_config(None, ["preset=self-forcing-dmd", "prompts=prompts.txt", "lr=1e-5", "size=[64, 48]"])
    assert (config.lr, config.size, config.prompts) == (1e-5, (64, 48), prompts)
    # The shipped stage configs: the presets and the real models.
    root = Path(__file__).resolve().parents[1]
    for stage, preset, frames in [(1, "self-forcing-dmd", 21), (2, "streaming-long-tuning", 240)]:
        config = load_config(root / f"jobs/train_stage{stage}.yaml", [f"prompts={prompts}"])
        assert (config.sequence_frames, config.teacher) == (frames, "wan2.1-t2v-1.3b"), preset
        assert config.student in ("longlive-1.3b", "wan2.1-t2v-1.3b") and config.size == (832, 480)


def test_two_workers_report_metrics_and_merge_checkpoints(uninterrupted, storage):
    run_dir = storage / "uninterrupted"
    final = Path(uninterrupted.checkpoint.path)
    assert final == run_dir / f"checkpoint_step{STEPS:06d}"
    metrics = uninterrupted.metrics  # rank 0's, of the last step
    assert (metrics["steps_done"], metrics["step"], metrics["sequence"]) == (STEPS, STEPS - 1, 1)
    assert all(np.isfinite(metrics[k]) and metrics[k] > 0 for k in ("generator_loss", "critic_loss"))
    assert sorted(p.name for p in run_dir.glob("checkpoint_step*")) == [
        f"checkpoint_step{step:06d}" for step in range(EVERY, STEPS + 1, EVERY)
    ]
    for step, mid_sequence in [(2, True), (4, False), (6, True)]:
        checkpoint = run_dir / f"checkpoint_step{step:06d}"
        state = load_state(checkpoint / STATE_FILE)
        assert (state["step"], state["world_size"]) == (step, 2)
        assert (checkpoint / "models/lora.pt").is_file() and (checkpoint / "models/critic_lora.pt").is_file()
        rollouts = sorted(p.name for p in (checkpoint / "rollout").glob("*.safetensors"))
        assert rollouts == (["rank0.safetensors", "rank1.safetensors"] if mid_sequence else []), step
        if mid_sequence:  # each worker's own sequence, merged by Ray Train into one directory
            rank0, rank1 = ((checkpoint / rollout_file(r)).read_bytes() for r in (0, 1))
            assert rank0 != rank1
    # Training moved the weights: the step-2 and the final LoRA differ.
    early, last = lora(run_dir / "checkpoint_step000002"), lora(final)
    assert early.keys() == last.keys() and any(not torch.equal(early[k], last[k]) for k in early)


def test_checkpoint_loads_for_inference(uninterrupted):
    from longlive_core import LongLivePipeline

    untrained = LongLivePipeline.from_pretrained("tiny-random", device="cpu")
    trained = LongLivePipeline.from_pretrained("tiny-random", device="cpu")
    assert trained.load_lora_weights(Path(uninterrupted.checkpoint.path) / "models/lora.pt") > 0
    before = untrained("a red robot in a rainy city", seconds=1, seed=0, size=(48, 32))
    after = trained("a red robot in a rainy city", seconds=1, seed=0, size=(48, 32))
    assert after.dtype == np.uint8 and after.shape == before.shape
    assert (before != after).mean() > 0.05


def test_worker_crash_resumes_from_the_latest_checkpoint(uninterrupted, prompts, storage, tmp_path, capsys):
    """Rank 0's process ends (os._exit) after step 3, once; Ray Train restarts the workers, which go on
    from the step-2 checkpoint (mid-sequence: both rollouts) and end with the uninterrupted run's weights."""
    marker = tmp_path / "crashed"
    sets = [f"{key}={json.dumps(value)}" for key, value in {**TINY, "prompts": prompts}.items()]
    argv = [arg for option in sets for arg in ("--set", option)]
    argv += ["--workers", "2", "--cpus-per-worker", "0.25", "--storage", str(storage), "--name", "crashed"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CRASH_AT_STEP, "3")
        env.setenv(CRASH_MARKER, str(marker))
        assert main([*argv, "--max-failures", "1"]) == 0
    assert marker.is_file(), "the worker never crashed"
    final = Path(capsys.readouterr().out.split("final checkpoint: ")[1].split(" (")[0])
    assert final == storage / "crashed" / f"checkpoint_step{STEPS:06d}"
    assert_same_weights(final, Path(uninterrupted.checkpoint.path))
    # Resumed, not started over: the step-2 checkpoint predates the crash, the step-4 one follows it.
    crashed_at = marker.stat().st_mtime_ns
    assert (final.parent / "checkpoint_step000002" / STATE_FILE).stat().st_mtime_ns <= crashed_at
    assert (final.parent / "checkpoint_step000004" / STATE_FILE).stat().st_mtime_ns > crashed_at


def test_resume_from_a_checkpoint_directory(uninterrupted, prompts, storage):
    """A new run from the step-4 checkpoint (a sequence boundary) of another one makes steps 5-6 only."""
    start = Path(uninterrupted.checkpoint.path).parent / "checkpoint_step000004"
    config = build_config({**TINY, "prompts": prompts})
    result = run(config, storage=str(storage), name="resumed", resume_from=str(start), **JOB)
    assert [p.name for p in (storage / "resumed").glob("checkpoint_step*")] == [f"checkpoint_step{STEPS:06d}"]
    assert result.metrics["steps_done"] == STEPS
    assert_same_weights(Path(result.checkpoint.path), Path(uninterrupted.checkpoint.path))
