"""`ModelConfig`: what the shared decoder (`fastgen.models.decoder`) needs to know of a checkpoint,
its shape and its layer options. Each family's adapter (``fastgen/models/<family>.py``) fills one
from the family's own ``config.json``; the options' defaults are Llama's.

No torch here: the engine process reads it without loading a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RopeSettings = tuple[float, dict[str, Any] | None]  # (theta, HF rope_scaling)

BLOCKS = ("sequential", "parallel", "post_norm")


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
    # -- positions --------------------------------------------------------------------------------
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    layer_rope: tuple[RopeSettings, ...] = ()  # of each layer; default: (rope_theta, rope_scaling)
    partial_rotary_factor: float = 1.0  # 0: no rotary (learned positions)
    learned_position_offset: int | None = None  # learned absolute positions, row = position + offset (OPT)
    logn_base_length: int | None = None  # queries past it scale by log_base(position + 1) (Qwen)
    max_context: int | None = None  # the longest max_model_len implemented for this model
    max_context_reason: str = ""  # what a longer one would need
    # -- attention --------------------------------------------------------------------------------
    layer_sliding_windows: tuple[int | None, ...] = ()  # of each layer; None: full attention
    qkv_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each query and key head before rotary
    attention_scale: float | None = None  # of the query-key products; None: head_dim ** -0.5
    attention_softcap: float | None = None  # scores capped at cap * tanh(score / cap)
    # -- blocks -----------------------------------------------------------------------------------
    block: str = "sequential"  # pre-norm blocks one after the other, side by side, or post-norm
    parallel_norms: int = 1  # of a parallel block: one norm for attention and MLP, or one each
    sandwich_norms: bool = False  # norms after attention and around the MLP too (Gemma 2)
    norm: str = "rms"  # "rms" or "layer" (LayerNorm with a bias)
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight): 1 for Gemma
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); else fc2(act(fc1(x)))
    hidden_act: str = "silu"
    mlp_bias: bool = False
    num_experts: int = 0  # 0: a dense MLP; otherwise a mixture of experts (Mixtral)
    num_experts_per_tok: int = 0
    # -- embeddings and head ----------------------------------------------------------------------
    embedding_multiplier: float = 1.0  # token embeddings are scaled by it (sqrt(hidden) for Gemma)
    embedding_dim: int | None = None  # tokens embedded in fewer features, projected in and out (OPT)
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    final_norm: bool = True
    final_softcap: float | None = None  # logits capped like the attention scores
    # -- tokens and files -------------------------------------------------------------------------
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None  # e.g. "bfloat16", as config.json names it
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    weights_prefix: str = ""  # checkpoint names of the model's tensors start with it; others are skipped

    def __post_init__(self) -> None:
        if not self.layer_rope:
            self.layer_rope = ((self.rope_theta, self.rope_scaling),) * self.num_layers
        if not self.layer_sliding_windows:
            self.layer_sliding_windows = (None,) * self.num_layers
        if self.attention_scale is None:
            self.attention_scale = self.head_dim**-0.5
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """The config of a Hugging Face ``config.json`` (or a GGUF file's equivalent), read by the
        adapter of its model type. Raises `UnsupportedModelError` for a type fastgen does not run."""
        from . import adapter_for

        return adapter_for(cfg.get("model_type", "")).read_config(cfg)

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


# -- the fields most Hugging Face decoder configs spell alike ---------------------------------------


def decoder_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """`ModelConfig` fields from a config that names them as Llama's does: the shape, rotary
    settings, the norms' epsilon, tokens and dtype."""
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    rope_theta, rope_scaling = rope_settings(cfg)
    return dict(
        model_type=cfg.get("model_type", ""),
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        partial_rotary_factor=partial_rotary_factor(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **token_fields(cfg),
    )


def token_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Beginning and end token ids, and the checkpoint's dtype (``torch_dtype``, ``dtype`` in
    transformers 5)."""
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype")
    return dict(
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        checkpoint_dtype=dtype_name if isinstance(dtype_name, str) else None,
        raw=cfg,
    )


def with_transformers_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as transformers reads it: its defaults filled in, legacy fields converted (for
    families whose published configs leave settings to those defaults)."""
    from transformers import AutoConfig

    fields = {key: value for key, value in cfg.items() if key != "model_type"}
    return AutoConfig.for_model(cfg["model_type"], **fields).to_dict()


def partial_rotary_factor(cfg: dict[str, Any]) -> float:
    """Top-level in older configs, inside ``rope_parameters`` in transformers 5."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(cfg.get("partial_rotary_factor", 1.0))


def rope_settings(cfg: dict[str, Any]) -> RopeSettings:
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


def layer_rope(cfg: dict[str, Any], layer_types: list[str]) -> tuple[RopeSettings, ...]:
    """Each layer's rotary settings: one set for all, or (Gemma 3) ``rope_parameters`` holding one
    set per layer type."""
    default = rope_settings(cfg)
    params = cfg.get("rope_parameters")
    if not (isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()) and params):
        return (default,) * len(layer_types)
    by_type = {kind: rope_settings({"rope_parameters": settings}) for kind, settings in params.items()}
    return tuple(by_type.get(kind, default) for kind in layer_types)


def sliding_windows(cfg: dict[str, Any], layer_types: list[str]) -> tuple[int | None, ...]:
    """``sliding_window`` on the layers of type ``sliding_attention``, None (full attention) elsewhere."""
    window = cfg.get("sliding_window")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
