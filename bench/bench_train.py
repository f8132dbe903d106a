"""GPU smoke run of LongLive's training recipe at full size: step time and memory of both stages.

Random weights of the real shapes: the 1.3B causal student, a teacher of the 1.3B shape (the paper's 14B
teacher does not fit one card beside the rest), the critic a copy of the teacher, umT5-XXL. LoRA on
the student and the critic, gradient checkpointing, 480x832, batch 1 per GPU.
- Check first: with CFG off the critic (a copy of the teacher) makes the DMD gradient exactly zero, so
  the student's first gradient must be 0; with CFG 3 it must not be.
- Stage 1 (self-forcing-dmd): a fresh 21-frame sequence every step.
- Stage 2 (streaming-long-tuning): 21-frame steps continuing one sequence through the live KV cache
  (a prompt switch with KV-recache at a step boundary); a mid-sequence checkpoint saved and loaded.

    python bench/bench_train.py --out bench/results/train_h200.md
    python bench/bench_train.py --model tiny-random --size 48x32 --lora-rank 4   # the script itself, CPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402
from longlive_core.training import DMDTrainer, TrainingConfig  # noqa: E402

PROMPTS = [
    "A red robot walks through a rainy neon city at night, reflections on the wet street.",
    "The red robot walks into a sunlit forest, leaves falling around it.",
    "A small boat drifts on a calm sea at sunrise, gulls overhead.",
    "The boat reaches a rocky shore where waves break into white foam.",
]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(n: int) -> float:
    return n / 2**30


def peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def build(preset: str, prompts: Path, args, **changes) -> DMDTrainer:
    config = TrainingConfig.from_name(
        preset,
        student=args.model,
        teacher=args.model,
        prompts=str(prompts),
        size=args.size,
        lora_rank=args.lora_rank,
        lora_alpha=float(args.lora_rank),
        generator_every=1,  # every step a generator step: the expensive case
        seed=args.seed,
        **changes,
    )
    started = time.perf_counter()
    trainer = DMDTrainer.from_config(config)
    print(f"built {preset} in {time.perf_counter() - started:.1f} s", flush=True)
    return trainer


def release(trainer: DMDTrainer | None) -> None:
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_steps(trainer: DMDTrainer, steps: int, stage: str) -> list[dict]:
    rows = []
    for _ in range(steps):
        sync()
        started = time.perf_counter()
        metrics = trainer.train_step()
        sync()
        metrics["seconds"] = time.perf_counter() - started
        metrics["peak_gib"] = gib(peak_memory())
        metrics["stage"] = stage
        rows.append(metrics)
        print(stage, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1-steps", type=int, default=3)
    parser.add_argument("--stage2-steps", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=256)
    parser.add_argument("--model", default="random-1.3b", help="student, teacher (and critic) weights")
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(832, 480))
    parser.add_argument("--seed", type=int, default=8, help="8: stage 2 switches prompt at its step 2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    # 0. The DMD check at full size.
    trainer = build("self-forcing-dmd", prompts, args, guidance_scale=1.0)
    zero_norm = trainer.train_step()["generator_grad_norm"]
    release(trainer)

    # 1. Stage 1.
    trainer = build("self-forcing-dmd", prompts, args)
    rows = run_steps(trainer, args.stage1_steps, "1: self-forcing-dmd")
    release(trainer)

    # 2. Stage 2, with a checkpoint in the middle of its sequence, loaded by a new trainer.
    trainer = build("streaming-long-tuning", prompts, args)
    switch_at = trainer.switch_step(0)
    rows += run_steps(trainer, args.stage2_steps, "2: streaming-long-tuning")
    sync()
    started = time.perf_counter()
    checkpoint = trainer.save(work / "checkpoint")
    save_s = time.perf_counter() - started
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    lora_size = (checkpoint / "models" / "lora.pt").stat().st_size
    expected = trainer.train_step()
    release(trainer)
    # Two trainers resume from it: their difference is the card's run-to-run noise, the baseline for
    # the resumed step against the uninterrupted one.
    resumed, load_seconds = [], []
    for _ in range(2):
        trainer = build("streaming-long-tuning", prompts, args)
        started = time.perf_counter()
        trainer.load(checkpoint)
        load_seconds.append(time.perf_counter() - started)
        resumed.append(trainer.train_step())
        release(trainer)
    load_s = min(load_seconds)

    def apart(a: dict, b: dict) -> str:
        return ", ".join(f"{k} {abs(a[k] - b[k]) / abs(b[k]):.1e}" for k in ("critic_loss", "generator_loss"))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    dtype = "bf16" if torch.cuda.is_available() else "float32"
    meta = [
        f"- device: {device}; torch {torch.__version__}; {dtype} models, fp32 LoRA (rank {args.lora_rank}, "
        f"alpha {args.lora_rank}) on student and critic, AdamW, gradient checkpointing, batch 1",
        f"- command: `{command_line()}`",
        f"- video {args.size[0]}x{args.size[1]} (latents 16 x {args.size[1] // 8} x {args.size[0] // 8}); "
        "7 blocks (21 latent frames) per step, each stopped at a random exit step with autograd; DMD with "
        "CFG 3 on the teacher, then the critic's flow loss; generator and critic updated every step",
        f"- models: {args.model} student, teacher and critic (random weights; the critic a copy of the "
        "teacher) with its text encoder; stage 2 continues a 240-frame sequence and switches prompt "
        f"(KV-recache) at its step {switch_at}",
        f"- check: with CFG 1 the critic equals the teacher and the student's gradient norm is "
        f"{zero_norm:g} (must be 0)",
        f"- stage 2 checkpoint mid-sequence: {gib(size):.2f} GiB ({lora_size / 2**20:.0f} MiB of it the "
        f"student's lora.pt, the rest the critic, optimizer states and the live rollout), saved in "
        f"{save_s:.1f} s, loaded in {load_s:.1f} s; the next step resumed from it against the uninterrupted "
        f"one, relative: {apart(resumed[0], expected)}; two resumed runs against each other: "
        f"{apart(resumed[1], resumed[0])}",
    ]
    table = [
        "| stage | step | frames of the sequence | exit step | switched | generator loss | critic loss "
        "| step (s) | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['stage']} | {r['step']} | {r['frames']} | {r['exit_step']} | {r['switched']} | "
            f"{r['generator_loss']:.3g} | {r['critic_loss']:.4g} | {r['seconds']:.2f} | {r['peak_gib']:.1f} |"
        )
    summary = ["", "| stage | median step (s), first excluded | peak memory (GiB) |", "|---|---|---|"]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        later = [r["seconds"] for r in mine[1:]] or [mine[0]["seconds"]]
        peak = max(r["peak_gib"] for r in mine)
        summary.append(f"| {stage} | {statistics.median(later):.2f} | {peak:.1f} |")
    emit("Training smoke run: LongLive's two stages at full size", meta, table + summary, args.out)


if __name__ == "__main__":
    main()
