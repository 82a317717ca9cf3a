"""Qwen2 / Qwen2.5 (Llama with q/k/v biases, optional sliding windows) and Qwen3 (dense: no q/k/v
biases, an RMSNorm over each query and key head before rotary, ``head_dim`` not hidden / heads).

Sliding windows only with ``use_sliding_window``: by default on the layers from
``max_window_layers`` on, or as ``layer_types`` says. Checkpoint names and tensor parallelism are
Llama's (the q/k norms are per head, replicated)."""

from __future__ import annotations

from typing import Any

from .adapter import Adapter
from .config import ModelConfig, decoder_fields, sliding_windows


def _layer_types(cfg: dict[str, Any], num_layers: int) -> list[str]:
    if not (cfg.get("sliding_window") and cfg.get("use_sliding_window")):
        return ["full_attention"] * num_layers
    first = cfg.get("max_window_layers", num_layers)
    default = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    return list(cfg.get("layer_types") or default)


def read_config(cfg: dict[str, Any]) -> ModelConfig:
    fields = decoder_fields(cfg)
    qwen2 = fields["model_type"] == "qwen2"
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **fields,
        layer_sliding_windows=sliding_windows(cfg, _layer_types(cfg, fields["num_layers"])),
        qkv_bias=attention_bias or qwen2,  # always there in Qwen2
        o_proj_bias=attention_bias,
        qk_norm=not qwen2,
        hidden_act=cfg.get("hidden_act") or "silu",
    )


ADAPTERS = {"qwen2": Adapter(read_config), "qwen3": Adapter(read_config)}
