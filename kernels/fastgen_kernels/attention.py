"""Paged attention over a ragged batch that mixes decodes and prompt chunks.

Layout shared by the reference and the Triton kernel:

- ``query``: ``[num_tokens, num_heads, head_dim]``, the step's tokens of all sequences, flattened
  in sequence order.
- ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``; the step's
  own keys and values are already written (see ``fastgen.kernels.cache``).
- ``query_start``: int32 ``[num_seqs + 1]``, offsets of each sequence's tokens in ``query``.
- ``context_lens``: int32 ``[num_seqs]``, tokens in the cache for each sequence *including* this
  step's tokens, so query token ``i`` of a sequence with ``q`` query tokens sits at position
  ``context_len - q + i`` and attends to positions ``<=`` its own (causal).
- ``block_tables``: int32 ``[num_seqs, max_blocks_per_seq]``; entries past a sequence's last block
  are ignored.
- ``sliding_window``: when set, a query at position ``p`` sees keys at positions ``> p - window``.

- ``num_decodes``: the caller guarantees that the first ``num_decodes`` sequences have exactly one
  query token each (a Dynamic SplitFuse step puts its decodes first). Not checked (that would sync
  with the device); a wrong value gives wrong outputs. The Triton path then runs a mixed step as a
  decode-only launch plus a launch for the rest, each with its own tile config; ``0`` (the default)
  keeps the whole batch in one launch. Results are the same either way; the reference ignores it.

The Triton path (``paged_attention_triton``, kernels in ``attention_triton.py``) serves the ragged
batch with one launch, or two with ``num_decodes``; see that module for the work decomposition.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton
from .attention_triton import paged_attention_triton


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
    num_decodes: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch paged attention, one sequence at a time (also the CPU backend)."""
    del max_query_len, max_context_len, num_decodes  # shape the Triton launches; not needed here
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    starts = query_start.tolist()
    lens = context_lens.tolist()
    for seq, context_len in enumerate(lens):
        q_begin, q_end = starts[seq], starts[seq + 1]
        query_len = q_end - q_begin
        if query_len == 0:
            continue
        num_blocks = -(-context_len // block_size)
        blocks = block_tables[seq, :num_blocks].long()
        keys = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
        values = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        q = query[q_begin:q_end].transpose(0, 1).float()  # [heads, q, d]
        scores = torch.matmul(q, keys.permute(1, 2, 0).float()) * scale  # [heads, q, ctx]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        query_pos = torch.arange(context_len - query_len, context_len, device=query.device)
        key_pos = torch.arange(context_len, device=query.device)
        allowed = key_pos[None, :] <= query_pos[:, None]
        if sliding_window is not None:
            allowed &= key_pos[None, :] > query_pos[:, None] - sliding_window
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        result = torch.matmul(probs, values.transpose(0, 1).float())  # [heads, q, d]
        out[q_begin:q_end] = result.transpose(0, 1).to(out.dtype)
    return out


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
    num_decodes: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of a ragged batch against the paged cache (Triton on CUDA, reference elsewhere).

    ``num_decodes``: the first ``num_decodes`` sequences have one query token each (the caller's
    promise, see the module docstring); lets the Triton path launch decodes and chunks apart.
    """
    impl = paged_attention_triton if use_triton(query) else paged_attention_reference
    return impl(
        query, key_cache, value_cache, query_start, context_lens, block_tables,
        scale=scale, sliding_window=sliding_window, max_query_len=max_query_len,
        max_context_len=max_context_len, out=out, num_decodes=num_decodes, softcap=softcap,
    )
