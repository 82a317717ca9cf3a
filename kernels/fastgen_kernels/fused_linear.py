"""Decode-sized linears fused with the elementwise op before them, so that the [M, K] activations
are never written: the small-batch kernel (``gemv.py``) computes them tile by tile as it loads
them (its ``Prologue``).

- :func:`silu_and_mul_linear` (the ``gated_down`` fusion): ``linear_small_batch(silu_and_mul(
  gate_up), weight)``, a gated MLP's down projection reading ``gate_up`` [M, 2K].
- :func:`rms_norm_linear` (the ``norm_linear`` fusion): ``linear_small_batch(rms_norm(x, w, eps,
  residual), weight)``, a pre-norm block's first projection reading the residual stream. Every
  program computes the rows' sums of squares over all of K (x is a few KB, read from L2) with the
  norm kernel's own helper; program (0, 0) writes the new residual ``x + residual`` into
  ``residual_out``, a separate buffer (other programs still read ``residual``).

The fused kernel computes the activations with the unfused kernels' own helpers
(``activation._silu_mul``, ``norm._add_residual`` / ``_rms_rstd`` / ``_rms_scale``), rounding them
to the activation dtype in registers where the unfused kernels round them in memory.
``silu_and_mul_linear`` is exact: its output equals the unfused kernels' bit for bit (same launch
config). ``rms_norm_linear``'s new residual is exact too, but its RMS statistic is a ``tl.sum``
whose order of additions follows the kernel's layout (block shape, warps), unlike the norm kernel's,
so it may differ in its last float32 bit; where that moves a normalized activation across a
rounding boundary, the activation differs by one half-precision ulp and the output by a few ulps
(the tests bound it). The references compose the ops' references. The dispatching
functions take the fused kernel on CUDA when it applies, else the unfused kernels (the reference
on CPU); the layers choose fused or not by ``fusion_enabled`` (``FASTGEN_FUSIONS_OFF``).
"""

from __future__ import annotations

import math

import torch

from ._dispatch import use_triton
from .activation import silu_and_mul, silu_and_mul_reference
from .gemv import (
    MAX_NORM_WIDTH,
    Prologue,
    _applies,
    choose_config_for,
    linear_small_batch,
    linear_small_batch_reference,
    linear_small_batch_with_config,
)
from .norm import rms_norm, rms_norm_reference

RMSNormLinearResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------- silu_and_mul -> linear


def silu_and_mul_linear_reference(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``linear_small_batch_reference(silu_and_mul_reference(gate_up), weight, bias)``."""
    return linear_small_batch_reference(silu_and_mul_reference(gate_up), weight, bias, out, weight_scale)


def silu_and_mul_linear_triton(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    config=None,
) -> torch.Tensor | None:
    """The fused kernel (``config`` from the shape rule unless given); ``None`` when the small-batch
    kernel would not serve ``silu_and_mul(gate_up) @ weight.T``."""
    if gate_up.shape[-1] % 2 or not _applies(gate_up, weight, bias, weight_scale, gate_up.shape[-1] // 2):
        return None
    if config is None:
        config = choose_config_for(math.prod(gate_up.shape[:-1]), weight, gate_up.device)
    return linear_small_batch_with_config(
        gate_up, weight, bias, out, config, weight_scale, Prologue("silu_mul")
    )


def silu_and_mul_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` = [gate | up] ([M, 2K]) times ``weight.T`` (+ bias): one
    fused kernel on CUDA for at most 8 rows, else ``silu_and_mul`` then ``linear_small_batch``."""
    if use_triton(gate_up):
        result = silu_and_mul_linear_triton(gate_up, weight, bias, out, weight_scale)
        if result is not None:
            return result
        return linear_small_batch(silu_and_mul(gate_up), weight, bias, out, weight_scale)
    return silu_and_mul_linear_reference(gate_up, weight, bias, out, weight_scale)


# ---------------------------------------------------------------- rms_norm -> linear


def _norm_result(
    y: torch.Tensor, new_residual: torch.Tensor | None, residual_out: torch.Tensor | None
) -> RMSNormLinearResult:
    """``y``, or ``(y, new residual)`` with the new residual in ``residual_out`` when given."""
    if new_residual is None:
        return y
    if residual_out is None:
        return y, new_residual
    if residual_out is not new_residual:
        residual_out.copy_(new_residual)
    return y, residual_out


def rms_norm_linear_reference(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> RMSNormLinearResult:
    """``rms_norm_reference`` then ``linear_small_batch_reference``; returns ``y``, or with a
    residual ``(y, x + residual)`` (in ``residual_out`` when given)."""
    normed = rms_norm_reference(x, norm_weight, eps, residual)
    new_residual = None
    if residual is not None:
        normed, new_residual = normed
    y = linear_small_batch_reference(normed, weight, bias, weight_scale=weight_scale)
    return _norm_result(y, new_residual, residual_out)


def norm_prologue(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Prologue] | None:
    """(x with unit column stride, the ``rms_norm`` prologue) for a small-batch kernel reading
    ``rms_norm(x (+ residual), norm_weight, eps)``, with a new residual buffer when none is given;
    ``None`` where the fused norm does not apply (x not [M, K], K > MAX_NORM_WIDTH, a norm weight
    not of x's dtype)."""
    k = x.shape[-1]
    if not (
        x.dim() == 2
        and 0 < k <= MAX_NORM_WIDTH
        and norm_weight.shape == (k,)
        and norm_weight.dtype == x.dtype
        and norm_weight.is_contiguous()
        and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))
    ):
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is None:
        return x, Prologue("rms_norm", norm_weight, eps)
    if residual.stride(1) != 1:
        residual = residual.contiguous()
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif residual_out.shape != x.shape or residual_out.dtype != x.dtype or residual_out.stride(1) != 1:
        raise ValueError(f"residual_out must be {x.dtype} of shape {tuple(x.shape)} with unit column stride")
    if residual_out.data_ptr() in (x.data_ptr(), residual.data_ptr()):
        raise ValueError("residual_out must not alias x or residual: other programs still read them")
    return x, Prologue("rms_norm", norm_weight, eps, residual, residual_out)


def rms_norm_linear_triton(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    config=None,
) -> RMSNormLinearResult | None:
    """The fused kernel (``config`` from the shape rule unless given); ``None`` when it does not
    apply (the small-batch kernel would not, a norm weight not of x's dtype, K > MAX_NORM_WIDTH)."""
    if not _applies(x, weight, bias, weight_scale):
        return None
    found = norm_prologue(x, norm_weight, eps, residual, residual_out)
    if found is None:
        return None
    x, prologue = found
    if config is None:
        config = choose_config_for(x.shape[0], weight, x.device)
    y = linear_small_batch_with_config(x, weight, bias, None, config, weight_scale, prologue)
    return y if residual is None else (y, prologue.residual_out)


def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> RMSNormLinearResult:
    """``linear(rms_norm(x, norm_weight, eps, residual), weight, bias)`` for ``x`` [M, K]: one
    fused kernel on CUDA for at most 8 rows, else ``rms_norm`` then ``linear_small_batch``.
    Returns ``y``, or with ``residual`` ``(y, x + residual)``, the sum written into
    ``residual_out`` when given (a buffer apart from x and residual)."""
    if use_triton(x):
        result = rms_norm_linear_triton(
            x, norm_weight, eps, weight, bias, residual, weight_scale, residual_out
        )
        if result is not None:
            return result
        normed = rms_norm(x, norm_weight, eps, residual)
        new_residual = None
        if residual is not None:
            normed, new_residual = normed
        y = linear_small_batch(normed, weight, bias, weight_scale=weight_scale)
        return _norm_result(y, new_residual, residual_out)
    return rms_norm_linear_reference(x, norm_weight, eps, weight, bias, residual, weight_scale, residual_out)
