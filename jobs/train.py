"""LongLive's training stages (`longlive_core.training`) as a Ray Train job on any number of workers.

    python -m jobs.train --config jobs/train_stage2.yaml --workers 8 --gpu --storage s3://bucket/runs

Each worker (a `TorchTrainer` worker: one GPU, or CPU shares with gloo) runs a `DMDTrainer` on its own
rows of the batch (its prompts and noise are drawn from (seed, step, rank)); the trainer averages the LoRA
gradients over workers with `all_reduce` itself, so this is data parallel like DDP, without a wrapper.

A step = train -> report -> checkpoint:
1. `DMDTrainer.train_step()` on every worker.
2. `ray.train.report` of the step's metrics from every worker (Ray keeps rank 0's).
3. Every `checkpoint_every` steps and at the last one, every worker saves into its own temporary directory
   (rank 0 everything, the others only `rollout/rank{r}.safetensors`, their live rollout in the middle of a
   sequence) and reports it with the same `checkpoint_step{N}` name; Ray Train copies each worker's files
   into that one directory of the run, `{storage}/{name}/checkpoint_step{N}`, and registers it once every
   worker has reported. Its `models/lora.pt` is what `LongLivePipeline.load_lora_weights` reads.

Resuming: a worker that dies makes Ray Train restart the worker group (`--max-failures`), and each worker
continues from `ray.train.get_checkpoint()`, the run's latest checkpoint. After a crash of the driver (or
the cluster), the same command again (same `--storage` and `--name`) continues the run: Ray Train finds
its checkpoints in the run directory. `--resume-from DIR` starts a run from a checkpoint directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from longlive_core.training import TRAINING_PRESETS, DMDTrainer, TrainingConfig
from longlive_core.training.trainer import STATE_FILE  # what makes a directory a training checkpoint

logger = logging.getLogger(__name__)

LOSSES = ("generator_loss", "critic_loss")
# Fault injection (the crash-and-resume test, chaos runs): once Ray Train has taken in the report of step
# CRASH_AT_STEP (so its checkpoints up to there are registered), rank 0 creates the file CRASH_MARKER and
# ends its process with os._exit(1). It never crashes while that file exists, so the restarted run goes
# on. `run` forwards both variables to the workers.
CRASH_AT_STEP, CRASH_MARKER = "LONGLIVE_TRAIN_CRASH_AT_STEP", "LONGLIVE_TRAIN_CRASH_MARKER"


# -- configuration ---------------------------------------------------------------------------------
def build_config(entries: dict[str, Any]) -> TrainingConfig:
    """A TrainingConfig from `{preset: NAME, field: value, ...}` (a YAML file's mapping plus `--set`s)."""
    entries = dict(entries)
    preset = entries.pop("preset", None)
    if preset not in TRAINING_PRESETS:
        raise ValueError(f"preset: {preset!r} is not a training preset; one of {sorted(TRAINING_PRESETS)}")
    defaults = {field.name: field.default for field in dataclasses.fields(TrainingConfig)}
    for key, value in entries.items():
        if key not in defaults:
            raise ValueError(f"{key}: unknown training option; known: preset, {', '.join(defaults)}")
        entries[key] = _checked(key, value, defaults[key])
    return resolve_paths(TrainingConfig.from_name(preset, **entries))


def _checked(key: str, value: Any, default: Any) -> Any:
    """The value, if it has the type of the field's default (a pair for tuples, str or null for `critic`)."""
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if default is None:
        ok, kind = value is None or isinstance(value, str), "a string or null"
    elif isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, tuple):
        kind = f"a list of {len(default)} {type(default[0]).__name__}s"
        ok = isinstance(value, (list, tuple)) and len(value) == len(default)
        ok = ok and all(_is_number(v, type(d)) for v, d in zip(value, default, strict=True))
    elif isinstance(default, (int, float)):
        ok, kind = _is_number(value, type(default)), type(default).__name__
    else:
        ok, kind = isinstance(value, type(default)), type(default).__name__
    if not ok:
        raise ValueError(f"{key}: expected {kind}, got {value!r}")
    return value


def _is_number(value: Any, kind: type) -> bool:
    """An int for int fields; an int or a float for float fields; never a bool."""
    allowed = (int,) if kind is int else (int, float)
    return isinstance(value, allowed) and not isinstance(value, bool)


def resolve_paths(config: TrainingConfig) -> TrainingConfig:
    """Relative paths, as the command line reads them (Ray Train workers run in a directory of their own):
    the prompt file always, a model when it names an existing local directory."""
    prompts = Path(config.prompts).expanduser()
    if not prompts.is_file():
        raise ValueError(f"prompts: no such file {config.prompts}")
    changes: dict[str, Any] = {"prompts": str(prompts.resolve())}
    for key in ("student", "teacher", "critic"):
        value = getattr(config, key)
        if value is not None and Path(value).expanduser().exists():
            changes[key] = str(Path(value).expanduser().resolve())
    return config.with_(**changes)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainingConfig:
    """A YAML file (`preset:` plus TrainingConfig fields) with `key=value` overrides (values in YAML)."""
    entries: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {path} must hold a mapping (preset: ..., then options)")
        entries.update(loaded)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected key=value, got {override!r}")
        entries[key.strip()] = yaml.safe_load(value)
    return build_config(entries)


# -- the workers -----------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One TorchTrainer worker: `{"training": TrainingConfig.to_dict(), "resume_from": DIR or None}`."""
    import ray.train
    import ray.train.torch

    config = TrainingConfig(**loop_config["training"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _setup_logging(rank)
    trainer = DMDTrainer.from_config(config, ray.train.torch.get_device(), rank, world_size)
    _resume(trainer, ray.train.get_checkpoint(), loop_config.get("resume_from"))
    crash_at = _crash_step() if rank == 0 else None
    first, started = trainer.step, time.monotonic()
    while trainer.step < config.steps:
        # 1. Train.
        metrics = trainer.train_step()
        done = metrics["steps_done"] = trainer.step
        if rank == 0 and (done % config.log_every == 0 or done == config.steps):
            _log_progress(metrics, config.steps, (time.monotonic() - started) / (done - first))
        # 2-3. Report, with a checkpoint every `checkpoint_every` steps and at the last.
        if done % config.checkpoint_every and done != config.steps:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory(prefix=f"longlive-checkpoint-rank{rank}-") as directory:
                trainer.save(directory, rollout_only=rank != 0)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
                name = f"checkpoint_step{done:06d}"
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if done == crash_at:
            _crash(done)
    if rank == 0:
        logger.info("done: %d of %d steps", trainer.step, config.steps)


def _setup_logging(rank: int) -> None:
    """Progress lines from rank 0 on the worker's stdout (Ray forwards it to the driver); the trainer's own
    line per step is left out (the same metrics, without the step count)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank}: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("longlive_core.training.trainer").setLevel(logging.WARNING)


def _resume(trainer: DMDTrainer, latest: Any, resume_from: str | None) -> None:
    """Continue from the run's latest checkpoint (a restart), else from `resume_from`, else start."""
    import ray.train

    checkpoint = latest or (ray.train.Checkpoint(resume_from) if resume_from else None)
    if checkpoint is None:
        return
    with checkpoint.as_directory() as directory:  # local storage: the directory itself; remote: a copy
        trainer.load(directory)
    if trainer.rank == 0:
        logger.info("resumed at step %d from %s", trainer.step, checkpoint.path)


def _crash(step: int) -> None:
    """End this process once Ray Train has registered everything reported (an alpha API of Ray 2.60)."""
    from ray.train import CheckpointConsistencyMode, get_all_reported_checkpoints

    get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    Path(os.environ[CRASH_MARKER]).touch()
    logger.warning("crashing after step %d (%s)", step, CRASH_AT_STEP)
    os._exit(1)


def _crash_step() -> int | None:
    env = _crash_env()
    return int(env[CRASH_AT_STEP]) if env and not Path(env[CRASH_MARKER]).is_file() else None


def _crash_env() -> dict[str, str]:
    """The fault injection variables of this process, checked, for the workers."""
    env = {k: os.environ[k] for k in (CRASH_AT_STEP, CRASH_MARKER) if os.environ.get(k)}
    if CRASH_AT_STEP in env and (CRASH_MARKER not in env or not env[CRASH_AT_STEP].isdigit()):
        raise ValueError(f"{CRASH_AT_STEP} takes a step count and needs {CRASH_MARKER} (a file path)")
    return env if CRASH_AT_STEP in env else {}


def _log_progress(metrics: dict[str, float], steps: int, seconds_per_step: float) -> None:
    done = metrics["steps_done"]
    losses = " ".join(f"{k}={metrics[k]:.5g}" for k in LOSSES if k in metrics)
    eta = seconds_per_step * (steps - done)
    logger.info(
        "step %d/%d (%.0f%%) %s | %.2f s/step, %s left", done, steps, 100 * done / steps, losses,
        seconds_per_step, time.strftime("%H:%M:%S", time.gmtime(eta)),
    )  # fmt: skip


# -- the driver ------------------------------------------------------------------------------------
def run(
    config: TrainingConfig,
    workers: int = 1,
    use_gpu: bool = False,
    storage: str = "~/ray_results",
    name: str = "longlive-train",
    max_failures: int = 3,
    resume_from: str | None = None,
    cpus_per_worker: float = 1.0,
    keep_checkpoints: int | None = None,
) -> Any:
    """Train on `workers` Ray Train workers; returns the `ray.train.Result` (its `checkpoint` is the last).

    The run lives in `{storage}/{name}` (local or a URI such as s3://bucket/prefix; on several nodes it must
    be storage they all reach): a run of the same name continues from its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
    if max_failures < -1:
        raise ValueError(f"max_failures must be >= -1 (-1: no limit), got {max_failures}")
    if keep_checkpoints is not None and keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
    if not name or "/" in name:
        raise ValueError(f"name must be a non-empty directory name, got {name!r}")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if resume_from is not None and "://" not in resume_from:
        if not (Path(resume_from) / STATE_FILE).is_file():
            raise ValueError(f"resume_from: {resume_from} is no training checkpoint ({STATE_FILE} missing)")
        resume_from = str(Path(resume_from).resolve())
    crash_env = _crash_env()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"training": config.to_dict(), "resume_from": resume_from},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": crash_env} if crash_env else None,
        ),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train", description="Train LongLive (a Ray Train job; see jobs/README.md)."
    )
    parser.add_argument("--config", help="YAML: `preset: self-forcing-dmd | streaming-long-tuning` + options")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an option")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (one GPU each with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); else CPU (gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--storage", default="~/ray_results", help="runs directory or URI (s3://...)")
    parser.add_argument("--name", help="the run (default: the config file's name); the same name resumes")
    parser.add_argument("--max-failures", type=int, default=3, help="worker group restarts (-1: no limit)")
    parser.add_argument("--resume-from", help="start from this checkpoint directory")
    parser.add_argument("--keep-checkpoints", type=int, help="keep the newest K checkpoints (default: all)")
    args = parser.parse_args(argv)
    if args.config is None and not any(s.startswith("preset=") for s in args.set):
        parser.error("give --config FILE (or --set preset=NAME)")
    name = args.name or (Path(args.config).stem if args.config else "longlive-train")
    try:
        config = load_config(args.config, args.set)
        existing = "://" not in args.storage and (Path(args.storage).expanduser() / name).is_dir()
        resumes = " (the run exists: it goes on from its latest checkpoint)" if existing else ""
        print(f"training {name}: {args.workers} worker(s), {config.steps} steps{resumes}", flush=True)
        result = run(
            config, args.workers, args.gpu, args.storage, name, args.max_failures, args.resume_from,
            args.cpus_per_worker, args.keep_checkpoints,
        )  # fmt: skip
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if result.checkpoint is None:
        print("no checkpoint was made", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    losses = "".join(f", {k} {metrics[k]:.5g}" for k in LOSSES if k in metrics)
    print(f"final checkpoint: {result.checkpoint.path} (steps done: {metrics.get('steps_done')}{losses})")
    return 0


if __name__ == "__main__":
    from jobs.train import main as _main  # the workers import jobs.train, not this __main__

    sys.exit(_main())
