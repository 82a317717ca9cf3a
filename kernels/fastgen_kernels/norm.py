"""RMSNorm and LayerNorm, each optionally fused with the residual add.

With ``residual`` given, the kernels compute ``x = x + residual`` first and return
``(norm(x), x)``: the normalized activations and the new residual stream. Statistics are taken in
float32 and the result is cast back to the input dtype, as HF transformers does.

The Triton path writes the new residual stream **in place into ``residual``'s storage** and returns
that tensor (as vLLM's fused add-norm does) when ``residual`` is contiguous and has ``x``'s dtype;
otherwise it returns a new tensor. Either way the returned values equal the reference's; callers
must use the returned residual and not read the old one afterwards. ``x`` is never modified.

The RMS statistic is ``tl.sum`` of the squares, whose order of additions follows the compiler's
layout (block size, warp count). The small-batch linear's fused RMSNorm prologue
(``fused_linear.rms_norm_linear``) takes it with the same helper (:func:`_rms_rstd`) but its own
block shape and warps, so its statistic may differ from this kernel's in the last float32 bits and
a normalized value rounded to half precision by one unit in the last place: the fused and unfused
results agree to within a few half-precision ulps, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl
from ._dispatch import use_triton


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim (``[tokens, hidden]``)."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual_out = x
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * hidden.to(x.dtype)
    return out if residual is None else (out, residual_out)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim (``[tokens, hidden]``)."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual_out = x
    bias_f = None if bias is None else bias.float()
    out = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias_f, eps).to(x.dtype)
    return out if residual is None else (out, residual_out)


@triton.jit
def _rms_rstd(hidden, width, eps):
    """1 / sqrt(mean(hidden ** 2) + eps) of one zero-padded row (float32, ``width`` valid)."""
    return 1.0 / tl.sqrt(tl.sum(hidden * hidden, axis=0) / width + eps)


@triton.jit
def _add_residual(x, residual):
    """``x + residual`` in float32, rounded to x's dtype (the new residual stream)."""
    return (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)


@triton.jit
def _rms_scale(x, rstd, weight, out_dtype: tl.constexpr):
    """``weight * (x * rstd)``: HF rounds the normalized activations to x's dtype before the
    weight multiply, the product is rounded to ``out_dtype``."""
    normed = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
    return (weight.to(tl.float32) * normed).to(out_dtype)


@triton.jit
def _norm_kernel(
    x_ptr, residual_ptr, residual_out_ptr, weight_ptr, bias_ptr, out_ptr,
    width, eps, stride_x, stride_residual, stride_residual_out, stride_out,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One row per program: optional residual add, then RMSNorm or LayerNorm in float32."""
    pdl.enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = _add_residual(x, residual)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    if RMS:
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        y = _rms_scale(x, _rms_rstd(x.to(tl.float32), width, eps), weight, out_ptr.dtype.element_ty)
    else:
        hidden = x.to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(hidden, axis=0) / width
        centered = tl.where(mask, hidden - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / width + eps)
        y = centered * rstd * weight
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    rms: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    residual_out = None
    residual_rows = rows  # placeholder pointer when there is no residual
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        in_place = residual.is_contiguous() and residual.dtype == x.dtype
        residual_out = residual if in_place else torch.empty_like(x, memory_format=torch.contiguous_format)
        residual_rows = residual.reshape(-1, width)
        if residual_rows.stride(-1) != 1:
            residual_rows = residual_rows.contiguous()
    residual_out_rows = residual_rows if residual_out is None else residual_out.view(-1, width)
    if rows.shape[0] > 0:
        block = triton.next_power_of_2(width)
        num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
        _norm_kernel[(rows.shape[0],)](
            rows, residual_rows, residual_out_rows, weight, weight if bias is None else bias,
            out.view(-1, width), width, eps, rows.stride(0), residual_rows.stride(0),
            residual_out_rows.stride(0), width,
            RMS=rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=num_warps, **pdl.launch_options(x.device),
        )
    return out if residual_out is None else (out, residual_out)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm; the new residual (if any) is written into ``residual`` (see module doc)."""
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    return _norm_triton(x, weight, None, eps, residual, rms=True, out_dtype=out_dtype)


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton LayerNorm; the new residual (if any) is written into ``residual`` (see module doc)."""
    return _norm_triton(x, weight, bias, eps, residual, rms=False, out_dtype=x.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm, fused with the residual add when ``residual`` is given."""
    impl = rms_norm_triton if use_triton(x) else rms_norm_reference
    return impl(x, weight, eps, residual)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm, fused with the residual add when ``residual`` is given."""
    impl = layer_norm_triton if use_triton(x) else layer_norm_reference
    return impl(x, weight, bias, eps, residual)
