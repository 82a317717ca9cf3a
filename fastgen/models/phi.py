"""Phi-1.5 / Phi-2: attention and MLP side by side on one LayerNorm's output, partial rotary,
biases everywhere (LM head too), a GELU (tanh) MLP ``fc1`` / ``fc2``.

Checkpoint names: Llama's, but ``self_attn.dense`` (the attention output projection) and
``model.final_layernorm``. Tensor parallelism: as Llama; the LM head's bias splits by vocabulary
like its weight."""

from __future__ import annotations

from typing import Any

from fastgen.errors import UnsupportedModelError

from .adapter import Adapter
from .config import ModelConfig, decoder_fields


def read_config(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("qk_layernorm"):
        raise UnsupportedModelError("phi with qk_layernorm=true is not supported")
    return ModelConfig(
        **decoder_fields(cfg),
        qkv_bias=True,
        o_proj_bias=True,
        block="parallel",
        norm="layer",
        gated_mlp=False,
        hidden_act=cfg.get("hidden_act") or "gelu_new",
        mlp_bias=True,
        lm_head_bias=True,
    )


ADAPTERS = {
    "phi": Adapter(
        read_config,
        renames=(
            (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
            (r"^model\.final_layernorm\.", "model.norm."),
        ),
    )
}
