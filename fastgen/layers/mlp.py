"""Feed-forward blocks: gated (SwiGLU/GeGLU) and plain."""

from __future__ import annotations

import torch
from torch import nn

from fastgen import kernels

from .linear import ColumnParallelLinear, RowParallelLinear
from .parallel import SINGLE, TensorParallel

_GATED_ACTIVATIONS = ("silu", "swish")


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused in one column-parallel matmul."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        act: str = "silu",
        bias: bool = False,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        if act not in _GATED_ACTIVATIONS:
            raise ValueError(
                f"gated MLP activation {act!r} is not supported; supported: {_GATED_ACTIVATIONS}"
            )
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias, tp=tp
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))
