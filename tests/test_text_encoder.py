"""The text encoder on tiny configs: recipe (cut, mask, truncation), cache, and both checkpoint layouts.

The Wan-layout check runs an independent re-statement of Wan's T5Encoder forward (wan/modules/t5.py)
on the converted weights, so a consistently wrong key table (e.g. gate/fc1 swapped both ways) fails.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import UMT5EncoderModel

from longlive_core.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    init_random_weights,
    tiny_tokenizer,
    transformers_to_wan,
    wan_key_table,
    wan_to_transformers,
)
from tests.helpers import rel_err

TINY = TextEncoderConfig.from_name("tiny")
# 141 bytes + </s>: relative distances past max_exact (8) and past max_distance (128) both occur.
LONG = "a red robot walks through a rainy neon city at night, reflections on the wet street, " * 2
LONG = LONG[:141]


def count_forwards(encoder: TextEncoder) -> list[int]:
    calls = [0]
    encoder.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def tiny_hf_model(seed: int) -> UMT5EncoderModel:
    return init_random_weights(UMT5EncoderModel(TINY.to_umt5()), seed).eval()


# -- an independent statement of Wan's T5Encoder forward (facts from wan/modules/t5.py) ---------------
def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _buckets(length: int, num_buckets: int, max_dist: int) -> torch.Tensor:
    # Bidirectional: half the buckets for keys after the query; exact below max_exact, log-spaced above.
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_dist / max_exact) * (half - max_exact)
    )
    large = large.long().clamp(max=half - 1)
    return out + torch.where(rel < max_exact, rel, large)


def wan_forward(sd: dict, cfg: TextEncoderConfig, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, length = ids.shape
    n, d = cfg.num_heads, cfg.d_kv
    x = sd["token_embedding.weight"][ids]
    bucket = _buckets(length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        # Attention: pre-norm, no 1/sqrt(d) scaling, per-layer relative bias, padded keys masked.
        h = _rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{c}.weight"]).view(b, length, n, d) for c in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias
        scores = scores.masked_fill(mask.view(b, 1, 1, length) == 0, torch.finfo(x.dtype).min)
        out = torch.einsum("bnij,bjnc->binc", scores.softmax(-1), v).reshape(b, length, n * d)
        x = x + F.linear(out, sd[p + "attn.o.weight"])
        # FFN: fc2(fc1(x) * gelu_tanh(gate(x))).
        h = _rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    return _rms(x, sd["norm.weight"])


# -- the tiny built-in encoder ----------------------------------------------------------------------------
def test_tiny_shape_is_cut_to_real_tokens():
    enc = TextEncoder.tiny_random()
    short, long = enc.encode("a cat"), enc.encode(LONG)
    assert short.shape == (6, 32) and short.dtype == torch.float32  # 5 bytes + </s>
    assert long.shape == (142, 32)
    assert enc.tokenizer("a cat")["input_ids"][-1] == enc.tokenizer.eos_token_id == 1


def test_tiny_is_deterministic_and_seeded():
    a, b = TextEncoder.tiny_random(seed=0), TextEncoder.tiny_random(seed=0)
    assert torch.equal(a.encode("a red cat"), b.encode("a red cat"))
    assert rel_err(TextEncoder.tiny_random(seed=1).encode("a red cat"), a.encode("a red cat")) > 0.1
    # Pinned ids and values: catch anything process-dependent (hash-set order, unseeded init).
    assert a.tokenizer("a ca")["input_ids"] == [67, 223, 69, 67, 1]
    expected = torch.tensor([-0.4542, -1.5372, 0.8337, 1.9708])
    torch.testing.assert_close(a.encode("a cat")[0, :4], expected, atol=1e-4, rtol=0)


def test_random_full_size_encoder_is_seeded():
    """`random-1.3b`'s umT5 (here its tiny preset): each build encodes alike, as a resumed training run
    needs, and the caller's random state is left as it was."""
    from longlive_core.random_models import random_umt5_xxl

    before = torch.random.get_rng_state()
    a, b = (random_umt5_xxl("cpu", torch.float32, preset="tiny") for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.encode("a red cat"), b.encode("a red cat"))
    other = random_umt5_xxl("cpu", torch.float32, seed=1, preset="tiny")
    assert rel_err(other.encode("a red cat"), a.encode("a red cat")) > 0.1


def test_different_prompts_differ():
    enc = TextEncoder.tiny_random()
    red, big = enc.encode("a red cat"), enc.encode("a big cat")
    assert red.shape == big.shape
    assert rel_err(red, big) > 0.1


def test_cache_hit_skips_the_model_and_evicts_lru():
    enc = TextEncoder.tiny_random(cache_size=2)
    calls = count_forwards(enc)
    first = enc.encode("a red cat")
    assert enc.encode("a red cat") is first
    assert enc.encode("  a red\n cat ") is first  # cached by the cleaned prompt
    assert calls[0] == 1
    enc.encode("b")
    enc.encode("a red cat")  # refreshes "a red cat": "b" is now the oldest
    enc.encode("c")
    assert calls[0] == 3
    enc.encode("a red cat")
    assert calls[0] == 3
    enc.encode("b")  # evicted
    assert calls[0] == 4


def test_to_casts_and_drops_the_cache():
    enc = TextEncoder.tiny_random()
    first = enc.encode("a red cat")
    assert enc.to("cpu", torch.float64) is enc and enc.dtype == torch.float64
    again = enc.encode("a red cat")
    assert again.dtype == torch.float64 and again is not first
    torch.testing.assert_close(again.float(), first, atol=1e-5, rtol=1e-5)


def test_offloaded_encoder_lends_its_weights_only_while_encoding():
    enc = TextEncoder.tiny_random()
    expected = enc.encode("a red cat")
    offloaded = TextEncoder.tiny_random().offload("cpu")
    host_pointer = offloaded.model.shared.weight.data_ptr()
    seen = []
    offloaded.model.register_forward_hook(lambda m, i, o: seen.append(m.shared.weight.data))
    torch.testing.assert_close(offloaded.encode("a red cat"), expected, atol=0, rtol=0)
    assert len(seen) == 1 and offloaded.device == torch.device("cpu")
    assert offloaded.model.shared.weight.data_ptr() == host_pointer  # back on the host copy after the visit
    assert offloaded.model.encoder.embed_tokens.weight is offloaded.model.shared.weight  # still tied
    assert not torch.equal(offloaded.encode("a blue dog"), expected[: len(offloaded.encode("a blue dog"))])


def test_offloaded_encoder_lends_one_block_at_a_time():
    """Low-memory mode lends the embedding and each block only while it runs (the device then holds one
    of them, not the whole encoder), and the embeddings are exactly those of the resident encoder."""
    expected = TextEncoder.tiny_random().encode("a red cat")
    offloaded = TextEncoder.tiny_random().offload("cpu")
    offload, encoder = offloaded._offload, offloaded.model.encoder
    lent_while_running = []
    for block in encoder.block:
        block.register_forward_pre_hook(lambda *_: lent_while_running.append(set(offload.lent_parts)))
    torch.testing.assert_close(offloaded.encode("a red cat"), expected, atol=0, rtol=0)
    blocks = len(encoder.block)
    assert blocks >= 2 and lent_while_running == [{i} for i in range(1, blocks + 1)]  # part 0: embedding
    assert offload.lent_parts == set()  # all back on the host after the visit


def test_encode_many_batches_misses_once_and_matches_single():
    enc = TextEncoder.tiny_random()
    calls = count_forwards(enc)
    out = enc.encode_many(["a red cat", LONG, "a red cat", "dog"])
    assert calls[0] == 1 and out[0] is out[2]
    single = TextEncoder.tiny_random(cache_size=0)
    for prompt, got in zip(["a red cat", LONG, "dog"], [out[0], out[1], out[3]], strict=True):
        torch.testing.assert_close(got, single.encode(prompt), atol=1e-5, rtol=1e-5)


def test_padding_is_masked_out():
    # Rows of the real tokens must not depend on text_len: equal to running the unpadded ids.
    enc = TextEncoder.tiny_random(text_len=512)
    ids = torch.tensor([enc.tokenizer(LONG)["input_ids"]])
    with torch.no_grad():
        unpadded = enc.model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(enc.encode(LONG), unpadded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        TextEncoder.tiny_random(text_len=200).encode(LONG), unpadded, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_raises(prompt):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        TextEncoder.tiny_random().encode(prompt)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prompt must be a string"):
        TextEncoder.tiny_random().encode(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="text_len"):
        TextEncoder.tiny_random(text_len=1)
    with pytest.raises(ValueError, match="cache_size"):
        TextEncoder.tiny_random(cache_size=-1)
    with pytest.raises(ValueError, match="unknown text encoder preset"):
        TextEncoderConfig.from_name("umt5-small")


def test_overlong_prompt_is_truncated_with_a_warning(caplog):
    enc = TextEncoder.tiny_random(text_len=16)
    with caplog.at_level(logging.WARNING, logger="longlive_core.text_encoder"):
        out = enc.encode("x" * 40)  # 41 tokens with </s>
    assert out.shape == (16, 32)
    assert "dropped the last 25 tokens" in caplog.text
    ids = enc.tokenizer("x" * 40, truncation=True, max_length=16)["input_ids"]
    assert len(ids) == 16 and ids[-1] == 1  # Wan's truncation keeps </s>
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longlive_core.text_encoder"):
        assert enc.encode("x" * 15).shape == (16, 32)  # exactly text_len: no warning
    assert "dropped" not in caplog.text


def test_umt5_xxl_preset():
    cfg = TextEncoderConfig.from_name("umt5-xxl")
    hf = cfg.to_umt5()
    assert (hf.vocab_size, hf.d_model, hf.d_kv, hf.d_ff, hf.num_layers, hf.num_heads) == (
        256384,
        4096,
        64,
        10240,
        24,
        64,
    )
    assert hf.relative_attention_num_buckets == 32 and hf.relative_attention_max_distance == 128
    assert hf.is_gated_act and hf.dense_act_fn == "gelu_new"
    with torch.device("meta"):
        model = UMT5EncoderModel(hf)
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336  # "5.7B" (docs/DESIGN.md)
    assert len(wan_key_table(24)) == 242  # = Wan's enc checkpoint: 10 per block + embedding + norm


# -- checkpoint layouts -----------------------------------------------------------------------------------
def reference_embeddings(model: UMT5EncoderModel, prompts: list[str]) -> list[torch.Tensor]:
    return TextEncoder(model, tiny_tokenizer(), cache_size=0).encode_many(prompts)


def test_from_original_matches_transformers_and_wan(tmp_path):
    model = tiny_hf_model(seed=3)
    wan_sd = transformers_to_wan(model.state_dict(), TINY.num_layers)
    assert {"token_embedding.weight", "norm.weight", "blocks.1.ffn.gate.0.weight"} <= set(wan_sd)
    assert len(wan_sd) == 10 * TINY.num_layers + 2
    torch.save(wan_sd, tmp_path / "enc.pth")
    tiny_tokenizer().save_pretrained(tmp_path / "tok")

    enc = TextEncoder.from_original(tmp_path / "enc.pth", tmp_path / "tok", dtype=torch.float32, config=TINY)
    prompts = ["a red cat", LONG]
    for got, want in zip(enc.encode_many(prompts), reference_embeddings(model, prompts), strict=True):
        assert torch.equal(got, want)
    assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight

    # Independent check of the key table's meaning: Wan's forward on Wan's keys.
    batch = enc.tokenizer(prompts, padding="max_length", max_length=160, return_tensors="pt")
    with torch.no_grad():
        wan = wan_forward(wan_sd, TINY, batch.input_ids, batch.attention_mask)
    for row, got in zip(wan, enc.encode_many(prompts), strict=True):
        torch.testing.assert_close(got, row[: got.shape[0]], atol=1e-5, rtol=1e-5)


def test_wrong_mapping_changes_output(tmp_path):
    model = tiny_hf_model(seed=3)
    wan_sd = transformers_to_wan(model.state_dict(), TINY.num_layers)
    for i in range(TINY.num_layers):  # swap wi_0 <-> wi_1
        g, f = f"blocks.{i}.ffn.gate.0.weight", f"blocks.{i}.ffn.fc1.weight"
        wan_sd[g], wan_sd[f] = wan_sd[f], wan_sd[g]
    torch.save(wan_sd, tmp_path / "enc.pth")
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    enc = TextEncoder.from_original(tmp_path / "enc.pth", tmp_path / "tok", dtype=torch.float32, config=TINY)
    assert rel_err(enc.encode(LONG), reference_embeddings(model, [LONG])[0]) > 1e-2


def test_from_pretrained_diffusers_layout(tmp_path):
    model = tiny_hf_model(seed=4)
    model.save_pretrained(tmp_path / "text_encoder")
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    enc = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    prompts = ["a red cat", LONG]
    for got, want in zip(enc.encode_many(prompts), reference_embeddings(model, prompts), strict=True):
        assert torch.equal(got, want)


def test_bad_state_dict_keys_raise():
    wan_sd = transformers_to_wan(tiny_hf_model(seed=0).state_dict(), TINY.num_layers)
    del wan_sd["blocks.0.norm2.weight"]
    with pytest.raises(ValueError, match="missing.*blocks.0.norm2.weight"):
        wan_to_transformers(wan_sd, TINY.num_layers)
    with pytest.raises(ValueError, match="3 layers"):
        wan_to_transformers(transformers_to_wan(tiny_hf_model(0).state_dict(), 2), 3)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory"):
        TextEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="text encoder directory"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(FileNotFoundError, match="config"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="text encoder weights"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "text_encoder" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="text encoder checkpoint"):
        TextEncoder.from_original(tmp_path / "enc.pth", tmp_path / "tokenizer")
    (tmp_path / "enc.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        TextEncoder.from_original(tmp_path / "enc.pth", tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        TextEncoder.from_original(tmp_path / "enc.pth", tmp_path / "tokenizer")
