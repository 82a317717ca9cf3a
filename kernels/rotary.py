"""Rotary position embedding, NeoX style (rotate halves), full or partial.

``cos_sin_cache``: ``[max_positions, rotary_dim]``, cosines in the first half of the last dim and
sines in the second; scaled variants (linear, dynamic NTK, llama3) are baked into that cache.
Only the first ``rotary_dim`` features of each head rotate (``rotary_dim < head_dim`` is partial
rotary, as Phi-2 uses); the rest pass through.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    half = rotary_dim // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:rotary_dim].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def apply_rotary_reference(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` ``[T, heads, head_dim]`` and ``key`` ``[T, kv_heads, head_dim]`` in place."""
    cos_sin = cos_sin_cache[positions.long()].float()  # [T, rotary_dim]
    half = rotary_dim // 2
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    query.copy_(_rotate(query, cos, sin, rotary_dim))
    key.copy_(_rotate(key, cos, sin, rotary_dim))
    return query, key


def apply_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys in place by their positions; returns them."""
    impl = apply_rotary_triton if use_triton(query) else apply_rotary_reference
    return impl(positions, query, key, cos_sin_cache, rotary_dim)
