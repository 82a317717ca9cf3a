"""Normalization layers over the fused kernels (residual add folded in)."""

from __future__ import annotations

import torch
from torch import nn

from fastgen import kernels

from .linear import RMSNormInput, load_full


class RMSNorm(nn.Module):
    """RMSNorm; ``forward(x, residual)`` also adds the residual and returns the new residual.
    ``weight_offset`` is added to the checkpoint's weight when it loads (Gemma scales by 1 + w)."""

    def __init__(self, hidden_size: int, eps: float, *, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        load_full(param, loaded, shard_id)
        if self.weight_offset:
            param.data += self.weight_offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    def into_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[RMSNormInput, torch.Tensor]:
        """``forward(x, residual)`` left to the linear that reads it (the ``norm_linear`` fusion):
        (the rows for that linear, the new residual: ``x`` without ``residual``, else a buffer that
        linear fills). Pass the rows to exactly one linear before reading the residual."""
        if residual is None:
            return RMSNormInput(x, None, self.weight, self.eps, None), x
        residual_out = torch.empty_like(x)
        return RMSNormInput(x, residual, self.weight, self.eps, residual_out), residual_out


class LayerNorm(nn.Module):
    """LayerNorm with optional bias; same residual convention as `RMSNorm`."""

    def __init__(self, hidden_size: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = load_full
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
            self.bias.weight_loader = load_full

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, residual)
