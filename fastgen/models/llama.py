"""Llama 1/2/3: the decoder's defaults (pre-norm blocks, RMSNorm, SwiGLU, rotary with the
``linear``, ``dynamic`` and ``llama3`` scalings). The checkpoint names are the canonical ones.

Tensor parallelism: q/k/v and gate/up split by heads and features (KV heads replicated when fewer
than ranks), o_proj and down_proj by input features, embeddings and LM head by vocabulary."""

from __future__ import annotations

from typing import Any

from .adapter import Adapter
from .config import ModelConfig, decoder_fields


def read_config(cfg: dict[str, Any]) -> ModelConfig:
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **decoder_fields(cfg),
        qkv_bias=attention_bias,
        o_proj_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        hidden_act=cfg.get("hidden_act") or "silu",
    )


ADAPTERS = {"llama": Adapter(read_config)}
