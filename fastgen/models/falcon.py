"""Falcon: 7B (multi-query attention, attention and MLP side by side on one LayerNorm) and the
40B / 180B decoder (``new_decoder_architecture``: grouped KV heads, ``ln_attn`` before attention
and ``ln_mlp`` before the MLP). Read from ``falcon`` configs and from the older ``RefinedWeb``
(40B: the new decoder) and ``RefinedWebModel`` (7B) ones (``n_head``, ``n_head_kv``, ``n_layer``).
Also the rotary variants without parallel attention or multi-query (query, key and value
interleaved per head). ALiBi variants (falcon-rw) are refused: the attention kernels take no
position bias.

Weights: ``transformer.h.N.self_attention.query_key_value`` is cut into q/k/v row blocks by the
layout the config implies (grouped: each KV head's queries, then its key and value; multi-query:
all queries, one key, one value; interleaved: q, k, v of each head), so tensor parallelism splits
it by heads like separate projections (a single KV head is replicated on every rank).
``dense_h_to_4h`` / ``dense_4h_to_h`` are the MLP's ``fc1`` / ``fc2`` (GELU); biases as ``bias``
says; the LM head is tied to the embeddings unless the config says otherwise."""

from __future__ import annotations

from typing import Any

from fastgen.errors import UnsupportedModelError

from .adapter import Adapter, RowBlocks, head_rows
from .config import ModelConfig, rope_settings, token_fields


def _shape(cfg: dict[str, Any]) -> tuple[int, int, int, bool]:
    """(hidden, heads, KV heads, new decoder) from either spelling of the config."""
    hidden = cfg.get("hidden_size") or cfg.get("n_embed") or 4544
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 71
    new_decoder = cfg.get("new_decoder_architecture")
    if new_decoder is None:  # RefinedWeb configs say it with their type
        new_decoder = cfg.get("model_type") == "RefinedWeb"
    if new_decoder:
        kv_heads = cfg.get("num_kv_heads") or cfg.get("n_head_kv") or heads
    else:
        kv_heads = 1 if cfg.get("multi_query", True) else heads
    return hidden, heads, kv_heads, bool(new_decoder)


def read_config(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("alibi"):
        raise UnsupportedModelError(
            "Falcon with alibi=true (ALiBi position biases, e.g. falcon-rw-1b/7b) is not supported: "
            "fastgen's attention kernels take no position bias; the rotary Falcon models (7B, 40B, 180B) are"
        )
    hidden, heads, kv_heads, new_decoder = _shape(cfg)
    parallel = cfg.get("parallel_attn", True)
    if new_decoder and not parallel:
        raise UnsupportedModelError("Falcon's new decoder without parallel_attn is not supported")
    norms = cfg.get("num_ln_in_parallel_attn") or (2 if new_decoder else 1)
    bias = bool(cfg.get("bias", False))
    rope_theta, rope_scaling = rope_settings(cfg)
    return ModelConfig(
        model_type=cfg.get("model_type", "falcon"),
        vocab_size=cfg.get("vocab_size", 65024),
        hidden_size=hidden,
        intermediate_size=cfg.get("ffn_hidden_size") or 4 * hidden,
        num_layers=cfg.get("num_hidden_layers") or cfg.get("n_layer") or 32,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        qkv_bias=bias,
        o_proj_bias=bias,
        block="parallel" if parallel else "sequential",
        parallel_norms=2 if new_decoder and norms == 2 else 1,
        norm="layer",
        gated_mlp=False,
        hidden_act=cfg.get("activation", "gelu"),
        mlp_bias=bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **token_fields(cfg),
    )


def split_query_key_value(name: str, config: ModelConfig) -> list[tuple[str, RowBlocks]] | None:
    """Row blocks of the canonical q/k/v projections in a fused ``query_key_value`` tensor."""
    if ".self_attn.query_key_value." not in name:
        return None
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    _, _, _, new_decoder = _shape(config.raw)
    blocks: dict[str, RowBlocks] = {"q": [], "k": [], "v": []}
    if new_decoder:  # per KV head: its group's queries, its key, its value
        group = heads // kv_heads
        for kv_head in range(kv_heads):
            start = kv_head * (group + 2) * dim
            blocks["q"].append((start, start + group * dim))
            blocks["k"].append(head_rows(group, dim, start))
            blocks["v"].append(head_rows(group + 1, dim, start))
    elif kv_heads == 1:  # multi-query: every query head, then the key and the value
        blocks = {"q": [(0, heads * dim)], "k": [head_rows(heads, dim)], "v": [head_rows(heads + 1, dim)]}
    else:  # query, key and value of each head in turn
        for head in range(heads):
            for index, which in enumerate("qkv"):
                blocks[which].append(head_rows(3 * head + index, dim))
    return [(name.replace(".query_key_value.", f".{which}_proj."), rows) for which, rows in blocks.items()]


_ADAPTER = Adapter(
    read_config,
    renames=(
        (r"^transformer\.word_embeddings\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", "model.layers."),
        (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
        (r"\.self_attention\.query_key_value\.", ".self_attn.query_key_value."),
        (r"\.ln_attn\.", ".input_layernorm."),
        (r"\.ln_mlp\.", ".mlp_layernorm."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc1."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.fc2."),
    ),
    split=split_query_key_value,
)
ADAPTERS = {"falcon": _ADAPTER, "RefinedWeb": _ADAPTER, "RefinedWebModel": _ADAPTER}
