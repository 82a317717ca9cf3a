"""Llama 1/2/3 and the models that differ from it in details read from their config: Mistral
(sliding-window attention), Mixtral (Mistral with a mixture of experts for the MLP), Qwen2 (q/k/v
biases, optional per-layer sliding windows), Qwen3 (RMSNorm over each query and key head before
rotary), Gemma (GeGLU, RMSNorm scaling by 1 + weight, embeddings scaled by sqrt(hidden)) and
Gemma 2 (Gemma with soft-capped attention scores and logits, sliding windows on every other layer,
and norms after attention and around the MLP) and Gemma 3 text models (Gemma 2 without the caps,
with q/k head norms and rotary settings per layer type)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fastgen import kernels
from fastgen.layers.attention import ForwardBatch, PagedAttention
from fastgen.layers.embedding import LMHead, VocabParallelEmbedding
from fastgen.layers.linear import QKVParallelLinear, RowParallelLinear
from fastgen.layers.mlp import GatedMLP
from fastgen.layers.moe import MoE
from fastgen.layers.norm import RMSNorm
from fastgen.layers.parallel import TensorParallel
from fastgen.layers.rotary import RotaryEmbedding

from .config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int, layer: int):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.qkv_bias,
            tp=tp,
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, bias=config.o_proj_bias, tp=tp
        )
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps, weight_offset=config.norm_weight_offset)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps, weight_offset=config.norm_weight_offset)
        self.rotary = RotaryEmbedding(
            config.rotary_dim,
            base=config.layer_rope[layer][0],
            max_positions=config.max_position_embeddings,
            max_model_len=max_model_len,
            scaling=config.layer_rope[layer][1],
        )
        self.head_dim = config.head_dim
        self.attn = PagedAttention(
            self.qkv_proj.num_local_heads,
            self.qkv_proj.num_local_kv_heads,
            config.head_dim,
            scale=config.attention_scale,
            sliding_window=config.layer_sliding_windows[layer],
            softcap=config.attention_softcap,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.attn.num_heads, self.head_dim)
        k = k.view(-1, self.attn.num_kv_heads, self.head_dim)
        v = v.view(-1, self.attn.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, batch)
        return self.o_proj(out.view(-1, q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int, layer: int):
        super().__init__()
        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.norm_eps, weight_offset=config.norm_weight_offset)

        self.input_layernorm = norm()
        self.self_attn = LlamaAttention(config, tp, max_model_len, layer)
        self.post_attention_layernorm = norm()
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.moe = bool(config.num_experts)
        if self.moe:
            self.block_sparse_moe = MoE(
                config.hidden_size,
                config.intermediate_size,
                config.num_experts,
                config.num_experts_per_tok,
                tp=tp,
            )
        else:
            self.mlp = GatedMLP(
                config.hidden_size,
                config.intermediate_size,
                act=config.hidden_act,
                bias=config.mlp_bias,
                tp=tp,
            )

    @property
    def feed_forward(self) -> nn.Module:
        return self.block_sparse_moe if self.moe else self.mlp

    def forward(self, positions, hidden, residual, batch: ForwardBatch):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        if self.sandwich:  # norms on both sides of each block's output before it joins the residual
            hidden = self.post_attention_layernorm(hidden)
            hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
            return self.post_feedforward_layernorm(self.feed_forward(hidden)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.feed_forward(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp=tp, multiplier=config.embedding_multiplier
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, tp, max_model_len, layer) for layer in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, weight_offset=config.norm_weight_offset)

    def forward(self, token_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return run_decoder(self.embed_tokens, self.layers, self.norm, token_ids, batch)


def run_decoder(
    embed: nn.Module,
    layers: nn.ModuleList,
    final_norm: nn.Module,
    token_ids: torch.Tensor,
    batch: ForwardBatch,
) -> torch.Tensor:
    """Embed, run the layers (each returns its output and the running residual, which the next
    layer's norm adds in), and normalize the sum at the end."""
    hidden = embed(token_ids)
    residual = None
    for layer in layers:
        hidden, residual = layer(batch.positions, hidden, residual, batch)
    hidden, _ = final_norm(hidden, residual)
    return hidden


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over the paged KV cache."""

    # checkpoint projection name -> (our fused parameter's module, shard id)
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int):
        super().__init__()
        self.config = config
        # the experts' reference loop routes on the host: no graphs when the kernels are off
        self.supports_cuda_graphs = not (config.num_experts and kernels.reference_forced())
        self.model = LlamaModel(config, tp, max_model_len)
        self.lm_head = LMHead(self.model.embed_tokens, tie_weights=config.tie_word_embeddings)

    def forward(self, token_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states ``[num_tokens, hidden]`` of the step's tokens."""
        return self.model(token_ids, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
