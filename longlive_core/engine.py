"""The engine: many sessions, one block step at a time, batched into one forward per pass.

step() = schedule -> execute -> update. The scheduler (torch-free) decides; the engine turns its
plans into tensors and runs the model. No host syncs inside a step: every index, mask and position
comes from host-side plans, never read back from the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .cache_plan import PassPlan, PassShape, attention_shape
from .config import GenerationConfig, RuntimeConfig
from .kv_cache import KVCache
from .models.transformer_causal_wan import (
    CausalWanTransformer,
    RopeTables,
    SelfAttentionCache,
    rope_tables,
)
from .noise import block_noise
from .runtime import attention_backend, prepare
from .sampler import FlowMatchSampler
from .scheduler import BlockWork, RecacheWork, RestoreWork, Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


def to_device(data: Tensor | list, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Host data -> device without blocking the host: a copy from pageable memory would wait for all
    queued GPU work, so CUDA copies go through pinned memory."""
    host = data if isinstance(data, Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def padded_prompt(model: CausalWanTransformer, prompt_embeds: Tensor) -> Tensor:
    """[tokens, text_dim] or [1, tokens, text_dim] -> [1, text_len, text_dim], zero-padded (as Wan), on the
    model's device and in its dtype; ValueError naming the argument when the shape does not fit."""
    mc = model.config
    if prompt_embeds.ndim == 3 and prompt_embeds.shape[0] == 1:
        prompt_embeds = prompt_embeds[0]
    if prompt_embeds.ndim != 2 or prompt_embeds.shape[1] != mc.text_dim:
        raise ValueError(
            f"prompt_embeds must have shape [tokens, {mc.text_dim}], got {tuple(prompt_embeds.shape)}"
        )
    tokens = prompt_embeds.shape[0]
    if not 0 < tokens <= mc.text_len:
        raise ValueError(f"prompt_embeds must have 1..{mc.text_len} tokens, got {tokens}")
    padded = torch.zeros(1, mc.text_len, mc.text_dim, device=model.device, dtype=model.dtype)
    padded[0, :tokens] = prompt_embeds.to(padded)
    return padded


@dataclass(frozen=True)
class RestoreInputs:
    recent: Tensor  # [C, F, H, W] the last clean latent frames
    sink: tuple[Tensor, Tensor] | None  # (prompt context input, latents [C, S, H, W]) of the sink pass


class Engine:
    """Generates latent blocks for up to `max_sessions` concurrent sessions of one latent size.

    latent_size: (height, width) of the latent frames (480x832 video -> 60x104).
    model is left as it is: the runtime's quantization and compilation apply to the engine's own copy of
    its modules (`runtime.prepare`; the parameters are shared).
    """

    def __init__(
        self,
        model: CausalWanTransformer,
        config: GenerationConfig,
        latent_size: tuple[int, int],
        max_sessions: int = 1,
        runtime: RuntimeConfig | None = None,
    ):
        self.runtime = runtime or RuntimeConfig()
        self.model = prepare(model, self.runtime)
        self.config = config
        self.sampler = FlowMatchSampler(config)
        mc = model.config
        self.grid = model.patch_grid(*latent_size)
        self.latent_size = latent_size
        self.tokens_per_frame = self.grid[0] * self.grid[1]
        self.scheduler = Scheduler(config, max_sessions, mc.rope_max_positions)
        self.cache = KVCache(mc, config, max_sessions, self.tokens_per_frame, model.device, model.dtype)
        # Clean latents of each session's last `window_frames` frames (frame j at j % window): the
        # input of a recache pass.
        self.history = torch.zeros(
            max_sessions, config.window_frames, mc.in_dim, *latent_size, device=model.device
        )
        self.prompts: dict[str, Tensor] = {}  # latest prompt embedding per session, padded
        self._restoring: dict[str, RestoreInputs] = {}  # moved sessions until their cache is rebuilt
        self.shapes_seen: set[PassShape] = set()  # pass shapes run so far (compiled ones: each a graph)
        self.last_schedule = SchedulerOutput()  # what the last step did (joins, recaches, blocks)

    # -- requests ----------------------------------------------------------------------------------
    def add_session(
        self,
        session_id: str,
        prompt_embeds: Tensor,
        seed: int = 0,
        num_blocks: int | None = None,
        first_frame: int = 0,
    ) -> None:
        """Queue a session; it joins at the next step with a free slot.

        first_frame: the absolute latent frame index the session starts at (absolute RoPE only).
        """
        prompt = padded_prompt(self.model, prompt_embeds)
        self.scheduler.add_session(session_id, seed, num_blocks, first_frame)
        self.prompts[session_id] = prompt

    def restore_session(
        self,
        session_id: str,
        prompt_embeds: Tensor,
        seed: int,
        blocks_done: int,
        recent_latents: Tensor,
        sink_prompt_embeds: Tensor | None = None,
        sink_latents: Tensor | None = None,
        num_blocks: int | None = None,
    ) -> None:
        """Queue a session that ran `blocks_done` blocks elsewhere; its cache is rebuilt from clean latents
        when it joins (one recache pass, plus a sink pass once the window has slid), and it continues at
        block `blocks_done` with the same noise it would have drawn there.

        recent_latents: [C, F, H, W], its last F = min(committed, window_frames) clean latent frames.
        sink_prompt_embeds, sink_latents [C, S, H, W]: the prompt and frames 0..S-1 of the pass that last
        wrote the sink (needed once committed frames exceed the window, with a global sink).
        """
        cfg = self.config
        committed = blocks_done * cfg.block_frames
        if blocks_done < 1:
            raise ValueError(f"blocks_done must be >= 1 to restore, got {blocks_done}")
        frames = min(committed, cfg.window_frames)
        expected = (self.model.config.in_dim, frames, *self.latent_size)
        if tuple(recent_latents.shape) != expected:
            raise ValueError(f"recent_latents must have shape {expected}, got {tuple(recent_latents.shape)}")
        needs_sink = cfg.global_sink and committed > cfg.window_frames
        sink = None
        if needs_sink:
            if sink_prompt_embeds is None or sink_latents is None:
                raise ValueError("restoring after the window slid needs the sink's prompt and latents")
            sink = (padded_prompt(self.model, sink_prompt_embeds), sink_latents.to(self.model.device))
        prompt = padded_prompt(self.model, prompt_embeds)
        self.scheduler.add_session(
            session_id,
            seed,
            num_blocks,
            restore_blocks=blocks_done,
            sink_frames=sink_latents.shape[1] if needs_sink else None,
        )
        self.prompts[session_id] = prompt
        self._restoring[session_id] = RestoreInputs(recent_latents.to(self.model.device), sink)

    def set_prompt(self, session_id: str, prompt_embeds: Tensor) -> None:
        """New prompt for a session: applied by KV-recache before its next block."""
        prompt = padded_prompt(self.model, prompt_embeds)
        self.scheduler.set_prompt(session_id)
        self.prompts[session_id] = prompt

    def rewind_session(self, session_id: str, blocks_done: int, recent_latents: Tensor) -> None:
        """Take a running session back to after `blocks_done` blocks (the blocks made since are thrown
        away); call `set_prompt` next: its recache rebuilds the window from `recent_latents` [C, F, H, W],
        the clean latents of its last F = min(committed, window_frames) frames (blocks made later have
        overwritten them in the history). The sink stays: past a filled window no block writes it, and
        while the window fills the recache recomputes it. Between steps only."""
        cfg = self.config
        if cfg.recache == "off":
            raise ValueError("rewinding needs a recache pass to rebuild the window (recache is 'off')")
        made = self.scheduler.sessions[session_id].blocks_done if session_id in self.scheduler.sessions else 0
        if not 1 <= blocks_done <= made:
            raise ValueError(f"blocks_done must be in [1, {made}] for {session_id!r}, got {blocks_done}")
        committed = blocks_done * cfg.block_frames
        frames = min(committed, cfg.window_frames)
        expected = (self.model.config.in_dim, frames, *self.latent_size)
        if tuple(recent_latents.shape) != expected:
            raise ValueError(f"recent_latents must have shape {expected}, got {tuple(recent_latents.shape)}")
        self.scheduler.rewind(session_id, blocks_done)
        slot = self.scheduler.sessions[session_id].slot
        ring = [f % cfg.window_frames for f in range(committed - frames, committed)]
        self.history[slot, to_device(ring, self.model.device)] = recent_latents.transpose(0, 1).float()

    def remove_session(self, session_id: str) -> None:
        self.scheduler.remove_session(session_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, only: set[str] | None = None) -> dict[str, Tensor]:
        """One block for every running session (or for those in `only`, when their slots are contiguous):
        {session_id: latents [C, block_frames, H, W] float32}."""
        return self._step(exit_step=None, only=only)

    @torch.no_grad()
    def train_step(self, exit_step: int) -> dict[str, Tensor]:
        """One block for every running session as Self-Forcing trains it: the denoising loop stops at step
        `exit_step`, whose pass runs with autograd; its x0 is the block (returned with its graph). The
        cache is written from the detached x0 by the commit pass, so later blocks see it as a constant."""
        if not 0 <= exit_step < len(self.sampler):
            raise ValueError(f"exit_step must be in [0, {len(self.sampler)}), got {exit_step}")
        return self._step(exit_step)

    def _step(self, exit_step: int | None, only: set[str] | None = None) -> dict[str, Tensor]:
        out = self.scheduler.schedule(only)
        try:
            with attention_backend(self.runtime):
                blocks = self._execute(out, exit_step)
        except Exception:
            logger.exception("engine step failed; scheduler output: %s", out)
            raise
        self.scheduler.update(out)
        self.last_schedule = out
        return blocks

    # -- state (training checkpoints) --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a step reads: caches, clean-latent history, prompts and the scheduler. Tensors and
        plain data only (what `state_file.save_state` writes). Restoring it continues the sessions bit for
        bit."""
        if self._restoring:
            raise RuntimeError("sessions are waiting to be restored; step once before saving")
        return {
            "cache": [t.detach().cpu() for t in self.cache.tensors()],
            "history": self.history.cpu(),
            "prompts": {k: v.cpu() for k, v in self.prompts.items()},
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        # The scheduler first: a refused state leaves the engine as it was.
        scheduler = Scheduler.from_state_dict(
            self.config, self.scheduler.max_sessions, self.scheduler.max_positions, state["scheduler"]
        )
        tensors = self.cache.tensors()
        if len(state["cache"]) != len(tensors) or state["history"].shape != self.history.shape:
            raise ValueError("engine state is for another model, window or number of sessions")
        for dst, src in zip(tensors, state["cache"], strict=True):
            dst.copy_(src)
        self.history.copy_(state["history"])
        self.prompts = {k: v.to(self.model.device, self.model.dtype) for k, v in state["prompts"].items()}
        self.scheduler = scheduler
        self._restoring = {}

    def _execute(self, out: SchedulerOutput, exit_step: int | None = None) -> dict[str, Tensor]:
        # 1. Slot bookkeeping: compaction moves, freed sessions, new sessions' prompt context.
        for move in out.moves:
            self.cache.move_row(move.src, move.dst)
            self.history[move.dst].copy_(self.history[move.src])
        for session_id in out.finished_ids:
            self.prompts.pop(session_id, None)
            self._restoring.pop(session_id, None)
        for new in out.new_sessions:
            self.cache.set_context(new.slot, self.model.encode_context(self.prompts[new.session_id]))
        for work in out.restores:
            self._restore(work)
        # 2. Prompt switches: new cross-attention K/V, then the recache pass (one session at a time).
        for work in out.recaches:
            self._recache(work)
        # 3. One block for every running session, batched over slots 0..k-1.
        if not out.blocks:
            return {}
        return self._generate_blocks(out.blocks, exit_step)

    def _recache(self, work: RecacheWork) -> None:
        self.cache.set_context(work.slot, self.model.encode_context(self.prompts[work.session_id]))
        if work.plan is not None:
            self._clean_pass(work.slot, work.plan)

    def _restore(self, work: RestoreWork) -> None:
        inputs = self._restoring.pop(work.session_id)
        window = self.config.window_frames
        end = work.plan.query_frames[-1] + 1
        frames = range(end - inputs.recent.shape[1], end)
        self.history[work.slot, [f % window for f in frames]] = inputs.recent.transpose(0, 1).float()
        if work.sink_plan is not None:
            sink_prompt, sink_latents = inputs.sink
            self.cache.set_context(work.slot, self.model.encode_context(sink_prompt))
            self._clean_pass(work.slot, work.sink_plan, sink_latents[None])
            self.cache.set_context(work.slot, self.model.encode_context(self.prompts[work.session_id]))
        self._clean_pass(work.slot, work.plan)

    def _clean_pass(self, slot: int, plan: PassPlan, latents: Tensor | None = None) -> None:
        """A pass at t=0 over clean latent frames (default: the plan's frames from the history) that writes
        their K/V under the slot's current prompt context."""
        rows = slice(slot, slot + 1)
        if latents is None:
            frames = [f % self.config.window_frames for f in plan.query_frames]
            latents = self.history[rows, to_device(frames, self.model.device)].transpose(1, 2)  # [1,C,F,H,W]
        timestep = torch.zeros(1, latents.shape[2], device=self.model.device)
        rope, cache = self._pass_inputs([plan], rows)
        self.model(latents, timestep, self.cache.context(rows), rope, cache)

    def _generate_blocks(self, blocks: list[BlockWork], exit_step: int | None = None) -> dict[str, Tensor]:
        first = blocks[0].slot
        assert [w.slot for w in blocks] == list(range(first, first + len(blocks))), "slots must be contiguous"
        rows = slice(first, first + len(blocks))
        block_frames = self.config.block_frames
        shape = (self.model.config.in_dim, block_frames, *self.latent_size)
        device = self.model.device

        # Every step's noise in one copy: [steps, b, C, F, H, W].
        steps = range(len(self.sampler))
        noise = to_device(
            torch.stack(
                [torch.stack([block_noise(w.seed, w.block_index, s, shape) for w in blocks]) for s in steps]
            ),
            device,
        )

        rope, cache = self._pass_inputs([w.plan for w in blocks], rows)
        context = self.cache.context(rows)
        timestep = torch.empty(len(blocks), block_frames, device=device)
        # 1. Few-step denoising; every pass writes the block's current K/V into its slots. Training stops
        #    at exit_step and runs that pass with autograd (out of place: the commit pass writes the cache).
        last = len(self.sampler) - 1 if exit_step is None else exit_step
        x = noise[0]
        for i in range(last + 1):
            t, sigma = self.sampler.timesteps[i], self.sampler.sigmas[i]
            if i == exit_step:
                with torch.enable_grad():
                    step_cache = cache.for_autograd(snapshot=self.model.gradient_checkpointing)
                    # The prompt's K/V again, with their graph (the cached ones were made without).
                    prompts = torch.cat([self.prompts[w.session_id] for w in blocks])
                    step_context = self.model.encode_context(prompts)
                    flow = self.model(x, torch.full_like(timestep, t), step_context, rope, step_cache)
                    x0 = self.sampler.predict_x0(x, flow, sigma)
            else:
                flow = self.model(x, timestep.fill_(t), context, rope, cache)
                x0 = self.sampler.predict_x0(x, flow, sigma)
            if i < last:
                x = self.sampler.renoise(x0, noise[i + 1], self.sampler.sigmas[i + 1])
        # 2. Commit pass: the clean block at t=0 writes its final KV.
        self.model(x0.detach(), timestep.fill_(0.0), context, rope, cache)
        # 3. Keep the clean latents for a later recache.
        window = self.config.window_frames
        ring = to_device([[f % window for f in w.plan.query_frames] for w in blocks], device)  # [b, F]
        rows_index = torch.arange(first, first + len(blocks), device=device)[:, None]
        self.history[rows_index, ring] = x0.detach().transpose(1, 2)
        with torch.set_grad_enabled(exit_step is not None):  # a view made under no_grad loses the graph
            return {w.session_id: x0[i] for i, w in enumerate(blocks)}

    def _pass_inputs(self, plans: list[PassPlan], rows: slice) -> tuple[RopeTables, SelfAttentionCache]:
        """Query RoPE tables and the cache view (write index, key mask, key RoPE) for a batch of plans."""
        device = self.model.device
        tokens = self.tokens_per_frame
        window = self.config.window_frames
        query_positions = to_device([p.query_positions for p in plans], device)
        rope = rope_tables(self.model.config, query_positions, self.grid, device)
        # Flat token index into the rows' view [b * window * tokens]: (row, slot, token).
        slot_index = to_device([[b * window + s for s in p.write_slots] for b, p in enumerate(plans)], device)
        write_index = (slot_index[..., None] * tokens + torch.arange(tokens, device=device)).flatten()
        # Keys: while the window fills, the occupied slots are a prefix 0..m-1 of the cache; attend
        # to that prefix (a view) and no mask is needed. Otherwise mask per row / query frame.
        shape = attention_shape(plans)
        self.shapes_seen.add(shape)
        if shape.mask == "none":
            key_slots, key_mask = shape.key_frames, None
        else:
            key_slots = window
            visible = torch.zeros(len(plans), len(plans[0].query_frames), window, dtype=torch.bool)
            for b, p in enumerate(plans):
                for q, slots in enumerate(p.visible_slots):
                    visible[b, q, list(slots)] = True
            if all(len(set(p.visible_slots)) == 1 for p in plans):
                visible = visible[:, :1]  # the same keys for every query frame: broadcast
            else:
                visible = visible.repeat_interleave(tokens, 1)
            key_mask = to_device(visible.repeat_interleave(tokens, 2)[:, None], device)
        key_rope = None
        if self.config.rope_mode == "relative":
            slot_positions = to_device(
                [[max(pos, 0) for pos in p.slot_positions[:key_slots]] for p in plans], device
            )
            key_rope = rope_tables(self.model.config, slot_positions, self.grid, device)
        key_len = key_slots * tokens
        return rope, self.cache.self_attention(rows, write_index, key_len, key_mask, key_rope)
