"""MLP activations: SiLU-and-mul for gated MLPs, GELU (exact or tanh) for plain ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dim ``2d``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, ``approximate`` is ``"none"`` (erf) or ``"tanh"``."""
    return F.gelu(x, approximate=approximate)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Gated-MLP activation."""
    impl = silu_and_mul_triton if use_triton(x) else silu_and_mul_reference
    return impl(x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU activation."""
    impl = gelu_triton if use_triton(x) else gelu_reference
    return impl(x, approximate)
