"""Gemma, Gemma 2 and Gemma 3 (text).

- Gemma: GeGLU (the tanh GELU), RMSNorm scaling by 1 + weight (the 1 is added when the weight
  loads), embeddings scaled by sqrt(hidden) in the table's dtype, tied LM head.
- Gemma 2: soft-capped attention scores and logits, ``query_pre_attn_scalar``, sliding windows on
  every other layer, norms after attention and around the MLP.
- Gemma 3 text: Gemma 2 without the caps, with q/k head norms and rotary settings per layer type
  (five sliding layers in six by default). A multimodal ``gemma3`` checkpoint is served as text:
  its language model (``text_config``, tensors under ``language_model.``), without the vision tower.

The published configs leave settings to transformers' defaults (Gemma ties its embeddings, Gemma 2
caps at 50 / 30) or use older spellings (Gemma 3's ``rope_local_base_freq``), so they are read
as transformers completes them. Names and tensor parallelism are Llama's."""

from __future__ import annotations

from typing import Any

from .adapter import Adapter
from .config import ModelConfig, decoder_fields, layer_rope, sliding_windows, with_transformers_defaults


def _activation(cfg: dict[str, Any]) -> str:
    """Gemma 2 and 3 name it ``hidden_activation``. The official Gemma configs say ``"gelu"`` but
    mean the tanh approximation, which is what transformers runs."""
    name = cfg.get("hidden_activation") if cfg["model_type"] != "gemma" else None
    name = name or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if cfg["model_type"] == "gemma" and name == "gelu" else name


def _layer_types(cfg: dict[str, Any], num_layers: int) -> list[str]:
    if not cfg.get("sliding_window") or cfg["model_type"] == "gemma":
        return ["full_attention"] * num_layers
    period = 2 if cfg["model_type"] == "gemma2" else cfg.get("sliding_window_pattern", 6)
    default = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
    return list(cfg.get("layer_types") or default)


def read_config(cfg: dict[str, Any]) -> ModelConfig:
    cfg = with_transformers_defaults(cfg)
    fields = decoder_fields(cfg)
    layer_types = _layer_types(cfg, fields["num_layers"])
    later = cfg["model_type"] != "gemma"
    return ModelConfig(
        **fields,
        layer_rope=layer_rope(cfg, layer_types),
        layer_sliding_windows=sliding_windows(cfg, layer_types),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        o_proj_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=cfg["model_type"] == "gemma3_text",
        attention_scale=float(cfg.get("query_pre_attn_scalar") or fields["head_dim"]) ** -0.5,
        attention_softcap=cfg.get("attn_logit_softcapping") or None,
        sandwich_norms=later,
        norm_weight_offset=1.0,
        hidden_act=_activation(cfg),
        embedding_multiplier=fields["hidden_size"] ** 0.5,
        final_softcap=cfg.get("final_logit_softcapping") or None,
    )


def read_multimodal_config(cfg: dict[str, Any]) -> ModelConfig:
    """The language model of a multimodal Gemma 3 checkpoint. As in transformers, the top-level
    config decides whether the LM head is tied to the embeddings (by default yes)."""
    text = {"model_type": "gemma3_text", **(cfg.get("text_config") or {})}
    text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True)
    for key in ("eos_token_id", "bos_token_id", "torch_dtype", "dtype"):
        if key in cfg and text.get(key) is None:
            text[key] = cfg[key]
    config = read_config(text)
    config.weights_prefix = "language_model."
    config.raw = cfg
    return config


ADAPTERS = {
    "gemma": Adapter(read_config),
    "gemma2": Adapter(read_config),
    "gemma3_text": Adapter(read_config),
    "gemma3": Adapter(read_multimodal_config),
}
