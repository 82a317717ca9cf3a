"""`ModelConfig`: the fields of a Hugging Face ``config.json`` that the model code needs.

No torch here: the engine process reads it without loading a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    layer_rope: tuple[tuple[float, dict[str, Any] | None], ...]  # (theta, scaling) of each layer
    partial_rotary_factor: float
    layer_sliding_windows: tuple[int | None, ...]  # of each layer; None: full attention
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    qk_norm: bool  # RMSNorm over each query and key head before rotary (Qwen3)
    norm_weight_offset: float  # RMSNorm scales by (offset + weight): 1 for Gemma, else 0
    embedding_multiplier: float  # token embeddings are scaled by it (sqrt(hidden) for Gemma)
    attention_scale: float  # of the query-key products: head_dim ** -0.5 unless the config says
    attention_softcap: float | None  # scores capped at cap * tanh(score / cap) (Gemma 2)
    final_softcap: float | None  # the same for the logits
    sandwich_norms: bool  # RMSNorm after attention and around the MLP too (Gemma 2)
    mlp_bias: bool
    num_experts: int  # 0: a dense MLP; otherwise a mixture of experts (Mixtral)
    num_experts_per_tok: int
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: str | None  # e.g. "bfloat16", as config.json names it
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    weights_prefix: str = ""  # checkpoint names of the model's tensors start with it; others are skipped

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
            return _text_part_of_gemma3(cfg)
        if cfg.get("model_type") in _COMPLETED_BY_TRANSFORMERS:
            cfg = _with_transformers_defaults(cfg)
        model_type = cfg.get("model_type", "")
        hidden = cfg["hidden_size"]
        num_heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope_settings(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        dtype_name = cfg.get("torch_dtype") or cfg.get("dtype")
        attention_bias = bool(cfg.get("attention_bias", False))
        head_dim = cfg.get("head_dim") or hidden // num_heads
        gemma = model_type in ("gemma", "gemma2", "gemma3_text")
        num_layers = cfg["num_hidden_layers"]
        layer_types = _layer_types(cfg, model_type, num_layers)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            layer_rope=_layer_rope(cfg, layer_types, (rope_theta, rope_scaling)),
            partial_rotary_factor=_partial_rotary_factor(cfg),
            layer_sliding_windows=_layer_sliding_windows(cfg, layer_types),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type in ("qwen2", "phi"),  # always there in these
            o_proj_bias=attention_bias or model_type == "phi",
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_weight_offset=1.0 if gemma else 0.0,
            embedding_multiplier=hidden**0.5 if gemma else 1.0,
            attention_scale=float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5,
            attention_softcap=cfg.get("attn_logit_softcapping") or None,
            final_softcap=cfg.get("final_logit_softcapping") or None,
            sandwich_norms=model_type in ("gemma2", "gemma3_text"),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            num_experts=int(cfg.get("num_local_experts") or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            hidden_act=_activation(cfg, model_type),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=dtype_name if isinstance(dtype_name, str) else None,
            raw=cfg,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """The config of a Hugging Face model directory, or of a GGUF file (or a directory holding one)."""
        from .gguf import gguf_file_in, read_config

        gguf_file = gguf_file_in(Path(path))
        if gguf_file is not None:
            return cls.from_dict(read_config(gguf_file))
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: expected a Hugging Face model directory")
        return cls.from_dict(json.loads(config_file.read_text()))


_DEFAULT_ACTIVATIONS = {
    "phi": "gelu_new",
    "gemma": "gelu_pytorch_tanh",
    "gemma2": "gelu_pytorch_tanh",
    "gemma3_text": "gelu_pytorch_tanh",
}


def _activation(cfg: dict[str, Any], model_type: str) -> str:
    """Gemma 2 and 3 name it ``hidden_activation``; the others ``hidden_act``. The official Gemma
    configs say ``"gelu"`` but mean the tanh approximation, which is what transformers runs."""
    name = cfg.get("hidden_activation") if model_type in ("gemma2", "gemma3_text") else None
    name = name or cfg.get("hidden_act") or _DEFAULT_ACTIVATIONS.get(model_type, "silu")
    if model_type == "gemma" and name == "gelu":
        return "gelu_pytorch_tanh"
    return name


# published configs of these leave settings to transformers' defaults (Gemma ties its embeddings,
# Gemma 2 caps at 50 / 30) or use older spellings (Gemma 3's rope_local_base_freq)
_COMPLETED_BY_TRANSFORMERS = ("gemma", "gemma2", "gemma3_text")


def _with_transformers_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as transformers reads it: its defaults filled in, legacy fields converted."""
    from transformers import AutoConfig

    fields = {key: value for key, value in cfg.items() if key != "model_type"}
    return AutoConfig.for_model(cfg["model_type"], **fields).to_dict()


def _text_part_of_gemma3(cfg: dict[str, Any]) -> ModelConfig:
    """A multimodal Gemma 3 checkpoint served as text: its language model (``text_config``, tensors
    under ``language_model.``); the vision tower and projector are not loaded. As in transformers,
    the top-level config decides whether the LM head is tied to the embeddings (by default yes)."""
    text = {"model_type": "gemma3_text", **cfg["text_config"]}
    text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True)
    for key in ("eos_token_id", "bos_token_id", "torch_dtype", "dtype"):
        if key in cfg and text.get(key) is None:
            text[key] = cfg[key]
    config = ModelConfig.from_dict(text)
    config.weights_prefix = "language_model."
    config.raw = cfg
    return config


def _partial_rotary_factor(cfg: dict[str, Any]) -> float:
    """Top-level in older configs, inside ``rope_parameters`` in transformers 5."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(cfg.get("partial_rotary_factor", 1.0))


def _layer_types(cfg: dict[str, Any], model_type: str, num_layers: int) -> list[str]:
    """``sliding_attention`` or ``full_attention`` for each layer. Mistral and Mixtral slide every
    layer's window (if they have one); Gemma 2 and 3 and Qwen2/3 say which in ``layer_types``
    (Gemma 2 by default every other layer from the first, Gemma 3 five of every six; Qwen only
    with ``use_sliding_window``, by default the layers from ``max_window_layers`` on)."""
    if not cfg.get("sliding_window"):
        return ["full_attention"] * num_layers
    if model_type in ("mistral", "mixtral"):
        return ["sliding_attention"] * num_layers
    if model_type in ("gemma2", "gemma3_text"):
        period = 2 if model_type == "gemma2" else cfg.get("sliding_window_pattern", 6)
        default = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
        return list(cfg.get("layer_types") or default)
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        first = cfg.get("max_window_layers", num_layers)
        default = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        return list(cfg.get("layer_types") or default)
    return ["full_attention"] * num_layers


def _layer_sliding_windows(cfg: dict[str, Any], layer_types: list[str]) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _layer_rope(
    cfg: dict[str, Any], layer_types: list[str], default: tuple[float, dict[str, Any] | None]
) -> tuple[tuple[float, dict[str, Any] | None], ...]:
    """Each layer's rotary settings: Gemma 3's ``rope_parameters`` hold one set per layer type."""
    params = cfg.get("rope_parameters")
    if not (isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()) and params):
        return (default,) * len(layer_types)
    by_type = {kind: _rope_settings({"rope_parameters": settings}) for kind, settings in params.items()}
    return tuple(by_type.get(kind, default) for kind in layer_types)


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either transformers-5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` fields."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        return float(params["rope_theta"]), scaling
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "default":
        scaling = None
    return float(cfg.get("rope_theta", 10000.0)), scaling
