"""A decode step's QKV projection with the rotary embedding and the KV-cache write in its
epilogue (the fusion named ``qkv_rotary``): one kernel where ``rotary_kv`` takes two (the
projection, then :func:`~.rotary_kv.rotary_and_write_kv_cache`).

The output rows of a fused QKV weight are [queries | keys | values], ``head_dim`` a head. The NeoX
rotary mixes feature ``j`` of a head with feature ``j + head_dim / 2``, so a program owns pairs: a
tile of ``BLOCK_N`` weight rows holds ``BLOCK_N / 2`` pairs of one head, interleaved (the product
loop loads each weight row on its own, so a tile need not be contiguous; it is the small-batch
GEMV's own loop, RMSNorm prologue included). The epilogue rounds the sums to the activations'
dtype as the GEMV stores them and rotates each pair in float32 as the rotary kernels do; query
pairs are stored rotated, key pairs are stored as they are (as ``rotary_kv`` leaves them) and go
rotated into their cache slot, value rows (plain tiles after the pairs) are stored and go into
the cache. Each product of the rotation is rounded on its own (``mul.rn``, which the compiler never
contracts into an FMA; the rotary kernels are compiled without contraction), so the output and the
cache equal the two-kernel path's bit for bit. A negative slot (padding) writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from .cache import _cast_for_cache, check_write_layout
from .fused_linear import RMSNormLinearResult, norm_prologue, rms_norm_linear, rms_norm_linear_reference
from .gemv import (
    NO_PROLOGUE,
    GemvConfig,
    Prologue,
    _applies,
    _product_tile,
    _rms_rows,
    choose_config_for,
    linear_small_batch,
    linear_small_batch_reference,
    product_arguments,
)
from .quant import FP8
from .rotary import _rotate_pair_rounded
from .rotary_kv import rotary_and_write_kv_cache, rotary_and_write_kv_cache_reference


@dataclass(frozen=True)
class RotaryKVWrite:
    """What the fused kernel rotates by and writes into: the step's positions and cache slots,
    the layer's rotary table (``[positions, rotary_dim]``; the kernel takes full rotary only) and
    caches, and its local head layout (the QKV weight has ``(num_heads + 2 * num_kv_heads) *
    head_dim`` rows)."""

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    cos_sin_cache: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def rotary_dim(self) -> int:
        return self.cos_sin_cache.shape[-1]

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[T, heads, head_dim]`` query, key and value views of the projection's rows."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))


@dataclass(frozen=True)
class NormArgs:
    """An RMSNorm the projection applies to its input first (the ``norm_linear`` prologue):
    ``rms_norm(x (+ residual), weight, eps)``, the new residual written into ``residual_out``."""

    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None


def _unfused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    write: RotaryKVWrite,
    norm: NormArgs | None,
    project: Callable[..., torch.Tensor],
    project_normed: Callable[..., RMSNormLinearResult],
    rotate: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """The projection (``project``, or ``project_normed`` with ``norm``), then ``rotate`` (the
    rotary and cache write) on its query, key and value views: the two-kernel path's shape."""
    if norm is None:
        qkv = project(x, weight, bias, weight_scale=weight_scale)
    else:
        qkv = project_normed(x, norm.weight, norm.eps, weight, bias, norm.residual, weight_scale,
                             norm.residual_out)
        if norm.residual is not None:
            qkv = qkv[0]
    q, k, v = write.split(qkv)
    rotate(write.positions, q, k, v, write.key_cache, write.value_cache, write.slot_mapping,
           write.cos_sin_cache, write.rotary_dim)
    return qkv


def qkv_rotary_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    write: RotaryKVWrite,
    norm: NormArgs | None = None,
) -> torch.Tensor:
    """The references composed: the projection (normalized first with ``norm``), then
    ``rotary_and_write_kv_cache_reference`` on its query, key and value views."""
    return _unfused(x, weight, bias, weight_scale, write, norm, linear_small_batch_reference,
                    rms_norm_linear_reference, rotary_and_write_kv_cache_reference)


@triton.jit
def _qkv_rotary_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, residual_ptr, residual_out_ptr, norm_weight_ptr, eps,
    positions_ptr, cos_sin_ptr, slot_mapping_ptr, key_cache_ptr, value_cache_ptr,
    M, N, K, num_heads, num_kv_heads, pair_tiles, stride_xm, stride_wn, stride_om, stride_rm, stride_rom,
    stride_cos_sin, stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ROW_BLOCK: tl.constexpr, EVEN_V: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr, TO_FP8: tl.constexpr, ROUNDED_PRODUCTS: tl.constexpr,
):
    """Program ``pid`` < ``pair_tiles``: ``BLOCK_N / 2`` rotary pairs of one query or key head;
    after them, ``BLOCK_N`` value rows a program."""
    PAIRS: tl.constexpr = BLOCK_N // 2
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    lanes = tl.arange(0, BLOCK_N)
    is_pairs = pid < pair_tiles
    first_pair = pid * PAIRS
    head = first_pair // HALF  # a query head, or num_heads + a key head
    dims = first_pair % HALF + tl.arange(0, PAIRS)  # the pairs' first features in their head
    # lane 2i holds feature dims[i] of the head, lane 2i + 1 feature dims[i] + HALF
    pair_rows = head * HEAD_DIM + first_pair % HALF + lanes // 2 + (lanes % 2) * HALF
    qk_rows = (num_heads + num_kv_heads) * HEAD_DIM
    value_rows = qk_rows + (pid - pair_tiles) * BLOCK_N + lanes
    offs_n = tl.where(is_pairs, pair_rows, value_rows)
    n_mask = offs_n < N
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == "rms_norm":
        rstd = _rms_rows(x_ptr, residual_ptr, residual_out_ptr, M, K, eps, stride_xm, stride_rm, stride_rom,
                         tl.where(pid == 0, K, 0), BLOCK_M, HAS_RESIDUAL, ROW_BLOCK)
    acc = _product_tile(
        x_ptr, w_ptr, scale_ptr, residual_ptr, norm_weight_ptr, rstd, offs_m, offs_n, m_mask, n_mask,
        0, K, K, stride_xm, stride_wn, stride_rm,
        BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, HAS_SCALE, PROLOGUE, HAS_RESIDUAL, EVEN_V, EVEN_K,
        DOT_PRECISION, NUM_STAGES,
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)  # what the GEMV stores, and the rotary reads back
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    slots = tl.load(slot_mapping_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
    cache_mask = (m_mask & (slots >= 0))[:, None]
    if is_pairs:
        x1, x2 = tl.split(tl.reshape(y.to(tl.float32), [BLOCK_M, PAIRS, 2]))
        positions = tl.load(positions_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        cos_ptrs = cos_sin_ptr + positions[:, None] * stride_cos_sin + dims[None, :]
        cos = tl.load(cos_ptrs, mask=m_mask[:, None], other=0.0).to(tl.float32)
        sin = tl.load(cos_ptrs + HALF, mask=m_mask[:, None], other=0.0).to(tl.float32)
        rotated1, rotated2 = _rotate_pair_rounded(x1, x2, cos, sin, ROUNDED_PRODUCTS)
        rotated1 = rotated1.to(out_ptr.dtype.element_ty)
        rotated2 = rotated2.to(out_ptr.dtype.element_ty)
        if head < num_heads:
            query_ptrs = out_ptr + offs_m[:, None] * stride_om + head * HEAD_DIM + dims[None, :]
            tl.store(query_ptrs, rotated1, mask=m_mask[:, None])
            tl.store(query_ptrs + HALF, rotated2, mask=m_mask[:, None])
        else:
            tl.store(out_ptrs, y, mask=m_mask[:, None])
            key_head = head - num_heads
            cache_ptrs = (key_cache_ptr + key_head * stride_kc_head
                          + slots[:, None] * stride_kc_slot + dims[None, :])
            tl.store(cache_ptrs, _cast_for_cache(rotated1, key_cache_ptr, TO_FP8), mask=cache_mask)
            tl.store(cache_ptrs + HALF, _cast_for_cache(rotated2, key_cache_ptr, TO_FP8), mask=cache_mask)
    else:
        tl.store(out_ptrs, y, mask=m_mask[:, None] & n_mask[None, :])
        value_features = offs_n - qk_rows
        cache_ptrs = (value_cache_ptr + slots[:, None] * stride_vc_slot
                      + (value_features // HEAD_DIM * stride_vc_head + value_features % HEAD_DIM)[None, :])
        tl.store(cache_ptrs, _cast_for_cache(y, value_cache_ptr, TO_FP8), mask=cache_mask & n_mask[None, :])


def _fused_config(rows: int, weight: torch.Tensor, write: RotaryKVWrite) -> GemvConfig | None:
    """The GEMV's own tile for these rows without a K split (the epilogue needs whole sums),
    where a tile's pairs stay within one head; else None."""
    config = choose_config_for(rows, weight, weight.device)
    half = write.head_dim // 2
    if config.block_n % 2 or half % (config.block_n // 2):
        return None
    return GemvConfig(block_n=config.block_n, block_k=config.block_k, use_dot=config.use_dot,
                      num_warps=config.num_warps, num_stages=config.num_stages)


def _write_applies(x: torch.Tensor, weight: torch.Tensor, write: RotaryKVWrite) -> bool:
    """Whether ``write`` fits the kernel: the weight's rows are the heads' (q, k, v), a full rotary,
    a position and a slot per row of ``x``, caches of the layer's KV heads."""
    head_dim = write.head_dim
    rows = x.shape[0]
    tables = (write.positions, write.slot_mapping)
    return (
        head_dim % 2 == 0
        and weight.shape[0] == (write.num_heads + 2 * write.num_kv_heads) * head_dim
        and write.rotary_dim == head_dim
        and write.cos_sin_cache.stride(-1) == 1
        and all(t.shape == (rows,) and t.is_contiguous() and t.device == x.device for t in tables)
        and all(tuple(cache.shape[2:]) == (write.num_kv_heads, head_dim)
                for cache in (write.key_cache, write.value_cache))
    )


def qkv_rotary_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    write: RotaryKVWrite,
    norm: NormArgs | None = None,
) -> torch.Tensor | None:
    """The fused kernel; ``None`` where it does not apply (the small-batch kernel or the fused norm
    would not, partial rotary, a tile shape that splits a head's pairs)."""
    if not (_applies(x, weight, bias, weight_scale) and x.dim() == 2 and _write_applies(x, weight, write)):
        return None
    prologue = NO_PROLOGUE
    if norm is not None:
        found = norm_prologue(x, norm.weight, norm.eps, norm.residual, norm.residual_out)
        if found is None:
            return None
        x, prologue = found
    elif x.stride(1) != 1:
        x = x.contiguous()
    config = _fused_config(x.shape[0], weight, write)
    if config is None:
        return None
    return _launch(x, weight, bias, weight_scale, write, prologue, config)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    write: RotaryKVWrite,
    prologue: Prologue,
    config: GemvConfig,
) -> torch.Tensor:
    """The kernel's launch over ``x`` [M, K] (unit column stride), one program a tile."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    key_cache, value_cache = write.key_cache, write.value_cache
    _, key, value = write.split(out)
    check_write_layout(key, value, key_cache, value_cache)
    half = write.head_dim // 2
    pair_tiles = (write.num_heads + write.num_kv_heads) * half // (config.block_n // 2)
    value_size = write.num_kv_heads * write.head_dim
    grid = (pair_tiles + triton.cdiv(value_size, config.block_n),)
    _qkv_rotary_kernel[grid](
        out_ptr=out, positions_ptr=write.positions, cos_sin_ptr=write.cos_sin_cache,
        slot_mapping_ptr=write.slot_mapping, key_cache_ptr=key_cache, value_cache_ptr=value_cache,
        M=m, N=n, K=k, num_heads=write.num_heads, num_kv_heads=write.num_kv_heads, pair_tiles=pair_tiles,
        stride_om=out.stride(0), stride_cos_sin=write.cos_sin_cache.stride(0),
        stride_kc_slot=key_cache.stride(1), stride_kc_head=key_cache.stride(2),
        stride_vc_slot=value_cache.stride(1), stride_vc_head=value_cache.stride(2),
        HEAD_DIM=write.head_dim, HALF=half, BLOCK_N=config.block_n, EVEN_V=value_size % config.block_n == 0,
        TO_FP8=key_cache.dtype == FP8,
        ROUNDED_PRODUCTS=x.is_cuda,  # the interpreter (CPU tensors) runs no PTX and never contracts
        **product_arguments(x, weight, bias, weight_scale, prologue, config),
    )
    return out


def qkv_rotary_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    write: RotaryKVWrite,
    norm: NormArgs | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a fused QKV weight ([M, N], ``x`` normalized first with
    ``norm``), its query rows rotated by ``write.positions``, its keys (rotated) and values written
    into the caches at ``write.slot_mapping``; the key rows of the result stay unrotated. One kernel
    on CUDA where it applies, else the projection then ``rotary_and_write_kv_cache``."""
    if use_triton(x):
        result = qkv_rotary_linear_triton(x, weight, bias, weight_scale, write, norm)
        if result is not None:
            return result
    return _unfused(x, weight, bias, weight_scale, write, norm, linear_small_batch, rms_norm_linear,
                    rotary_and_write_kv_cache)
