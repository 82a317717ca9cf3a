"""Qwen (v1, ``QWenLMHeadModel``), read from its own config and weight names without running its
remote code: RMSNorm pre-norm blocks, multi-head attention from a fused ``c_attn`` (with bias),
rotary (``rotary_emb_base``, ``rotary_pct``), a SwiGLU MLP ``c_proj(w1(x) * silu(w2(x)))``. Both
published config layouts: ``hidden_size`` / ``num_attention_heads`` / ``intermediate_size`` and
the first release's ``n_embd`` / ``n_head`` / ``ffn_hidden_size`` (the MLP is half that wide).

Its long-context settings, with ``seq_length`` the trained context:
- ``use_logn_attn``: queries at positions past ``seq_length`` scale by
  ``log(position + 1) / log(seq_length)`` (implemented: `fastgen.layers.rotary.LogLengthScaling`).
- ``use_dynamic_ntk``: a sequence whose prompt exceeds ``seq_length`` rotates with a larger base
  chosen from its prompt's length. Not implemented (the cache would need a rotation base per
  sequence): such models run with contexts up to ``seq_length`` (the default ``max_model_len``),
  and a longer ``max_model_len`` is refused when the model is built.

Weights: ``transformer.wte`` / ``h.N`` / ``ln_f``; ``c_attn`` is cut into the q, k and v thirds,
``w2`` is the gate, ``w1`` the up projection, ``mlp.c_proj`` the down projection, ``attn.c_proj``
the output projection. Tensor parallelism: as Llama.

The tokenizer (``qwen.tiktoken``, read by Qwen's remote code through the tiktoken package) is
built as a transformers fast tokenizer by `load_tokenizer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastgen.errors import UnsupportedModelError

from .adapter import Adapter, RowBlocks
from .config import ModelConfig, token_fields


def read_config(cfg: dict[str, Any]) -> ModelConfig:
    hidden = cfg.get("hidden_size") or cfg["n_embd"]
    heads = cfg.get("num_attention_heads") or cfg["n_head"]
    head_dim = cfg.get("kv_channels") or hidden // heads
    if head_dim * heads != hidden:
        raise UnsupportedModelError(f"qwen with kv_channels * num_attention_heads != hidden_size ({hidden})")
    seq_length = cfg.get("seq_length", 2048)
    dynamic_ntk = cfg.get("use_dynamic_ntk", True)  # the defaults of Qwen's own config class
    longest = cfg.get("max_position_embeddings") or cfg.get("n_positions") or seq_length
    no_bias = cfg.get("no_bias", True)
    return ModelConfig(
        model_type="qwen",
        vocab_size=cfg.get("vocab_size") or cfg["padded_vocab_size"],
        hidden_size=hidden,
        intermediate_size=(cfg.get("intermediate_size") or cfg["ffn_hidden_size"]) // 2,
        num_layers=cfg.get("num_hidden_layers") or cfg["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=seq_length if dynamic_ntk else longest,
        norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        rope_theta=float(cfg.get("rotary_emb_base", 10000)),
        partial_rotary_factor=float(cfg.get("rotary_pct", 1.0)),
        logn_base_length=seq_length if cfg.get("use_logn_attn", True) else None,
        max_context=seq_length if dynamic_ntk else None,
        max_context_reason=(
            f"use_dynamic_ntk: a prompt longer than seq_length={seq_length} would need a rotary base "
            "per sequence"
        ),
        qkv_bias=True,
        o_proj_bias=not no_bias,
        mlp_bias=not no_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **token_fields(cfg),
    )


def split_c_attn(name: str, config: ModelConfig) -> list[tuple[str, RowBlocks]] | None:
    """``c_attn`` is the query, key and value projections one after the other."""
    if ".self_attn.c_attn." not in name:
        return None
    size = config.num_heads * config.head_dim
    return [
        (name.replace(".c_attn.", f".{which}_proj."), [(index * size, (index + 1) * size)])
        for index, which in enumerate("qkv")
    ]


ADAPTERS = {
    "qwen": Adapter(
        read_config,
        renames=(
            (r"^transformer\.wte\.", "model.embed_tokens."),
            (r"^transformer\.ln_f\.", "model.norm."),
            (r"^transformer\.h\.", "model.layers."),
            (r"\.ln_1\.", ".input_layernorm."),
            (r"\.ln_2\.", ".post_attention_layernorm."),
            (r"\.attn\.c_attn\.", ".self_attn.c_attn."),
            (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
            (r"\.mlp\.w1\.", ".mlp.up_proj."),
            (r"\.mlp\.w2\.", ".mlp.gate_proj."),
            (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
        ),
        split=split_c_attn,
        ignored=(r"\.inv_freq$", r"\.masked_bias$", r"\.logn_tensor$"),
    )
}


# what Qwen's tokenization_qwen.py defines around its tiktoken ranks
PRE_TOKENIZER_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_tokenizer(directory: Path) -> Any:
    """Qwen's tokenizer without its remote code or the tiktoken package: byte-level BPE over the
    ranks of ``qwen.tiktoken`` (base64 token, rank per line), merges recovered from the ranks as
    transformers converts tiktoken files, Qwen's pre-tokenizer pattern (digits one at a time), its
    special tokens numbered after the ranks, ``<|endoftext|>`` as the end of text, and the ChatML
    template when ``generation_config.json`` says the model chats in it."""
    import base64
    import json

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            ranks = {}
            for line in Path(tiktoken_url).read_bytes().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    converter = Converter(
        vocab_file=str(directory / "qwen.tiktoken"),
        pattern=PRE_TOKENIZER_PATTERN,
        extra_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), eos_token="<|endoftext|>")
    generation = directory / "generation_config.json"
    if generation.is_file() and json.loads(generation.read_text()).get("chat_format") == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
