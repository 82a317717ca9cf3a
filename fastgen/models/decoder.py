"""The decoder every family runs, assembled from the shared layers by the options of a
`ModelConfig` (which a family's adapter reads from its ``config.json``).

A layer is attention and a feed-forward block around the residual stream, in one of three shapes:

- ``sequential`` (pre-norm): ``x + attn(norm(x))``, then ``+ mlp(norm(.))`` (Llama and most); with
  ``sandwich_norms`` each block's output is normalized too before it joins the stream (Gemma 2/3);
- ``parallel``: ``x + attn(norm(x)) + mlp(norm(x))``, one norm for both or one each (Phi, Falcon);
- ``post_norm``: ``norm(x + attn(x))``, then ``norm(. + mlp(.))`` (OPT-350m).

Pre-norm layers return their output and the running residual apart; the next norm adds them
(fused in the norm kernel; for decode-sized rows an RMSNorm and its add run inside the linear after
it, see `RMSNorm.into_linear`). The module names are the canonical checkpoint names (Llama's).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fastgen import kernels
from fastgen.layers.attention import ForwardBatch, PagedAttention
from fastgen.layers.embedding import LMHead, PositionEmbedding, VocabParallelEmbedding
from fastgen.layers.linear import (
    QKVParallelLinear,
    ReplicatedLinear,
    RMSNormInput,
    RowParallelLinear,
    small_batch,
)
from fastgen.layers.mlp import MLP, GatedMLP
from fastgen.layers.moe import MoE
from fastgen.layers.norm import LayerNorm, RMSNorm
from fastgen.layers.parallel import TensorParallel
from fastgen.layers.rotary import LogLengthScaling, RotaryEmbedding

from .config import ModelConfig


def make_norm(config: ModelConfig, size: int | None = None) -> nn.Module:
    size = size or config.hidden_size
    if config.norm == "layer":
        return LayerNorm(size, config.norm_eps)
    return RMSNorm(size, config.norm_eps, weight_offset=config.norm_weight_offset)


class Attention(nn.Module):
    """QKV projection, optional q/k head norms, rotary, optional log-length query scaling, paged
    attention, output projection."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int, layer: int):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
            bias=config.qkv_bias, tp=tp,
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, bias=config.o_proj_bias, tp=tp
        )
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps, weight_offset=config.norm_weight_offset)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps, weight_offset=config.norm_weight_offset)
        self.rotary = None
        if config.rotary_dim:
            theta, scaling = config.layer_rope[layer]
            self.rotary = RotaryEmbedding(
                config.rotary_dim, base=theta, max_positions=config.max_position_embeddings,
                max_model_len=max_model_len, scaling=scaling,
            )  # fmt: skip
        self.logn = None
        if config.logn_base_length:
            self.logn = LogLengthScaling(config.logn_base_length, max(max_model_len, config.logn_base_length))
        self.attn = PagedAttention(
            self.qkv_proj.num_local_heads,
            self.qkv_proj.num_local_kv_heads,
            config.head_dim,
            scale=config.attention_scale,
            sliding_window=config.layer_sliding_windows[layer],
            softcap=config.attention_softcap,
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor | RMSNormInput, batch: ForwardBatch
    ) -> torch.Tensor:
        q_size = self.qkv_proj.q_size
        write = self._rotary_kv_write(positions, hidden, batch)
        if write is not None:  # one kernel projects, rotates and fills the cache
            q, _, _ = write.split(self.qkv_proj.forward_rotary_kv(hidden, write))
            return self.o_proj(self.attn.attend_cached(q, batch).view(-1, q_size))
        qkv = self.qkv_proj(hidden)
        kv_size = self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.attn.num_heads, self.head_dim)
        k = k.view(-1, self.attn.num_kv_heads, self.head_dim)
        v = v.view(-1, self.attn.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        # the attention's cache write can apply the rotary too (one kernel for two), unless the
        # queries must be scaled after it
        fused_rotary = self.rotary if self.logn is None and self.attn.fuses_rotary(q) else None
        if self.rotary is not None and fused_rotary is None:
            q, k = self.rotary(positions, q, k)
        if self.logn is not None:
            self.logn(positions, q)
        out = self.attn(q, k, v, batch, rotary=fused_rotary)
        return self.o_proj(out.view(-1, q_size))

    def _rotary_kv_write(
        self, positions: torch.Tensor, hidden: torch.Tensor | RMSNormInput, batch: ForwardBatch
    ) -> kernels.RotaryKVWrite | None:
        """What the QKV projection needs to rotate and write the cache itself (the ``qkv_rotary``
        fusion), where it may: decode-sized rows on the Triton kernels, a full rotary and nothing
        between the projection and the attention (no q/k norms, no log-length scaling)."""
        rows = hidden.hidden if isinstance(hidden, RMSNormInput) else hidden
        rotary = self.rotary
        if (
            rotary is None or rotary.rotary_dim != self.head_dim or self.q_norm is not None
            or self.logn is not None or not small_batch(rows) or kernels.reference_forced()
            or not kernels.fusion_enabled("qkv_rotary", rows.shape[0])
        ):  # fmt: skip
            return None
        return kernels.RotaryKVWrite(
            positions, batch.slot_mapping, rotary.cos_sin_cache, self.attn.key_cache, self.attn.value_cache,
            self.attn.num_heads, self.attn.num_kv_heads, self.head_dim,
        )  # fmt: skip


def make_feed_forward(config: ModelConfig, tp: TensorParallel) -> nn.Module:
    if config.num_experts:
        experts, top_k = config.num_experts, config.num_experts_per_tok
        return MoE(config.hidden_size, config.intermediate_size, experts, top_k, tp=tp)
    mlp_type = GatedMLP if config.gated_mlp else MLP
    return mlp_type(
        config.hidden_size, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias, tp=tp
    )


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int, layer: int):
        super().__init__()
        self.block = config.block
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, tp, max_model_len, layer)
        parallel = config.block == "parallel"
        self.post_attention_layernorm = None if parallel else make_norm(config)
        self.mlp_layernorm = make_norm(config) if parallel and config.parallel_norms == 2 else None
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)
        # the checkpoint's name of a mixture of experts (Mixtral's)
        self.feed_forward_name = "block_sparse_moe" if config.num_experts else "mlp"
        self.add_module(self.feed_forward_name, make_feed_forward(config, tp))
        # each RMSNorm of a pre-norm layer can be left to the linear after it (qkv_proj, the
        # feed-forward's first): the norm_linear fusion, see `RMSNorm.into_linear`
        self.norms_into_linears = (
            self.block == "sequential" and not self.sandwich
            and isinstance(self.input_layernorm, RMSNorm)
            and isinstance(self.post_attention_layernorm, RMSNorm)
            and isinstance(self.feed_forward, (GatedMLP, MLP))
        )  # fmt: skip

    @property
    def feed_forward(self) -> nn.Module:
        return getattr(self, self.feed_forward_name)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, residual): the layer's input is ``hidden + residual`` (``hidden`` alone when
        ``residual`` is None), its output ``output + residual``."""
        if self.block == "post_norm":
            if residual is not None:
                hidden = hidden + residual
            hidden, _ = self.input_layernorm(self.self_attn(positions, hidden, batch), hidden)
            hidden, _ = self.post_attention_layernorm(self.feed_forward(hidden), hidden)
            return hidden, None
        into_linears = (
            self.norms_into_linears
            and small_batch(hidden)
            and kernels.fusion_enabled("norm_linear", hidden.shape[0])
        )
        if into_linears:
            normed, residual = self.input_layernorm.into_linear(hidden, residual)
        elif residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        attention = self.self_attn(positions, normed, batch)
        if self.block == "parallel":
            mlp_input = normed if self.mlp_layernorm is None else self.mlp_layernorm(residual)
            return attention + self.feed_forward(mlp_input), residual
        if self.sandwich:
            attention = self.post_attention_layernorm(attention)
            hidden, residual = self.pre_feedforward_layernorm(attention, residual)
            return self.post_feedforward_layernorm(self.feed_forward(hidden)), residual
        if into_linears:
            hidden, residual = self.post_attention_layernorm.into_linear(attention, residual)
        else:
            hidden, residual = self.post_attention_layernorm(attention, residual)
        return self.feed_forward(hidden), residual


class DecoderModel(nn.Module):
    """Embeddings (tokens, optionally learned positions and a projection in), the layers, the final
    norm (and projection out)."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int):
        super().__init__()
        embedding_dim = config.embedding_dim or config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, embedding_dim, tp=tp, multiplier=config.embedding_multiplier
        )
        self.project_in = self.project_out = None
        if embedding_dim != config.hidden_size:
            self.project_in = ReplicatedLinear(embedding_dim, config.hidden_size)
            self.project_out = ReplicatedLinear(config.hidden_size, embedding_dim)
        self.embed_positions = None
        if config.learned_position_offset is not None:
            self.embed_positions = PositionEmbedding(
                config.max_position_embeddings, config.hidden_size, offset=config.learned_position_offset
            )
        self.layers = nn.ModuleList(
            DecoderLayer(config, tp, max_model_len, layer) for layer in range(config.num_layers)
        )
        self.norm = make_norm(config) if config.final_norm else None

    def forward(self, token_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(token_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(batch.positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(batch.positions, hidden, residual, batch)
        if self.norm is not None:
            hidden, _ = self.norm(hidden, residual)
        elif residual is not None:
            hidden = hidden + residual
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class CausalLM(nn.Module):
    """A decoder-only causal LM over the paged KV cache."""

    # canonical checkpoint projection name -> (our fused parameter's module, shard id)
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, tp: TensorParallel, max_model_len: int):
        super().__init__()
        if config.max_context is not None and max_model_len > config.max_context:
            from fastgen.errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"max_model_len={max_model_len} exceeds the {config.max_context} tokens fastgen implements "
                f"for this {config.model_type} model ({config.max_context_reason}); set max_model_len <= "
                f"{config.max_context}"
            )
        self.config = config
        # the experts' reference loop routes on the host: no graphs when the kernels are off
        self.supports_cuda_graphs = not (config.num_experts and kernels.reference_forced())
        self.model = DecoderModel(config, tp, max_model_len)
        self.lm_head = LMHead(
            self.model.embed_tokens, tie_weights=config.tie_word_embeddings, bias=config.lm_head_bias
        )

    def forward(self, token_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states ``[num_tokens, hidden]`` of the step's tokens."""
        return self.model(token_ids, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

