"""Phi-1.5 / Phi-2: attention and MLP side by side on one LayerNorm's output, partial rotary,
biases everywhere (LM head too), GELU (tanh) MLP. The attention is the Llama family's."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fastgen.layers.attention import ForwardBatch
from fastgen.layers.embedding import LMHead, VocabParallelEmbedding
from fastgen.layers.mlp import MLP
from fastgen.layers.norm import LayerNorm
from fastgen.layers.parallel import TensorParallel

from .config import ModelConfig
from .llama import LlamaAttention, run_decoder


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int, layer: int):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, tp, max_model_len, layer)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, act=config.hidden_act, bias=True, tp=tp)

    def forward(self, positions, hidden, residual, batch: ForwardBatch):
        # the layer's input is hidden + residual; the add is fused into the norm
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        return self.self_attn(positions, normed, batch) + self.mlp(normed), residual


class PhiModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp=tp)
        self.layers = nn.ModuleList(
            PhiDecoderLayer(config, tp, max_model_len, layer) for layer in range(config.num_layers)
        )
        self.final_layernorm = LayerNorm(config.hidden_size, config.norm_eps)

    def forward(self, token_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return run_decoder(self.embed_tokens, self.layers, self.final_layernorm, token_ids, batch)


class PhiForCausalLM(nn.Module):
    """Phi causal LM over the paged KV cache."""

    packed_modules: ClassVar[dict[str, tuple[str, str | int | None]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "dense": ("o_proj", None),  # the checkpoint's name for the attention output projection
    }

    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int):
        super().__init__()
        self.config = config
        self.model = PhiModel(config, tp, max_model_len)
        self.lm_head = LMHead(self.model.embed_tokens, tie_weights=config.tie_word_embeddings, bias=True)

    def forward(self, token_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states ``[num_tokens, hidden]`` of the step's tokens."""
        return self.model(token_ids, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
