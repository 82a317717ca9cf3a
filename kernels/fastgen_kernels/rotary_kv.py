"""Rotary embedding fused with the KV-cache write (the fusion named ``rotary_kv``).

The unfused pair is :func:`~.rotary.apply_rotary` (queries and keys in place) followed by
:func:`~.cache.write_kv_cache` (keys and values into their slots). Attention reads keys only from
the cache, so the fused kernel does not write the rotated keys back: ``query`` is rotated in place,
``key`` is left as it is, and its rotated copy goes straight into the cache. The math is the
unfused kernels' own (shared ``triton.jit`` helpers): rotation in float32, rounded to the
activations' dtype, then cast to the cache's as the write does (float8 e4m3 saturated), so the
query and the cache match the pair's to the bit. A negative slot (padding) writes nothing; its
query is rotated all the same, as ``apply_rotary`` rotates every token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from ._dispatch import use_triton
from .cache import _cast_for_cache, check_write_layout, write_kv_cache_reference
from .quant import FP8
from .rotary import _cos_sin, _rotate_heads, _rotate_pair, apply_rotary_reference


def rotary_and_write_kv_cache_reference(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
) -> torch.Tensor:
    """The unfused references composed: ``query`` rotated in place, the rotated keys (a copy;
    ``key`` keeps its values) and ``value`` written into the caches; returns ``query``."""
    rotated_key = key.clone()
    apply_rotary_reference(positions, query, rotated_key, cos_sin_cache, rotary_dim)
    write_kv_cache_reference(rotated_key, value, key_cache, value_cache, slot_mapping)
    return query


@triton.jit
def _write_rotated_kv(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, token, slot, num_kv_heads, head_dim,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head, cos, sin,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, TO_FP8: tl.constexpr,
):
    """One token's keys, rotated, and its values into cache slot ``slot``, all KV heads."""
    half_dims = tl.arange(0, BLOCK_HALF)
    dims = tl.arange(0, BLOCK_D)
    for head_start in range(0, num_kv_heads, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        head_mask = heads[:, None] < num_kv_heads
        key_row = key_ptr + token * stride_k_token + heads[:, None] * stride_k_head
        cache_row = key_cache_ptr + slot * stride_kc_slot + heads[:, None] * stride_kc_head
        mask = head_mask & (half_dims[None, :] < HALF)
        x1 = tl.load(key_row + half_dims[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(key_row + HALF + half_dims[None, :], mask=mask, other=0.0).to(tl.float32)
        rotated1, rotated2 = _rotate_pair(x1, x2, cos, sin)
        # rounded to the keys' dtype first: the unfused write reads the rotated keys from there
        rotated1 = _cast_for_cache(rotated1.to(key_ptr.dtype.element_ty), key_cache_ptr, TO_FP8)
        rotated2 = _cast_for_cache(rotated2.to(key_ptr.dtype.element_ty), key_cache_ptr, TO_FP8)
        tl.store(cache_row + half_dims[None, :], rotated1, mask=mask)
        tl.store(cache_row + HALF + half_dims[None, :], rotated2, mask=mask)
        if BLOCK_PASS > 0:  # partial rotary: features past 2 * HALF pass through
            pass_dims = 2 * HALF + tl.arange(0, BLOCK_PASS)
            pass_mask = head_mask & (pass_dims[None, :] < head_dim)
            unrotated = tl.load(key_row + pass_dims[None, :], mask=pass_mask)
            tl.store(cache_row + pass_dims[None, :], _cast_for_cache(unrotated, key_cache_ptr, TO_FP8),
                     mask=pass_mask)
        value_mask = head_mask & (dims[None, :] < head_dim)
        value = tl.load(value_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :],
                        mask=value_mask)
        tl.store(value_cache_ptr + slot * stride_vc_slot + heads[:, None] * stride_vc_head + dims[None, :],
                 _cast_for_cache(value, value_cache_ptr, TO_FP8), mask=value_mask)


@triton.jit
def _rotary_kv_kernel(
    positions_ptr, query_ptr, key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    cos_sin_ptr, num_heads, num_kv_heads, head_dim,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head, stride_cos_sin,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H_Q: tl.constexpr, BLOCK_H_KV: tl.constexpr, TO_FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Two programs per token, side by side: ``(token, 0)`` rotates its queries in place,
    ``(token, 1)`` writes its rotated keys and its values into its slot."""
    pdl.enter(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, token, cos_sin_ptr, stride_cos_sin, HALF, BLOCK_HALF)
    if tl.program_id(1) == 0:
        _rotate_heads(query_ptr, token, num_heads, stride_q_token, stride_q_head, cos, sin,
                      HALF, BLOCK_H_Q, BLOCK_HALF)
    else:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:
            _write_rotated_kv(
                key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, token, slot, num_kv_heads, head_dim,
                stride_k_token, stride_k_head, stride_v_token, stride_v_head,
                stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head, cos, sin,
                HALF, BLOCK_HALF, BLOCK_PASS, BLOCK_D, BLOCK_H_KV, TO_FP8,
            )


def rotary_and_write_kv_cache_triton(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
) -> torch.Tensor:
    """One launch for :func:`rotary_and_write_kv_cache_reference`; ``query``, ``key`` and
    ``value`` may be strided views (slices of a fused QKV projection) with a contiguous last dim."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and <= head_dim, got {rotary_dim}")
    if query.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_and_write_kv_cache needs a contiguous last dim in query and cos_sin_cache")
    check_write_layout(key, value, key_cache, value_cache)
    if num_tokens == 0:
        return query
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_d = triton.next_power_of_2(head_dim)
    block_pass = triton.next_power_of_2(head_dim - rotary_dim) if rotary_dim < head_dim else 0
    num_heads = query.shape[1]
    _rotary_kv_kernel[(num_tokens, 2)](
        positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache,
        num_heads, num_kv_heads, head_dim,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(1), key_cache.stride(2), value_cache.stride(1), value_cache.stride(2),
        cos_sin_cache.stride(0),
        HALF=half, BLOCK_HALF=block_half, BLOCK_PASS=block_pass, BLOCK_D=block_d,
        BLOCK_H_Q=max(1, min(triton.next_power_of_2(num_heads), 4096 // block_half)),
        BLOCK_H_KV=max(1, min(triton.next_power_of_2(num_kv_heads), 4096 // block_d)),
        TO_FP8=key_cache.dtype == FP8, num_warps=4, **pdl.launch_options(query.device),
        enable_fp_fusion=False,  # no FMA contraction: the same bits in every rotary kernel and torch
    )
    return query


def rotary_and_write_kv_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
) -> torch.Tensor:
    """Rotate ``query`` ``[T, heads, head_dim]`` in place by ``positions`` and write the rotated
    ``key`` and the ``value`` ``[T, kv_heads, head_dim]`` into the paged cache at ``slot_mapping``
    (``key`` itself is not rotated); returns ``query``."""
    impl = rotary_and_write_kv_cache_triton if use_triton(query) else rotary_and_write_kv_cache_reference
    return impl(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache, rotary_dim)
