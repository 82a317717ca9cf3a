"""Per-row FP8 quantization of activations (the A of W8A8 FP8 linears).

``quantize_rows(x)`` returns ``q`` in float8 e4m3 and ``scale`` [rows, 1] in float32 with
``x ~= q * scale``: ``scale = max(amax(|row|) / 448, 1e-12)``. PyTorch spells that as eight
elementwise launches per linear layer; the Triton kernel is one launch with one program per row,
reading the row twice (its max, then the scaled copy) and writing one byte per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row keeps a usable scale


def saturate_to_fp8(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to +-448 and rounded to the nearest e4m3 value (no NaN for large values)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``q`` in FP8, ``scale`` [rows, 1] in float32) with ``x ~= q * scale``, one scale per row
    (``x`` is 2-D)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return saturate_to_fp8(x.float() / scale), scale


@triton.jit
def _saturate_to_e4m3(v):
    """``v`` (float32) clamped to +-448 and rounded to the nearest e4m3 value, ties to even, still
    in float32: the cast that follows is then exact whichever way the conversion rounds (Triton's
    interpreter rounds some values that carry into the next power of two down by a factor 2)."""
    v = tl.clamp(v, -448.0, 448.0)
    bits = v.to(tl.int32, bitcast=True)
    # normal e4m3 numbers keep 3 of float32's 23 mantissa bits: round away the low 20
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # below 2**-6 e4m3 is subnormal, a fixed step of 2**-9: round v * 512 to an integer (adding and
    # taking away 1.5 * 2**23 leaves float32 no fraction bits, and rounds ties to even)
    tiny = ((v * 512.0 + 12582912.0) - 12582912.0) / 512.0
    return tl.where(tl.abs(v) < 0.015625, tiny, normal)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q,
                          SMALLEST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    biggest = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < K, other=0.0).to(tl.float32)
        biggest = tl.maximum(biggest, tl.abs(x))
    scale = tl.maximum(tl.max(biggest, axis=0) / 448.0, SMALLEST)
    tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK):
        mask = start + offs < K
        x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
        q = _saturate_to_e4m3(x / scale)
        tl.store(q_ptr + row * stride_q + start + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`quantize_rows_reference`: one program per row of the 2-D ``x``."""
    rows, k = x.shape
    if k > 1 and x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((rows, k), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    block = min(triton.next_power_of_2(max(k, 16)), 2048)
    _quantize_rows_kernel[(rows,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        SMALLEST=MIN_SCALE, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization of the 2-D ``x``: Triton on CUDA, the reference elsewhere."""
    if use_triton(x):
        return quantize_rows_triton(x)
    return quantize_rows_reference(x)
