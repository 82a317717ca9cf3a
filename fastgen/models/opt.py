"""OPT (125m to 66b): learned absolute position embeddings (row = position + 2), a ReLU MLP
``fc1`` / ``fc2``, LayerNorms, biases everywhere, the LM head tied to the token embeddings.
``do_layer_norm_before`` both ways: pre-norm blocks with a final LayerNorm, or (OPT-350m)
post-norm blocks without one. OPT-350m also embeds tokens in ``word_embed_proj_dim`` (512)
features, projected in to the hidden size (1024) before the first layer and out again before the
LM head (``project_in`` / ``project_out``, no bias).

Weights: ``model.decoder.*`` (or ``decoder.*``, as some checkpoints were saved), the attention's
``out_proj`` and the layers' ``self_attn_layer_norm`` / ``final_layer_norm``. Tensor parallelism:
as Llama (biases of q/k/v and ``fc1`` split with their rows); positions and the two embedding
projections are small and held whole on every rank."""

from __future__ import annotations

from typing import Any

from fastgen.errors import UnsupportedModelError

from .adapter import Adapter
from .config import ModelConfig, token_fields


def read_config(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("layer_norm_elementwise_affine", True) is False:
        raise UnsupportedModelError("OPT with layer_norm_elementwise_affine=false is not supported")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    pre_norm = cfg.get("do_layer_norm_before", True)
    embedding_dim = cfg.get("word_embed_proj_dim") or hidden
    bias = cfg.get("enable_bias", True)
    return ModelConfig(
        model_type="opt",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["ffn_dim"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=1e-5,  # torch's LayerNorm default, which OPT keeps
        partial_rotary_factor=0.0,
        learned_position_offset=2,
        qkv_bias=bias,
        o_proj_bias=bias,
        block="sequential" if pre_norm else "post_norm",
        norm="layer",
        gated_mlp=False,
        hidden_act=cfg.get("activation_function", "relu"),
        mlp_bias=bias,
        embedding_dim=embedding_dim if embedding_dim != hidden else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
        **token_fields(cfg),
    )


ADAPTERS = {
    "opt": Adapter(
        read_config,
        renames=(
            (r"^(model\.)?decoder\.layers\.", "model.layers."),
            (r"^(model\.)?decoder\.final_layer_norm\.", "model.norm."),
            (r"^(model\.)?decoder\.", "model."),  # embed_tokens, embed_positions, project_in/out
            (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
            (r"\.self_attn_layer_norm\.", ".input_layernorm."),
            (r"^(model\.layers\.\d+)\.final_layer_norm\.", r"\1.post_attention_layernorm."),
            (r"^(model\.layers\.\d+)\.fc([12])\.", r"\1.mlp.fc\2."),
        ),
    )
}
