"""Qwen (v1): configs as published (both layouts), its long-context settings against a written-out
reference of Qwen's own forward, what is refused, and that its fused ``c_attn`` bias matters.

transformers has no Qwen v1 class: greedy parity is checked against its Qwen2 class on the same
weights written in Qwen2's layout (test_hf_parity.py, case ``qwen-v1-fused-c-attn``; the math is
the same inside the trained context). Past it, Qwen's ``use_logn_attn`` scales the queries, which
Qwen2 does not: that is checked against `qwen_reference_logits`, written out from Qwen's
modeling_qwen.py, which is itself checked against transformers' Qwen2 inside the context."""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.errors import UnsupportedModelError
from fastgen.models.config import ModelConfig
from tests.helpers import engine_greedy, generate_together, hf_greedy
from tests.models.test_hf_parity import prompts_of_mixed_lengths, qwen2_twin

# Qwen/Qwen-7B (v1.1)
QWEN_7B = {
    "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0,
    "fp16": False, "fp32": False, "hidden_size": 4096, "intermediate_size": 22016, "initializer_range": 0.02,
    "kv_channels": 128, "layer_norm_epsilon": 1e-06, "max_position_embeddings": 32768, "model_type": "qwen",
    "no_bias": True, "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192,
    "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0",
    "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True,
    "vocab_size": 151936,
}  # fmt: skip
# Qwen/Qwen-7B as first released
QWEN_7B_FIRST_RELEASE = {
    "architectures": ["QWenLMHeadModel"], "attn_pdrop": 0.0, "bf16": False, "fp16": False, "fp32": False,
    "bias_dropout_fusion": True, "bos_token_id": 151643, "embd_pdrop": 0.0, "eos_token_id": 151643,
    "ffn_hidden_size": 22016, "initializer_range": 0.02, "kv_channels": 128, "layer_norm_epsilon": 1e-06,
    "model_type": "qwen", "n_embd": 4096, "n_head": 32, "n_layer": 32, "n_positions": 8192, "no_bias": True,
    "onnx_safe": None, "padded_vocab_size": 151936, "params_dtype": "torch.bfloat16", "pos_emb": "rotary",
    "resid_pdrop": 0.1, "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
    "seq_length": 2048, "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer",
    "transformers_version": "4.31.0", "use_cache": True, "use_flash_attn": "auto", "vocab_size": 151936,
    "use_dynamic_ntk": True, "use_logn_attn": True,
}  # fmt: skip


def test_published_configs():
    for published, seq_length in ((QWEN_7B, 8192), (QWEN_7B_FIRST_RELEASE, 2048)):
        config = ModelConfig.from_dict(published)
        assert (config.hidden_size, config.num_layers, config.num_heads) == (4096, 32, 32)
        assert (config.num_kv_heads, config.head_dim) == (32, 128)
        assert (config.intermediate_size, config.vocab_size, config.norm_eps) == (11008, 151936, 1e-6)
        assert (config.qkv_bias, config.o_proj_bias, config.mlp_bias) == (True, False, False)
        assert (config.rope_theta, config.rotary_dim, config.tie_word_embeddings) == (10000.0, 128, False)
        # dynamic NTK is not implemented: the context stops at seq_length, where logn would begin
        assert config.max_position_embeddings == config.max_context == config.logn_base_length == seq_length
    without_ntk = ModelConfig.from_dict({**QWEN_7B, "use_dynamic_ntk": False})
    assert (without_ntk.max_context, without_ntk.max_position_embeddings) == (None, 32768)


def qwen_reference_logits(path: str, tokens: list[int], *, logn: bool | None = None) -> torch.Tensor:
    """Qwen (v1)'s forward over one whole sequence, written out from its modeling_qwen.py in float32:
    RMSNorm blocks; ``c_attn`` is q, k, v; rotary on the first ``rotary_pct`` of each head
    (rotate-half); with ``use_logn_attn`` and more than ``seq_length`` keys, the query at position
    p is scaled by log(p + 1, seq_length) where p + 1 > seq_length; causal softmax attention over
    sqrt(head_dim); the MLP ``c_proj(w1(x) * silu(w2(x)))``. ``logn`` overrides the config's."""
    from safetensors.torch import load_file

    cfg = json.loads(Path(path, "config.json").read_text())
    weights = load_file(str(Path(path, "model.safetensors")))
    hidden, heads, dim = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    seq_length = cfg["seq_length"]
    count = len(tokens)
    assert not cfg["use_dynamic_ntk"] or count <= seq_length  # this reference leaves NTK out

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["layer_norm_epsilon"]))

    rotary = int(dim * cfg["rotary_pct"])
    inverse = 1.0 / (cfg["rotary_emb_base"] ** (torch.arange(0, rotary, 2).float() / rotary))
    angles = torch.outer(torch.arange(count).float(), inverse)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        turned, rest = x[..., :rotary], x[..., rotary:]
        first, second = turned.chunk(2, dim=-1)
        return torch.cat([turned * cos + torch.cat([-second, first], dim=-1) * sin, rest], dim=-1)

    use_logn = cfg["use_logn_attn"] if logn is None else logn
    scales = [math.log(p + 1, seq_length) if p + 1 > seq_length else 1.0 for p in range(count)]
    logn_scale = torch.tensor(scales)
    causal = torch.full((count, count), float("-inf")).triu(1)
    x = weights["transformer.wte.weight"][tokens]
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"transformer.h.{layer}."
        w = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
        h = rms(x, w["ln_1.weight"])
        q, k, v = (h @ w["attn.c_attn.weight"].T + w["attn.c_attn.bias"]).split(hidden, dim=-1)
        q, k, v = (t.reshape(count, heads, dim) for t in (q, k, v))
        q, k = rotate(q), rotate(k)
        if use_logn and count > seq_length:
            q = q * logn_scale[:, None, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) / dim**0.5 + causal
        attention = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).reshape(count, hidden)
        x = x + attention @ w["attn.c_proj.weight"].T
        h = rms(x, w["ln_2.weight"])
        gated = (h @ w["mlp.w1.weight"].T) * torch.nn.functional.silu(h @ w["mlp.w2.weight"].T)
        x = x + gated @ w["mlp.c_proj.weight"].T
    return rms(x, weights["transformer.ln_f.weight"]) @ weights["lm_head.weight"].T


def test_the_written_out_reference_is_transformers_qwen2_inside_the_context(toy_checkpoint):
    from transformers import AutoModelForCausalLM

    path = toy_checkpoint("qwen", use_logn_attn=True, seq_length=48)
    tokens = prompts_of_mixed_lengths(384)[2]  # 40 tokens: within seq_length, logn changes nothing
    model = AutoModelForCausalLM.from_pretrained(qwen2_twin(path), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(qwen_reference_logits(path, tokens), expected, rtol=1e-4, atol=1e-4)


def test_logn_attention_past_seq_length_matches_the_reference(toy_checkpoint):
    """A 119-token prompt on a model trained for 48 (max_model_len 120): every prompt token's
    log-probability and the sampled token equal the reference's, which differs from the same
    forward without the scaling (so the scaling is exercised)."""
    path = toy_checkpoint("qwen", use_logn_attn=True, seq_length=48)
    rng = random.Random(6)
    prompt = [rng.randrange(3, 384) for _ in range(119)]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    (out,) = generate_together(path, [(prompt, params)], max_model_len=120, token_budget=48)
    with torch.no_grad():
        reference = torch.log_softmax(qwen_reference_logits(path, prompt), dim=-1)
        unscaled = torch.log_softmax(qwen_reference_logits(path, prompt, logn=False), dim=-1)
    expected = [reference[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert [entry.logprob for entry in out.prompt_logprobs[1:]] == pytest.approx(expected, abs=1e-4)
    assert out.token_ids == [reference[-1].argmax().item()]
    moved = [abs(unscaled[i - 1, prompt[i]].item() - expected[i - 1]) for i in range(48, len(prompt))]
    assert max(moved) > 1e-2, max(moved)
    assert [abs(unscaled[i - 1, prompt[i]].item() - expected[i - 1]) for i in range(1, 48)] == pytest.approx(
        [0.0] * 47, abs=1e-5
    )  # within seq_length the scale is 1


def test_dynamic_ntk_limits_the_context_to_seq_length(toy_checkpoint):
    """With use_dynamic_ntk a prompt past seq_length would need its own rotary base: the engine's
    context defaults to seq_length, and a longer max_model_len is refused by name."""
    path = toy_checkpoint("qwen", use_dynamic_ntk=True, use_logn_attn=True, seq_length=64)

    async def start(**options):
        async with await AsyncEngine.start(path, EngineConfig(dtype="float32", **options)) as engine:
            return engine.max_model_len

    assert asyncio.run(start()) == 64
    with pytest.raises(UnsupportedModelError, match=r"max_model_len=100.*use_dynamic_ntk.*seq_length=64"):
        asyncio.run(start(max_model_len=100))


def test_the_fused_attention_bias_matters(toy_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path = toy_checkpoint("qwen")
    copy = tmp_path / "no-bias"
    shutil.copytree(path, copy)
    weights = load_file(str(copy / "model.safetensors"))
    biases = [name for name in weights if name.endswith("c_attn.bias")]
    assert biases and all(weights[name].std() > 0.01 for name in biases)
    for name in biases:
        weights[name].zero_()
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    prompts = prompts_of_mixed_lengths(384)[2:3]
    assert engine_greedy(str(copy), prompts, 8) != engine_greedy(path, prompts, 8)


def _tiktoken_file_of(tokenizer_dir: str, target: Path) -> int:
    """The byte-level BPE of ``tokenizer_dir`` (the toy's) as a tiktoken rank file: each token's
    bytes, base64, and its rank (its id less the special tokens before it); returns that offset."""
    import base64

    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    specials = len(tokenizer.all_special_ids)
    lines = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token_id >= specials:
            data = bytes(to_byte[char] for char in token)
            lines.append(f"{base64.b64encode(data).decode()} {token_id - specials}")
    target.write_text("\n".join(lines) + "\n")
    return specials


def test_the_tokenizer_is_built_from_the_tiktoken_ranks(toy_checkpoint, tmp_path):
    """A directory with ``qwen.tiktoken`` (and Qwen's remote-code tokenizer config) gets a fast
    tokenizer: the same BPE as the ranks' source, Qwen's digit-by-digit pre-tokenizer, Qwen's
    special tokens after the ranks, and the ChatML template of the chat models."""
    from transformers import AutoTokenizer

    from fastgen.models.checkpoint import load_tokenizer

    source = toy_checkpoint("qwen")
    directory = tmp_path / "qwen-tiktoken"
    directory.mkdir()
    offset = _tiktoken_file_of(source, directory / "qwen.tiktoken")
    remote = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}  # what transformers cannot run
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "QWenTokenizer", "auto_map": remote})
    )
    (directory / "generation_config.json").write_text(json.dumps({"chat_format": "chatml"}))
    built, original = load_tokenizer(directory), AutoTokenizer.from_pretrained(source)
    words = "the engine schedules every request over a paged cache of blocks"
    assert built(words)["input_ids"] == [token - offset for token in original(words)["input_ids"]]
    assert built.decode(built(words)["input_ids"]) == words
    pieces = built.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 2024, naïve")
    assert [piece for piece, _ in pieces] == ["in", "Ġ", "2", "0", "2", "4", ",", "ĠnaÃ¯ve"]  # digit by digit
    ranks = len(original.get_vocab()) - offset
    assert built.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>"]) == [
        ranks, ranks + 1, ranks + 2, ranks + 207,
    ]  # fmt: skip
    assert built.eos_token_id == ranks
    messages = [{"role": "user", "content": "hi"}]
    chat = built.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bin_checkpoint(toy_checkpoint):
    path = toy_checkpoint("qwen", weights_format="bin")
    assert not list(Path(path).glob("*.safetensors"))
    prompts = prompts_of_mixed_lengths(384, seed=3)[:3]
    assert engine_greedy(path, prompts, 12, token_budget=16) == hf_greedy(qwen2_twin(path), prompts, 12)
