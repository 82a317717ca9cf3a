"""Rotary position embedding, NeoX style (rotate halves), full or partial.

``cos_sin_cache``: ``[max_positions, rotary_dim]``, cosines in the first half of the last dim and
sines in the second; scaled variants (linear, dynamic NTK, llama3) are baked into that cache.
Only the first ``rotary_dim`` features of each head rotate (``rotary_dim < head_dim`` is partial
rotary, as Phi-2 uses); the rest pass through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton


def apply_rotary_reference(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` ``[T, heads, head_dim]`` and ``key`` ``[T, kv_heads, head_dim]`` in place.

    Where the keys' heads follow the queries' in memory with the same strides (slices of a fused
    QKV projection), both rotate as one tensor: on the CPU, where this path serves, a layer's
    rotary is a dozen small ops, and doing them once instead of twice takes about half its time at
    1 to 16 tokens. The same products either way, so the same bits."""
    cos_sin = cos_sin_cache[positions.long()].float()  # [T, rotary_dim]
    half = rotary_dim // 2
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    heads = _heads_together(query, key)
    for x in (query, key) if heads is None else (heads,):
        first, second = x[..., :half], x[..., half:rotary_dim]
        first32, second32 = first.float(), second.float()
        rotated_first = first32 * cos - second32 * sin
        rotated_second = second32 * cos + first32 * sin
        first.copy_(rotated_first)  # rounds to x's dtype as .to() would
        second.copy_(rotated_second)
    return query, key


def _heads_together(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """``[T, heads + kv_heads, head_dim]``, a view of the queries' and keys' heads, where the keys'
    heads continue the queries' in memory (the same strides, the first key head one head stride
    after the last query head); else None."""
    tokens, heads, head_dim = query.shape
    if query.dtype != key.dtype or query.device != key.device or key.shape[::2] != (tokens, head_dim):
        return None
    if tokens == 0 or heads == 1 or query.untyped_storage().data_ptr() != key.untyped_storage().data_ptr():
        return None
    # a stride along a dimension of size 1 is arbitrary (a view of one token may report another)
    if query.stride(2) != key.stride(2) or (tokens > 1 and query.stride(0) != key.stride(0)):
        return None
    if key.shape[1] > 1 and key.stride(1) != query.stride(1):
        return None
    if key.storage_offset() != query.storage_offset() + heads * query.stride(1):
        return None
    return query.as_strided((tokens, heads + key.shape[1], head_dim), query.stride())


@triton.jit
def _cos_sin(positions_ptr, token, cos_sin_ptr, stride_cos_sin, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The cosines and sines of ``token``'s position, float32, ``[1, BLOCK_HALF]``."""
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + dims, mask=dim_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + dims, mask=dim_mask, other=0.0)
    return cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]


@triton.jit
def _rotate_pair(x1, x2, cos, sin):
    """Both rotated halves in float32. Every rotary kernel goes through this one expression and is
    launched without FMA contraction (``enable_fp_fusion=False``: each product rounded, as torch's
    separate operations round them), so fused and unfused kernels give the same bits on any GPU."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _mul_rn(a, b):
    """float32 ``a * b`` rounded on its own: PTX ``mul.rn`` is never contracted into an FMA (and,
    unlike libdevice's ``mul_rn``, keeps subnormals, as a plain multiply does)."""
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _rotate_pair_rounded(x1, x2, cos, sin, ROUNDED: tl.constexpr):
    """`_rotate_pair` inside a kernel compiled with FMA contraction (the small-batch GEMV's):
    ``ROUNDED`` rounds each product on its own, which gives the bits of `_rotate_pair` compiled
    without contraction. The interpreter runs no PTX and never contracts: there ``ROUNDED`` is
    False and the products are plain."""
    if ROUNDED:
        return _mul_rn(x1, cos) - _mul_rn(x2, sin), _mul_rn(x2, cos) + _mul_rn(x1, sin)
    return _rotate_pair(x1, x2, cos, sin)


@triton.jit
def _rotate_heads(
    x_ptr, token, num_heads, stride_token, stride_head, cos, sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate the first ``2 * HALF`` features of every head of one token, in place."""
    dims = tl.arange(0, BLOCK_HALF)
    for head_start in range(0, num_heads, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
        ptrs = x_ptr + token * stride_token + heads[:, None] * stride_head + dims[None, :]
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        rotated1, rotated2 = _rotate_pair(x1, x2, cos, sin)
        tl.store(ptrs, rotated1.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + HALF, rotated2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, query_ptr, key_ptr, cos_sin_ptr,
    num_heads, num_kv_heads, stride_q_token, stride_q_head, stride_k_token, stride_k_head,
    stride_cos_sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One token per program: its queries and keys, all heads."""
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, token, cos_sin_ptr, stride_cos_sin, HALF, BLOCK_HALF)
    _rotate_heads(query_ptr, token, num_heads, stride_q_token, stride_q_head, cos, sin,
                  HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(key_ptr, token, num_kv_heads, stride_k_token, stride_k_head, cos, sin,
                  HALF, BLOCK_H, BLOCK_HALF)


def apply_rotary_triton(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotary, in place on ``query`` and ``key`` (strided views such as slices of a fused
    QKV projection are fine as long as the last dim is contiguous)."""
    if rotary_dim % 2 or rotary_dim > query.shape[-1]:
        raise ValueError(f"rotary_dim must be even and <= head_dim, got {rotary_dim}")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("apply_rotary needs a contiguous last dim in query, key and cos_sin_cache")
    num_tokens = positions.shape[0]
    if num_tokens == 0:
        return query, key
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(query.shape[1], key.shape[1])), 4096 // block_half))
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache,
        query.shape[1], key.shape[1], query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        cos_sin_cache.stride(0),
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
        enable_fp_fusion=False,  # no FMA contraction: the same bits in every rotary kernel and torch
    )
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
