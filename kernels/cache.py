"""Writing a step's new keys and values into their slots of the paged cache.

``slot_mapping[i] = block * block_size + offset`` for token ``i``; a negative slot (padding in a
CUDA graph batch) is skipped.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the caches."""
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(value_cache.dtype)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter the step's keys and values into the paged cache."""
    impl = write_kv_cache_triton if use_triton(key) else write_kv_cache_reference
    impl(key, value, key_cache, value_cache, slot_mapping)
