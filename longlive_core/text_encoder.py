"""The text encoder: Wan2.1's umT5-XXL encoder behind a prompt -> embedding LRU cache.

encode(prompt) = clean -> tokenize (</s> appended, truncated and padded to text_len, attention mask)
-> encoder -> cut to the real token count. The engine zero-pads the cut embedding back to text_len,
as the reference does (Wan's `T5EncoderModel.__call__` returns `u[:seq_len]`).

Weights come from a diffusers repo (`text_encoder/` + `tokenizer/`), from Wan's original
`models_t5_umt5-xxl-enc-bf16.pth` (its own key names, mapped by `wan_key_table`), or, for the
`tiny-random` model, from a seeded generator with a tokenizer built in code (no files at all).
transformers is imported lazily: the rest of longlive_core does not need it.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .offload import HostOffload
from .quantization import quantize_linears

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # umT5's special tokens; ids 0, 1, 2 in its vocab and ours


@dataclass(frozen=True)
class TextEncoderConfig:
    """Architecture of a umT5 encoder. Field names follow transformers' UMT5Config."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # gelu_new = tanh GELU, as Wan's own GELU

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"relative_attention_num_buckets must be >= 4, got {self.relative_attention_num_buckets}"
            )

    @classmethod
    def from_name(cls, name: str) -> TextEncoderConfig:
        if name not in TEXT_ENCODER_PRESETS:
            raise ValueError(
                f"unknown text encoder preset {name!r}; known presets: {sorted(TEXT_ENCODER_PRESETS)}"
            )
        return cls(**TEXT_ENCODER_PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_umt5(self) -> UMT5Config:
        from transformers import UMT5Config

        # No dropout: this encoder only runs inference.
        return UMT5Config(**self.to_dict(), dropout_rate=0.0, pad_token_id=0, eos_token_id=1)


TEXT_ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # google/umt5-xxl encoder = Wan's `umt5_xxl` (dim 4096, dim_attn 64 x 64, dim_ffn 10240, 64 heads,
    # 24 layers, 32 buckets, max_dist 128, shared_pos=False): 5.7B parameters.
    "umt5-xxl": {},
    # Width 32 to match the `tiny` DiT's text_dim; vocab = 3 specials + 256 bytes (tiny_tokenizer).
    "tiny": dict(vocab_size=259, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2),
}


# -- Wan's original checkpoint layout -------------------------------------------------------------------
# Wan's T5Encoder (wan/modules/t5.py) key -> transformers UMT5EncoderModel key. umT5 has a relative
# position bias in every layer (Wan: shared_pos=False), so each block carries its own pos_embedding.
WAN_TOP_KEYS: dict[str, str] = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
WAN_BLOCK_KEYS: dict[str, str] = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan: fc2(fc1(x) * gelu(gate(x))); transformers: wo(gelu(wi_0(x)) * wi_1(x)). The GELU branch is wi_0.
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"  # transformers' alias of shared.weight


def config_from_wan_state_dict(state_dict: dict[str, Tensor]) -> TextEncoderConfig:
    """The architecture of a Wan-layout checkpoint, read off its tensor shapes (max distance: 128)."""
    vocab_size, d_model = state_dict["token_embedding.weight"].shape
    buckets, heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    return TextEncoderConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=state_dict["blocks.0.attn.q.weight"].shape[0] // heads,
        d_ff=state_dict["blocks.0.ffn.fc1.weight"].shape[0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


def wan_key_table(num_layers: int) -> dict[str, str]:
    """Every key of Wan's T5 encoder checkpoint -> its transformers UMT5EncoderModel key."""
    table = dict(WAN_TOP_KEYS)
    for i in range(num_layers):
        for wan, hf in WAN_BLOCK_KEYS.items():
            table[f"blocks.{i}.{wan}"] = f"encoder.block.{i}.{hf}"
    return table


def wan_to_transformers(state_dict: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Wan's original keys -> transformers keys (with the tied embedding alias). Exact key set required."""
    table = wan_key_table(num_layers)
    missing = sorted(set(table) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(table))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match Wan's umT5 encoder with {num_layers} layers: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    out = {table[k]: v for k, v in state_dict.items()}
    out[TIED_EMBEDDING_KEY] = out["shared.weight"]  # a strict load wants both names (re-tie after assign)
    return out


def transformers_to_wan(state_dict: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """transformers UMT5EncoderModel keys -> Wan's original keys (the inverse of `wan_to_transformers`)."""
    inverse = {hf: wan for wan, hf in wan_key_table(num_layers).items()}
    state_dict = {k: v for k, v in state_dict.items() if k != TIED_EMBEDDING_KEY}
    missing = sorted(set(inverse) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(inverse))
    if missing or unexpected:
        raise ValueError(
            f"state_dict is not a {num_layers}-layer UMT5EncoderModel: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    return {inverse[k]: v for k, v in state_dict.items()}


# -- prompt cleaning and the built-in tokenizer ------------------------------------------------------------
try:  # Wan runs ftfy.fix_text first; it only repairs mojibake, so it stays optional here.
    from ftfy import fix_text as _fix_text
except ImportError:  # pragma: no cover - depends on the environment

    def _fix_text(text: str) -> str:
        return text


def clean_prompt(prompt: str) -> str:
    """Wan's `clean='whitespace'`: fix text, unescape HTML twice, collapse whitespace, strip."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    text = html.unescape(html.unescape(_fix_text(prompt))).strip()
    return re.sub(r"\s+", " ", text).strip()


def tiny_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in code: <pad>=0, </s>=1, <unk>=2, then the 256 bytes; </s> appended.

    Every byte is a token, so any two different prompts tokenize differently.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # ByteLevel.alphabet() comes from a hash set: sort it so the ids are the same in every process.
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    tok.add_special_tokens([PAD, EOS, UNK])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=model_max_length
    )


@torch.no_grad()
def init_random_weights(model: UMT5EncoderModel, seed: int = 0) -> UMT5EncoderModel:
    """Seeded weights under which every part matters (norm gains != 1, relative bias of order 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # named_parameters skips the tied embedding alias
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("layer_norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name == "shared.weight" or "relative_attention_bias" in name:
            value = noise
        else:  # Linear [out, in]
            value = noise / math.sqrt(p.shape[1])
        p.copy_(value)
    return model


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _require_tokenizer(tok_dir: Path) -> Path:
    files = ("tokenizer.json", "spiece.model")
    if not any((_require(tok_dir, "tokenizer directory") / f).exists() for f in files):
        raise FileNotFoundError(f"tokenizer files not found: none of {list(files)} in {tok_dir}")
    return tok_dir


class TextEncoder:
    """Prompt -> umT5 embedding [tokens, d_model], tokens <= text_len, with an LRU cache by cleaned prompt.

    Cached tensors are returned as they are (no copy): callers must not modify them in place.
    """

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        text_len: int = 512,
        cache_size: int = 64,
    ):
        if text_len < 2:
            raise ValueError(f"text_len must be >= 2 (at least one token and </s>), got {text_len}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer must have a pad token")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._offload: HostOffload | None = None

    @property
    def device(self) -> torch.device:
        """Where prompts are encoded and embeddings returned (also when the weights wait on the host)."""
        return self._offload.device if self._offload is not None else self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move (and/or cast) the encoder in place; drops the cache, whose tensors live on the old device."""
        self._offload = None
        self.model.to(device=device, dtype=dtype)
        self._cache.clear()
        return self

    def offload(self, device: str | torch.device) -> TextEncoder:
        """Low-memory mode: weights wait in pinned host memory and visit `device` only to encode a batch
        of new prompts (umT5-XXL: 11 GB in bf16, copied in well under a second), the token embedding and
        each block one at a time, while it runs: the device holds the largest of them (umT5-XXL's 2.1 GB
        embedding), not all 11 GB. Embeddings are returned on `device`."""
        self._cache.clear()
        encoder = self.model.encoder
        self._offload = HostOffload(self.model, device, parts=[encoder.embed_tokens, *encoder.block])
        return self

    def quantize(self, mode: str = "int8_weight_only", emulation: bool = False) -> TextEncoder:
        """INT8 weights for every linear of the encoder, in place (`quantization.quantize_linears`):
        umT5-XXL's 11.4 GB in bf16 become about 6.7 GB (its 2.1 GB token embedding, a lookup, stays bf16).
        mode: int8_weight_only (bf16 activations) or int8 (dynamic W8A8). Drops the cache, whose
        embeddings came from the unquantized weights. Call it before `offload`; do not cast the encoder
        afterwards."""
        if mode not in ("int8_weight_only", "int8"):
            raise ValueError(f"text encoder mode must be 'int8_weight_only' or 'int8', got {mode!r}")
        if self._offload is not None:
            raise ValueError("quantize the text encoder before offload(): its weights now wait on the host")
        quantize_linears(self.model.encoder, mode, emulation)
        self._cache.clear()
        return self

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = 512,
        cache_size: int = 64,
    ) -> TextEncoder:
        """A diffusers-format repo directory: `text_encoder/` (config + safetensors) and `tokenizer/`."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = _require(Path(path), "model directory")
        enc_dir = _require(root / "text_encoder", "text encoder directory")
        _require(enc_dir / "config.json", "text encoder config")
        weights = ("model.safetensors", "model.safetensors.index.json")
        if not any((enc_dir / w).exists() for w in weights):
            raise FileNotFoundError(f"text encoder weights not found: none of {list(weights)} in {enc_dir}")
        tok_dir = _require_tokenizer(root / "tokenizer")

        model = UMT5EncoderModel.from_pretrained(enc_dir, dtype=dtype)
        # transformers keeps `wo` in fp32; Wan runs the whole encoder in one dtype: match the reference.
        model = model.to(device=device, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(tok_dir), text_len, cache_size)

    @classmethod
    def from_original(
        cls,
        pth_path: str | Path,
        tokenizer_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        config: TextEncoderConfig | str | None = None,
        text_len: int = 512,
        cache_size: int = 64,
    ) -> TextEncoder:
        """Wan's `models_t5_umt5-xxl-enc-bf16.pth` (Wan's key names) + a tokenizer dir (google/umt5-xxl).

        config: a preset name or config; None reads the architecture off the checkpoint's shapes.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        pth = _require(Path(pth_path), "text encoder checkpoint")
        tok_dir = _require_tokenizer(Path(tokenizer_dir))

        # Build on meta, then assign the checkpoint's tensors (mmap'd): no 5.7B random init, no double copy.
        try:
            state = torch.load(pth, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # a legacy (non-zip) torch.save file cannot be mmap'd
            state = torch.load(pth, map_location="cpu", weights_only=True)
        if config is None:
            cfg = config_from_wan_state_dict(state)
        else:
            cfg = TextEncoderConfig.from_name(config) if isinstance(config, str) else config
        try:
            state = wan_to_transformers(state, cfg.num_layers)
        except ValueError as err:
            raise ValueError(f"pth_path {pth} does not fit config {cfg}: {err}") from err
        with torch.device("meta"):
            model = UMT5EncoderModel(cfg.to_umt5())
        model.load_state_dict(state, strict=True, assign=True)
        model.set_input_embeddings(model.shared)  # assign gave the two names two Parameters: re-tie
        model = model.to(device=device, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(tok_dir), text_len, cache_size)

    @classmethod
    def tiny_random(
        cls,
        d_model: int = 32,
        seed: int = 0,
        text_len: int = 512,
        cache_size: int = 64,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        """The `tiny-random` model's encoder: 2 layers, 2 heads, seeded weights, byte tokenizer, no files."""
        from transformers import UMT5EncoderModel

        if d_model < 2 or d_model % 2:
            raise ValueError(f"d_model must be even and >= 2 (2 heads), got {d_model}")
        base = TEXT_ENCODER_PRESETS["tiny"]
        cfg = TextEncoderConfig(**{**base, "d_model": d_model, "d_kv": d_model // 2, "d_ff": 2 * d_model})
        model = init_random_weights(UMT5EncoderModel(cfg.to_umt5()), seed)
        return cls(model.to(device=device, dtype=dtype), tiny_tokenizer(text_len), text_len, cache_size)

    # -- encoding ------------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> Tensor:
        """[tokens, d_model] in the model's dtype and device; tokens = real token count incl. </s>."""
        return self.encode_many([prompt])[0]

    def encode_many(self, prompts: Sequence[str]) -> list[Tensor]:
        """One embedding per prompt; the uncached ones run as one batch."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, not a single string")
        texts = [clean_prompt(p) for p in prompts]
        if any(not t for t in texts):
            raise ValueError("prompt must not be empty")

        # 1. Cache lookup (a hit becomes the most recently used entry).
        found: dict[str, Tensor] = {}
        for text in texts:
            if text in self._cache:
                self._cache.move_to_end(text)
                found[text] = self._cache[text]
        todo = list(dict.fromkeys(t for t in texts if t not in found))

        # 2. Encode the misses in one batch, then insert them, evicting the least recently used.
        if todo:
            found.update(zip(todo, self._run(todo), strict=True))
            for text in todo:
                self._cache[text] = found[text]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return [found[t] for t in texts]

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def _run(self, texts: list[str]) -> list[Tensor]:
        # 1. Tokenize as Wan does: </s> appended, truncated to text_len (</s> kept), padded with a mask.
        for text in texts:
            self._warn_if_truncated(text)
        batch = self.tokenizer(
            texts,
            add_special_tokens=True,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            return_tensors="pt",
        )
        lengths = batch.attention_mask.sum(dim=1).tolist()  # on the host: no device sync

        # 2. Encode [B, text_len] -> [B, text_len, d_model]. Padding keys are masked out, so the real
        # rows do not depend on how much padding there is.
        device = self.device
        with self._weights_on_device() as model:
            hidden = model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
            ).last_hidden_state

        # 3. Cut each row to its real tokens; clone so the cache does not keep the padded batch alive.
        return [h[:n].to(self.dtype).clone() for h, n in zip(hidden, lengths, strict=True)]

    @contextmanager
    def _weights_on_device(self) -> Iterator[UMT5EncoderModel]:
        if self._offload is None:
            yield self.model
        else:
            with self._offload.on_device() as model:
                yield model

    def _warn_if_truncated(self, text: str) -> None:
        n = len(self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        if n > self.text_len:
            logger.warning(
                "prompt has %d tokens, more than text_len=%d: dropped the last %d tokens (prompt starts %r)",
                n,
                self.text_len,
                n - self.text_len,
                text[:60],
            )
