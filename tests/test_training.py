"""Training (longlive_core.training) on tiny student, teacher and critic models, on the CPU."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from longlive_core.config import GenerationConfig
from longlive_core.engine import Engine
from longlive_core.lora import LoRALinear, add_lora, lora_state_dict, merge_lora, parse_lora_state_dict
from longlive_core.models.transformer_causal_wan import (
    CausalWanTransformer,
    SelfAttentionCache,
)
from longlive_core.pipeline import LongLivePipeline
from longlive_core.training import DMDTrainer, TrainingConfig
from longlive_core.training.dmd import NoiseLevel, ScoreContexts, dmd_loss
from longlive_core.training.models import critic_from
from longlive_core.training.trainer import rollout_file
from tests.helpers import TINY_TRAINING, tiny_model

PROMPTS = ["a red robot in a rainy city", "the robot walks into a forest", "a boat on a calm sea"]
LATENT = (4, 6)  # 32x48 video


def tiny_config(tmp_path, **changes) -> TrainingConfig:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = dict(TINY_TRAINING, prompts=str(prompts), batch_size=2, sequence_frames=18)  # 3 steps a sequence
    return TrainingConfig.from_name("streaming-long-tuning", **{**base, **changes})


def embeds(model: CausalWanTransformer, seed: int, tokens: int = 7) -> torch.Tensor:
    return torch.randn(tokens, model.config.text_dim, generator=torch.Generator().manual_seed(seed))


def randomize_lora(model: CausalWanTransformer, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * scale)


# -- LoRA -----------------------------------------------------------------------------------------------
def test_lora_starts_at_the_base_model_and_merges_to_what_it_computes():
    model, base = tiny_model(0), tiny_model(0)
    targets = add_lora(model, rank=4, alpha=8.0)
    assert len(targets) == 2 * 10  # q, k, v, o of both attentions and the two FFN linears, per block
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    x = torch.randn(1, 16, 3, *LATENT)
    t = torch.full((1, 3), 500.0)
    context = base.encode_context(embeds(base, 0)[None])
    with torch.no_grad():
        expected = base(x, t, context)
        assert torch.equal(model(x, t, model.encode_context(embeds(base, 0)[None])), expected)  # B = 0
        randomize_lora(model, seed=1)
        trained = model(x, t, model.encode_context(embeds(base, 0)[None]))
    state = lora_state_dict(model)
    assert all(k.startswith("base_model.model.blocks.") for k in state)  # peft's keys, as LongLive's lora.pt
    assert len(parse_lora_state_dict(state)) == len(targets)
    merged = tiny_model(0)
    merge_lora(merged, state, alpha=8.0)
    with torch.no_grad():
        got = merged(x, t, merged.encode_context(embeds(base, 0)[None]))
    assert (got - trained).abs().max() < 1e-4 * trained.abs().max()
    assert (trained - expected).abs().max() > 100 * (got - trained).abs().max()  # control: LoRA matters


# -- the rollout: Engine.train_step -------------------------------------------------------------------
def engine(model: CausalWanTransformer, steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)) -> Engine:
    engine = Engine(model, GenerationConfig(denoising_steps=steps), LATENT, max_sessions=1)
    engine.add_session("s", embeds(model, 0), seed=5)
    return engine


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_training_rollout_is_inference_with_the_step_list_cut_at_the_exit_step(checkpointing):
    """Self-Forcing's rollout: block by block through the KV cache, each block stopped at the exit step
    (autograd there) = inference with the first exit_step + 1 steps, through 6 blocks (the window slides)
    and a prompt switch (KV-recache)."""
    model = tiny_model(0)
    model.gradient_checkpointing = checkpointing
    training, truncated = engine(model), engine(model, steps=(1000.0, 750.0))
    for block in range(6):
        if block == 3:
            for e in (training, truncated):
                e.set_prompt("s", embeds(model, 1))
        got = training.train_step(exit_step=1)["s"]
        expected = truncated.step()["s"]
        assert got.grad_fn is not None
        assert (got - expected).abs().max() < 1e-5, block
    control = engine(model).train_step(exit_step=2)["s"]  # another exit step: other frames
    first = engine(model, steps=(1000.0, 750.0)).step()["s"]
    assert (control - first).abs().max() > 0.1


def test_gradient_checkpointing_gives_the_same_gradients_over_a_sliding_window(monkeypatch):
    """Five blocks in one step: the fifth evicts frames the earlier blocks' passes read. A checkpointed
    pass recomputes over its snapshot of the cache: the gradients equal those without checkpointing;
    recomputing over the live cache (the control) cannot."""

    def gradients(checkpointing: bool) -> torch.Tensor:
        model = tiny_model(0)
        add_lora(model, rank=4, alpha=4.0)
        randomize_lora(model, seed=2)
        model.gradient_checkpointing = checkpointing
        rollout = engine(model)
        blocks = [rollout.train_step(exit_step=1)["s"] for _ in range(5)]
        sum((b**2).mean() for b in blocks).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.abs().max() > 0
    assert (checkpointed - plain).abs().max() < 1e-5 * plain.abs().max()
    original = SelfAttentionCache.for_autograd
    monkeypatch.setattr(SelfAttentionCache, "for_autograd", lambda self, snapshot: original(self, False))
    # The deliberate mistake: the recompute would read what later blocks wrote; autograd refuses it.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        gradients(True)


# -- DMD ------------------------------------------------------------------------------------------------
def score_contexts(teacher, critic, prompt_seed: int = 0) -> ScoreContexts:
    cond, uncond = embeds(teacher, prompt_seed)[None], embeds(teacher, 99)[None]
    with torch.no_grad():
        return ScoreContexts(
            teacher.encode_context(cond), teacher.encode_context(uncond), critic.encode_context(cond)
        )


@pytest.mark.parametrize(
    ("critic_kind", "guidance", "zero"),
    [("teacher", 1.0, True), ("teacher", 3.0, False), ("trained", 1.0, False), ("other", 1.0, False)],
)
def test_the_dmd_gradient_vanishes_exactly_when_the_critic_equals_the_teacher(critic_kind, guidance, zero):
    teacher = tiny_model(1)
    critic = critic_from(teacher)
    add_lora(critic, rank=4, alpha=4.0)  # B = 0: still the teacher
    if critic_kind == "trained":
        randomize_lora(critic, seed=3)
    elif critic_kind == "other":
        critic = tiny_model(2)
    x0 = torch.randn(1, 16, 6, *LATENT, requires_grad=True)
    level = NoiseLevel.sample(1, 20, 980, 5.0, torch.Generator().manual_seed(0), "cpu")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    loss, gradient = dmd_loss(x0, teacher, critic, score_contexts(teacher, critic), level, noise, guidance)
    loss.backward()
    if zero:
        assert torch.count_nonzero(gradient) == 0 and torch.count_nonzero(x0.grad) == 0
    else:
        assert gradient.abs().mean() > 1e-3
        # The surrogate's gradient is the DMD gradient itself, over the element count.
        assert torch.allclose(x0.grad, gradient / x0.numel(), rtol=1e-4, atol=1e-9)


# -- the trainer ------------------------------------------------------------------------------------------
def test_stage_1_and_stage_2_train_with_finite_losses_and_moving_lora(tmp_path):
    stage1 = DMDTrainer.from_config(tiny_config(tmp_path).with_(step_blocks=2, sequence_frames=6), "cpu")
    stage2 = DMDTrainer.from_config(tiny_config(tmp_path), "cpu")
    assert stage1.steps_per_sequence == 1 and stage2.steps_per_sequence == 3
    for trainer in (stage1, stage2):
        before = lora_state_dict(trainer.student), lora_state_dict(trainer.critic)
        runs = [trainer.train_step() for _ in range(4)]
        for metrics in runs:
            for key in ("generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm"):
                assert math.isfinite(metrics[key]) and metrics[key] > 0, (key, metrics)
        for model, start in zip((trainer.student, trainer.critic), before, strict=True):
            moved = [k for k, v in lora_state_dict(model).items() if ".lora_B." in k and v.abs().max() > 0]
            assert len(moved) == len([k for k in start if ".lora_B." in k])  # every B left zero
            assert all(torch.count_nonzero(v) == 0 for k, v in start.items() if ".lora_B." in k)
    assert [m["sequence"] for m in runs] == [0, 0, 0, 1]  # stage 2 continues a sequence for 3 steps
    assert [m["frames"] for m in runs] == [6, 12, 18, 6]
    assert stage2.switch_step(0) is not None and [m["switched"] for m in runs[:3]] == [
        int(p >= stage2.switch_step(0)) for p in range(3)
    ]
    assert sum(m["switched"] for m in runs[:3]) >= 1  # one switch (KV-recache) in the sequence


def test_the_student_s_gradient_is_zero_while_its_critic_is_the_teacher_without_cfg(tmp_path):
    trainer = DMDTrainer.from_config(tiny_config(tmp_path, guidance_scale=1.0), "cpu")
    assert trainer.train_step()["generator_grad_norm"] == 0.0  # the critic starts as a copy of the teacher
    control = DMDTrainer.from_config(tiny_config(tmp_path), "cpu")  # CFG 3 on the teacher
    assert control.train_step()["generator_grad_norm"] > 0.0


def test_a_saved_checkpoint_loads_into_the_inference_pipeline(tmp_path):
    trainer = DMDTrainer.from_config(tiny_config(tmp_path, lr=3e-2), "cpu")
    for _ in range(3):
        trainer.train_step()
    checkpoint = trainer.save(tmp_path / "checkpoint")
    pipe = LongLivePipeline.from_pretrained("tiny-random", device="cpu")
    request = dict(prompt=PROMPTS[0], seconds=1.5, seed=2, size=(48, 32))
    before = pipe(**request)
    assert pipe.load_lora_weights(checkpoint / "models" / "lora.pt") == 20
    after = pipe(**request)
    # The merged LoRA makes what the trained student (LoRA unmerged) makes ...
    unmerged = LongLivePipeline(trainer.student.eval(), pipe.text_encoder, pipe.vae, default_size=(48, 32))
    expected = unmerged(**request)
    assert np.abs(after.astype(int) - expected).max() <= 1
    # ... and not what the untrained model makes.
    assert np.abs(after.astype(int) - before).mean() > 1.0


def test_resuming_from_a_checkpoint_makes_the_step_an_uninterrupted_run_makes(tmp_path):
    """Checkpoint in the middle of a sequence (the live rollout saved), crash, resume: the next step is the
    one the uninterrupted run makes, bit for bit. Control: without the rollout the sequence restarts."""
    config = tiny_config(tmp_path)
    uninterrupted = DMDTrainer.from_config(config, "cpu")
    for _ in range(2):
        uninterrupted.train_step()
    checkpoint = uninterrupted.save(tmp_path / "step2")
    assert (checkpoint / rollout_file(0)).is_file()
    expected = uninterrupted.train_step()

    resumed = DMDTrainer.from_config(config, "cpu")
    resumed.load(checkpoint)
    got = resumed.train_step()
    assert {k: v for k, v in got.items() if k != "step_seconds"} == {
        k: v for k, v in expected.items() if k != "step_seconds"
    }
    for model_a, model_b in (
        (resumed.student, uninterrupted.student),
        (resumed.critic, uninterrupted.critic),
    ):
        state_a, state_b = lora_state_dict(model_a), lora_state_dict(model_b)
        for (key, a), b in zip(state_a.items(), state_b.values(), strict=True):
            assert torch.equal(a, b), key

    shutil.rmtree(checkpoint / "rollout")
    restarted = DMDTrainer.from_config(config, "cpu")
    restarted.load(checkpoint)
    other = restarted.train_step()
    assert other["generator_loss"] != expected["generator_loss"]


def test_bad_training_configs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="step_blocks"):
        tiny_config(tmp_path, step_blocks=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_config(tmp_path, guidance_scale=0.5)
    with pytest.raises(ValueError, match="unknown training preset"):
        TrainingConfig.from_name("stage-3")
    with pytest.raises(ValueError, match="no such file"):
        DMDTrainer.from_config(tiny_config(tmp_path, prompts=str(tmp_path / "missing.txt")), "cpu")
