"""Attention over the paged KV cache, and the per-step batch description it reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastgen import kernels
from fastgen.layers.rotary import RotaryEmbedding


@dataclass
class ForwardBatch:
    """The ragged batch of one step, as tensors on the model's device.

    Tokens of all sequences are flattened in chunk order; ``query_start`` delimits them and
    ``context_lens`` counts each sequence's cached tokens including this step's.
    """

    positions: torch.Tensor  # int64 [num_tokens]
    slot_mapping: torch.Tensor  # int64 [num_tokens], block * block_size + offset; -1 = padding
    query_start: torch.Tensor  # int32 [num_seqs + 1]
    context_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    max_query_len: int
    max_context_len: int
    num_decodes: int = 0  # the first sequences that have one query token (see kernels.paged_attention)
    # on the CPU, how the step's attention is batched: made once per step, shared by every layer
    cpu_attention_plan: kernels.attention.CpuAttentionPlan | None = None


class PagedAttention(nn.Module):
    """Writes the step's keys/values to the cache, then attends over the cache.

    Given the layer's rotary embedding (when :meth:`fuses_rotary` says so), the write applies it
    too: one kernel rotates the queries in place and writes the rotated keys (``k`` itself stays
    unrotated: only the cache is read afterwards).

    The runner assigns ``key_cache`` / ``value_cache`` (``[num_blocks, block_size, kv_heads,
    head_dim]``) after it sizes the cache.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """``q``: [T, heads, d]; ``k``, ``v``: [T, kv_heads, d]; returns [T, heads, d]."""
        return self.attend(q, k, v, batch, rotary=rotary)

    @staticmethod
    def fuses_rotary(q: torch.Tensor) -> bool:
        """Whether the rotary is better left to :meth:`attend`: with the Triton kernels (on CUDA),
        where the ``rotary_kv`` fusion serves a step of ``q``'s rows (see ``fusion_enabled``). On
        the CPU the separate references stay, as they were."""
        if not q.is_cuda or kernels.reference_forced():
            return False
        return kernels.fusion_enabled("rotary_kv", q.shape[0])

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        out: torch.Tensor | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """Write this step's keys/values to the cache, then attend (into ``out`` when given).

        With ``rotary``, ``q`` and ``k`` come unrotated: ``q`` is rotated in place by
        ``batch.positions`` and the keys are rotated on their way into the cache."""
        if rotary is None:
            kernels.write_kv_cache(k, v, self.key_cache, self.value_cache, batch.slot_mapping)
        else:
            kernels.rotary_and_write_kv_cache(
                batch.positions, q, k, v, self.key_cache, self.value_cache, batch.slot_mapping,
                rotary.cos_sin_cache, rotary.rotary_dim,
            )  # fmt: skip
        return self.attend_cached(q, batch, out)

    def attend_cached(
        self, q: torch.Tensor, batch: ForwardBatch, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend over the cache as it is: this step's keys and values are in it already (written
        by :meth:`attend`, or by the QKV projection's epilogue, the ``qkv_rotary`` fusion)."""
        return kernels.paged_attention(
            q,
            self.key_cache,
            self.value_cache,
            batch.query_start,
            batch.context_lens,
            batch.block_tables,
            scale=self.scale,
            sliding_window=self.sliding_window,
            max_query_len=batch.max_query_len,
            max_context_len=batch.max_context_len,
            num_decodes=batch.num_decodes,
            out=out,
            softcap=self.softcap,
            cpu_plan=batch.cpu_attention_plan,
        )
