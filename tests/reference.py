"""An uncached, explicitly masked float64 reference of LongLive generation, for the tests.

Written independently of `longlive_core`'s cache code: no slots, no ring, no planner. Every computed
version of every latent frame is kept as a *group* of token rows with its own input, timestep,
prompt and the list of groups it may attend to, taken from docs/DESIGN.md section 2's table in frame
terms. Each pass re-runs the whole history in one masked forward (float64, own RoPE with complex
numbers, own norms), reading only the model's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from longlive_core.config import GenerationConfig
from longlive_core.models.transformer_causal_wan import CausalWanTransformer
from longlive_core.noise import block_noise


@dataclass
class Group:
    frame: int  # latent frame index
    latent: Tensor  # [C, H, W] float64 input of this version
    t: float  # timestep
    prompt: int  # index into the prompt list
    visible: list[int]  # ids of the groups its queries attend to (itself included)
    pass_end: int  # newest frame + 1 of the pass that computed it (relative RoPE window)
    sink_slot: int | None  # position inside the sink, if this version is a sink frame


@dataclass
class ReferenceOutput:
    flow: list[Tensor]  # per group [C, H, W]
    keys: list[list[Tensor]]  # per layer, per group [tokens, H, D] (un-rotated)
    values: list[list[Tensor]]


class MaskedReference:
    """float64 masked forward over groups, using the weights of a CausalWanTransformer."""

    def __init__(self, model: CausalWanTransformer, config: GenerationConfig, prompts: list[Tensor]):
        self.c = model.config
        self.gen = config
        self.w = {k: v.detach().double() for k, v in model.state_dict().items()}
        self.ctx = [self._context(p) for p in prompts]

    # -- pieces ------------------------------------------------------------------------------------
    def _lin(self, x: Tensor, name: str) -> Tensor:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _rms(self, x: Tensor, name: str) -> Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.c.eps) * self.w[name + ".weight"]

    def _ln(self, x: Tensor, affine: str | None = None) -> Tensor:
        if affine is None:
            return F.layer_norm(x, (self.c.dim,), eps=self.c.eps)
        return F.layer_norm(
            x, (self.c.dim,), self.w[affine + ".weight"], self.w[affine + ".bias"], self.c.eps
        )

    def _context(self, prompt: Tensor) -> Tensor:
        padded = torch.zeros(self.c.text_len, self.c.text_dim, dtype=torch.float64)
        padded[: prompt.shape[0]] = prompt.double()
        h = F.gelu(self._lin(padded, "text_embedding.0"), approximate="tanh")
        return self._lin(h, "text_embedding.2")

    def _time(self, t: float) -> tuple[Tensor, Tensor]:
        half = self.c.freq_dim // 2
        freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        sinusoid = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
        e = self._lin(F.silu(self._lin(sinusoid, "time_embedding.0")), "time_embedding.2")
        e0 = self._lin(F.silu(e), "time_projection.1").view(6, -1)
        return e, e0

    def _rotate(self, x: Tensor, t_pos: int, grid: tuple[int, int]) -> Tensor:
        """RoPE of one frame's tokens x [h*w, H, D] at temporal position t_pos, via complex numbers."""
        h, w = grid
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        axis_positions = (torch.full((h, w), t_pos), hh, ww)
        angle_parts = []
        for d, positions in zip(self.c.rope_dims, axis_positions, strict=True):
            inv = 1.0 / self.c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            angle_parts.append(positions.reshape(-1, 1).double() * inv)
        angles = torch.cat(angle_parts, dim=1)  # [h*w, D/2]
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)

    def _query_pos(self, g: Group) -> int:
        if self.gen.rope_mode == "absolute":
            return g.frame
        return g.frame - max(0, g.pass_end - self.gen.window_frames)

    def _key_pos(self, query: Group, key: Group) -> int:
        if self.gen.rope_mode == "absolute":
            return key.frame
        if key.sink_slot is not None:
            return key.sink_slot
        return key.frame - max(0, query.pass_end - self.gen.window_frames)

    # -- the forward -------------------------------------------------------------------------------
    def forward(self, groups: list[Group]) -> ReferenceOutput:
        c, w = self.c, self.w
        pt, ph, pw = c.patch_size
        heads, hd = c.num_heads, c.head_dim
        x, grid = [], None
        for g in groups:
            patches = F.conv3d(
                g.latent[None, :, None],
                w["patch_embedding.weight"],
                w["patch_embedding.bias"],
                stride=(pt, ph, pw),
            )
            grid = tuple(patches.shape[3:])
            x.append(patches.flatten(2)[0].T)  # [tokens, dim]
        times = [self._time(g.t) for g in groups]
        keys_out, values_out = [], []
        for i in range(c.num_layers):
            p = f"blocks.{i}."
            mods = [w[p + "modulation"][0] + e0 for _, e0 in times]
            # Self-attention: every group's q, k, v, then each query group over its visible groups.
            hs = [self._ln(xg) * (1 + m[1]) + m[0] for xg, m in zip(x, mods, strict=True)]
            qs = [
                self._rms(self._lin(h, p + "self_attn.q"), p + "self_attn.norm_q").view(-1, heads, hd)
                for h in hs
            ]
            ks = [
                self._rms(self._lin(h, p + "self_attn.k"), p + "self_attn.norm_k").view(-1, heads, hd)
                for h in hs
            ]
            vs = [self._lin(h, p + "self_attn.v").view(-1, heads, hd) for h in hs]
            keys_out.append(ks)
            values_out.append(vs)
            new_x = []
            for gi, g in enumerate(groups):
                q = self._rotate(qs[gi], self._query_pos(g), grid)
                k = torch.cat([self._rotate(ks[j], self._key_pos(g, groups[j]), grid) for j in g.visible])
                v = torch.cat([vs[j] for j in g.visible])
                attn = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), dim=-1)
                out = self._lin(torch.einsum("hqk,khd->qhd", attn, v).reshape(-1, c.dim), p + "self_attn.o")
                new_x.append(x[gi] + out * mods[gi][2])
            x = new_x
            # Cross-attention to each group's own prompt, then the feed-forward.
            for gi, g in enumerate(groups):
                ctx = self.ctx[g.prompt]
                q = self._rms(
                    self._lin(self._ln(x[gi], p + "norm3"), p + "cross_attn.q"), p + "cross_attn.norm_q"
                )
                k = self._rms(self._lin(ctx, p + "cross_attn.k"), p + "cross_attn.norm_k")
                v = self._lin(ctx, p + "cross_attn.v")
                q, k, v = (a.view(-1, heads, hd) for a in (q, k, v))
                attn = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), dim=-1)
                x[gi] = x[gi] + self._lin(
                    torch.einsum("hqk,khd->qhd", attn, v).reshape(-1, c.dim), p + "cross_attn.o"
                )
                m = mods[gi]
                h = self._ln(x[gi]) * (1 + m[4]) + m[3]
                x[gi] = (
                    x[gi]
                    + self._lin(F.gelu(self._lin(h, p + "ffn.0"), approximate="tanh"), p + "ffn.2") * m[5]
                )
        flows = []
        gh, gw = grid
        for gi, (e, _) in enumerate(times):
            m = w["head.modulation"][0] + e
            out = self._lin(self._ln(x[gi]) * (1 + m[1]) + m[0], "head.head")  # [tokens, ph*pw*C]
            out = out.view(gh, gw, ph, pw, -1).permute(4, 0, 2, 1, 3).reshape(-1, gh * ph, gw * pw)
            flows.append(out)
        return ReferenceOutput(flows, keys_out, values_out)


@dataclass
class ReferenceGenerator:
    """LongLive generation re-derived from docs/DESIGN.md's table, one masked reference forward per pass.

    `visible_fn` (optional) replaces the block visibility rule: the negative controls use it.
    """

    model: CausalWanTransformer
    config: GenerationConfig
    prompts: list[Tensor]
    seed: int
    latent_size: tuple[int, int]
    visible_fn: object = None
    groups: list[Group] = field(default_factory=list)
    current: dict[int, int] = field(default_factory=dict)  # frame -> group id of its committed version
    clean: dict[int, Tensor] = field(default_factory=dict)  # frame -> clean latent [C, H, W]
    sink: list[int] = field(default_factory=list)  # frames forming the sink
    prompt: int = 0
    blocks_done: int = 0

    def __post_init__(self) -> None:
        self.ref = MaskedReference(self.model, self.config, self.prompts)
        t_max = self.config.num_train_timesteps
        shift = self.config.shift
        sig = [s / t_max for s in self.config.denoising_steps]
        self.sigmas = [shift * s / (1 + (shift - 1) * s) for s in sig]

    @property
    def committed(self) -> int:
        return self.blocks_done * self.config.block_frames

    def _block_visible_frames(self, n: int) -> list[int]:
        """DESIGN: the sink + the last (window - sink - block) committed frames."""
        cfg = self.config
        recent = range(max(0, n - (cfg.window_frames - cfg.sink_frames - cfg.block_frames)), n)
        return sorted({f for f in self.sink if f < n} | set(recent))

    def next_block(self) -> Tensor:
        cfg = self.config
        n, blk = self.committed, self.blocks_done
        frames = list(range(n, n + cfg.block_frames))
        if n == 0:
            self.sink = frames[: cfg.sink_frames]
        elif len(self.sink) < cfg.sink_frames:
            self.sink += frames[: cfg.sink_frames - len(self.sink)]
        visible_frames = (self.visible_fn or self._block_visible_frames)(n)
        base = [self.current[f] for f in visible_frames]
        shape = (self.model.config.in_dim, cfg.block_frames, *self.latent_size)
        x = block_noise(self.seed, blk, 0, shape).double()

        def run(latents: Tensor, t: float, permanent: bool) -> Tensor:
            start = len(self.groups)
            ids = list(range(start, start + len(frames)))
            new = [
                Group(
                    f,
                    latents[:, i],
                    t,
                    self.prompt,
                    base + ids,
                    n + cfg.block_frames,
                    self.sink.index(f) if f in self.sink else None,
                )
                for i, f in enumerate(frames)
            ]
            out = self.ref.forward(self.groups + new)
            if permanent:
                self.groups.extend(new)
                for f, gid in zip(frames, ids, strict=True):
                    self.current[f] = gid
            return torch.stack(out.flow[start:], dim=1)

        for i, sigma in enumerate(self.sigmas):
            timestep = sigma * cfg.num_train_timesteps
            x0 = x - sigma * run(x, timestep, permanent=False)
            if i + 1 < len(self.sigmas):
                nxt = self.sigmas[i + 1]
                x = (1 - nxt) * x0 + nxt * block_noise(self.seed, blk, i + 1, shape).double()
        run(x0, 0.0, permanent=True)
        for i, f in enumerate(frames):
            self.clean[f] = x0[:, i]
        self.blocks_done += 1
        return x0

    def switch_prompt(self, prompt: int) -> None:
        """Set the prompt and recache exactly as DESIGN's table says."""
        cfg = self.config
        self.prompt = prompt
        n = self.committed
        if n == 0 or cfg.recache == "off":
            return
        if not cfg.global_sink:
            frames = list(range(max(0, n - cfg.window_frames), n))
            self.sink = frames[: cfg.sink_frames]
            kept = []
        elif n > cfg.window_frames:
            frames = list(range(n - (cfg.window_frames - cfg.sink_frames), n))
            kept = [self.current[f] for f in self.sink]
        else:
            frames = list(range(n))
            kept = []
        start = len(self.groups)
        ids = dict(zip(frames, range(start, start + len(frames)), strict=True))
        for f in frames:
            if cfg.recache == "block_causal":
                mine = [ids[o] for o in frames if o // cfg.block_frames <= f // cfg.block_frames]
            else:
                mine = list(ids.values())
            self.groups.append(
                Group(
                    f,
                    self.clean[f],
                    0.0,
                    prompt,
                    kept + mine,
                    n,
                    self.sink.index(f) if f in self.sink else None,
                )
            )
        for f in frames:
            self.current[f] = ids[f]

    def committed_kv(self, frame: int) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer K (rotated at the frame's absolute position) and V of a frame's current version."""
        out = self.ref.forward(self.groups)
        gid = self.current[frame]
        ph, pw = self.model.config.patch_size[1:]
        grid = (self.latent_size[0] // ph, self.latent_size[1] // pw)
        keys = [self.ref._rotate(layer[gid], frame, grid) for layer in out.keys]
        return keys, [layer[gid] for layer in out.values]
