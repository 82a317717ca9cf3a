"""MLP activations: SiLU-and-mul for gated MLPs, GELU (exact or tanh) for plain ones.

The Triton kernels compute in float32 and round like PyTorch does: ``silu_and_mul`` rounds the
SiLU to the input dtype before the product (``F.silu(a) * b`` in eager mode does the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl
from ._dispatch import use_triton


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dim ``2d``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, ``approximate`` is ``"none"`` (erf) or ``"tanh"``."""
    return F.gelu(x, approximate=approximate)


@triton.jit
def _silu_mul(gate, up, out_dtype: tl.constexpr):
    """``silu(gate) * up`` in float32, the SiLU rounded to ``out_dtype`` before the product (as
    eager PyTorch does) and the product rounded to it; shared with the small-batch linear's fused
    prologue (``gemv.silu_and_mul_linear``), so both compute the same bits."""
    gate = gate.to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(out_dtype).to(tl.float32)
    return (silu * up.to(tl.float32)).to(out_dtype)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, width, stride_x_row, stride_out_row, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl.enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x_row + width + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out_row + cols, _silu_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_kernel(x_ptr, out_ptr, numel, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if TANH:
        # 0.5 x (1 + tanh(u)) == x * sigmoid(2u): no tanh needed, no cancellation near zero
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * inner)
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton ``silu_and_mul``: one program per (row, column block)."""
    width = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = min(triton.next_power_of_2(width), 2048)
    grid = (rows.shape[0], triton.cdiv(width, block))
    _silu_and_mul_kernel[grid](rows, out, width, rows.stride(0), width, BLOCK=block, num_warps=4,
                               **pdl.launch_options(x.device))
    return out


def gelu_triton(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Triton GELU over the flattened tensor."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    flat = x.contiguous()
    out = torch.empty_like(flat)
    numel = flat.numel()
    if numel == 0:
        return out
    block = 2048
    _gelu_kernel[(triton.cdiv(numel, block),)](
        flat, out, numel, TANH=approximate == "tanh", BLOCK=block, num_warps=4
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Gated-MLP activation."""
    impl = silu_and_mul_triton if use_triton(x) else silu_and_mul_reference
    return impl(x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU activation."""
    impl = gelu_triton if use_triton(x) else gelu_reference
    return impl(x, approximate)
