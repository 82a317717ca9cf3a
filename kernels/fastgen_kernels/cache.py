"""Writing a step's new keys and values into their slots of the paged cache.

``slot_mapping[i] = block * block_size + offset`` for token ``i``; a negative slot (padding in a
CUDA graph batch) is skipped. A float8 e4m3 cache (``kv_cache_dtype="fp8"``) takes the values
clamped to +-448 and rounded to nearest (no scale).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from .quant import FP8, _saturate_to_e4m3, saturate_to_fp8


def _to_cache(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    return saturate_to_fp8(x) if cache.dtype == FP8 else x.to(cache.dtype)


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the caches."""
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    on_cpu = slot_mapping.device.type == "cpu" and key_cache.dtype != FP8  # no index_copy_ for float8
    if on_cpu and (slot_mapping.numel() == 0 or int(slot_mapping.min()) >= 0):
        # no padding (the CPU runs no CUDA graphs): one copy per cache, without the masks' five
        # small ops (the min is cheap on the host, and would sync on a device)
        slots = slot_mapping.long()
        key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, _to_cache(key, key_cache))
        value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, _to_cache(value, value_cache))
        return
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = _to_cache(key[valid], key_cache)
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = _to_cache(value[valid], value_cache)


@triton.jit
def _cast_for_cache(x, cache_ptr, TO_FP8: tl.constexpr):
    """``x`` (in the activations' dtype) as the cache stores it; shared with the fused rotary
    write (``rotary_kv``) so that both round alike."""
    if TO_FP8:
        x = _saturate_to_e4m3(x.to(tl.float32))
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    num_kv_heads, head_dim,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TO_FP8: tl.constexpr,
):
    """One token per program: copy its keys and values (all KV heads) into its slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim)
    key = tl.load(key_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :],
                  mask=mask)
    value = tl.load(value_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :],
                    mask=mask)
    tl.store(key_cache_ptr + slot * stride_kc_slot + heads[:, None] * stride_kc_head + dims[None, :],
             _cast_for_cache(key, key_cache_ptr, TO_FP8), mask=mask)
    tl.store(value_cache_ptr + slot * stride_vc_slot + heads[:, None] * stride_vc_head + dims[None, :],
             _cast_for_cache(value, value_cache_ptr, TO_FP8), mask=mask)


def check_write_layout(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> None:
    """What the Triton writes need: contiguous last dims, and a cache slot's stride that
    addresses every (block, offset) pair (the kernels index ``slot``, not the two)."""
    for name, tensor in (("key", key), ("value", value), ("key_cache", key_cache),
                         ("value_cache", value_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"write_kv_cache needs a contiguous last dim in {name}")
    if key_cache.stride(0) != key_cache.shape[1] * key_cache.stride(1):
        raise ValueError("key_cache blocks must be laid out contiguously ([num_blocks, block_size, ...])")
    if value_cache.stride(0) != value_cache.shape[1] * value_cache.stride(1):
        raise ValueError("value_cache blocks must be laid out contiguously ([num_blocks, block_size, ...])")


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton scatter of the step's keys and values; strided ``key``/``value`` views are fine."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    check_write_layout(key, value, key_cache, value_cache)
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping, num_kv_heads, head_dim,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(1), key_cache.stride(2), value_cache.stride(1), value_cache.stride(2),
        BLOCK_H=block_h, BLOCK_D=block_d, TO_FP8=key_cache.dtype == FP8, num_warps=4,
    )


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
