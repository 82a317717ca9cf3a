"""RMSNorm and LayerNorm, each optionally fused with the residual add.

With ``residual`` given, the kernels compute ``x = x + residual`` first and return
``(norm(x), x)``: the normalized activations and the new residual stream. Statistics are taken in
float32 and the result is cast back to the input dtype, as HF transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm, fused with the residual add when ``residual`` is given."""
    impl = rms_norm_triton if use_triton(x) else rms_norm_reference
    return impl(x, weight, eps, residual)


def layer_norm(x, weight, bias, eps, residual=None):
    """LayerNorm, fused with the residual add when ``residual`` is given."""
    impl = layer_norm_triton if use_triton(x) else layer_norm_reference
    return impl(x, weight, bias, eps, residual)
