"""Feed-forward blocks: gated (SwiGLU/GeGLU) and plain."""

from __future__ import annotations

import torch
from torch import nn

from fastgen import kernels

from .linear import ColumnParallelLinear, RowParallelLinear
from .parallel import SINGLE, TensorParallel

_GATED_ACTIVATIONS = {"silu": None, "swish": None, "gelu_pytorch_tanh": "tanh", "gelu": "none"}


_PLAIN_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with GELU (exact or tanh-approximated, as the config names it)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        act: str = "gelu",
        bias: bool = True,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        if act not in _PLAIN_ACTIVATIONS:
            supported = sorted(_PLAIN_ACTIVATIONS)
            raise ValueError(f"MLP activation {act!r} is not supported; supported: {supported}")
        self.approximate = _PLAIN_ACTIVATIONS[act]
        self.fc1 = ColumnParallelLinear(hidden_size, [intermediate_size], bias=bias, tp=tp)
        self.fc2 = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(kernels.gelu(self.fc1(x), self.approximate))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused in one column-parallel matmul; SiLU
    (SwiGLU) or GELU (GeGLU, Gemma)."""

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
                f"gated MLP activation {act!r} is not supported; supported: {sorted(_GATED_ACTIVATIONS)}"
            )
        self.gelu = _GATED_ACTIVATIONS[act]  # None: SiLU
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias, tp=tp
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.gelu is None:
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(kernels.gelu(gate, self.gelu) * up)
