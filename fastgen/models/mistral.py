"""Mistral (Llama with a sliding window on every layer) and Mixtral (Mistral with a mixture of
experts for the MLP: top-k of ``num_local_experts`` gated SiLU MLPs, `fastgen.layers.moe`).

Checkpoint names are Llama's; Mixtral's experts are ``block_sparse_moe.experts.E.w1/w2/w3`` and
its router ``block_sparse_moe.gate``, which the MoE layer lists itself. Tensor parallelism: as
Llama; every rank holds a slice of every expert (by intermediate features) and the whole router."""

from __future__ import annotations

from typing import Any

from .adapter import Adapter
from .config import ModelConfig, decoder_fields


def read_config(cfg: dict[str, Any]) -> ModelConfig:
    fields = decoder_fields(cfg)
    window = cfg.get("sliding_window") or None
    return ModelConfig(
        **fields,
        layer_sliding_windows=(window,) * fields["num_layers"],
        hidden_act=cfg.get("hidden_act") or "silu",
        num_experts=int(cfg.get("num_local_experts") or 0),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
    )


ADAPTERS = {"mistral": Adapter(read_config), "mixtral": Adapter(read_config)}
