"""Feed-forward blocks: gated (SwiGLU/GeGLU) and plain (GELU or ReLU)."""

from __future__ import annotations

import torch
from torch import nn

from fastgen import kernels

from .linear import ColumnParallelLinear, RMSNormInput, RowParallelLinear, cpu_split_fused, small_batch
from .parallel import SINGLE, TensorParallel

# activation name -> the GELU approximation the kernel takes
_GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_SILUS = ("silu", "swish")


def _gelu_approximation(act: str, allowed: tuple[str, ...], kind: str) -> str | None:
    """The GELU approximation ``act`` names (None for SiLU), or a ValueError naming the choices."""
    if act not in allowed:
        raise ValueError(f"{kind} activation {act!r} is not supported; supported: {sorted(allowed)}")
    return _GELUS.get(act)


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with GELU (exact or tanh-approximated, as the config names it) or ReLU."""

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
        self.relu = act == "relu"
        self.approximate = None if self.relu else _gelu_approximation(act, (*_GELUS, "relu"), "MLP")
        self.fc1 = ColumnParallelLinear(hidden_size, [intermediate_size], bias=bias, tp=tp)
        self.fc2 = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        return self.fc2(torch.relu(hidden) if self.relu else kernels.gelu(hidden, self.approximate))


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
        # None: SiLU (SwiGLU)
        self.gelu = _gelu_approximation(act, (*_SILUS, "gelu", "gelu_pytorch_tanh"), "gated MLP")
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias, tp=tp
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor | RMSNormInput) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and cpu_split_fused(x, self.gate_up_proj.weight):
            # two products, and the activation reads them without splitting a fused output
            gate, up = self.gate_up_proj.forward_parts(x)
            activated = nn.functional.silu(gate) if self.gelu is None else kernels.gelu(gate, self.gelu)
            return self.down_proj(activated * up)
        gate_up = self.gate_up_proj(x)
        if self.gelu is None:
            if small_batch(gate_up) and kernels.fusion_enabled("gated_down", gate_up.shape[0]):
                return self.down_proj.forward_silu_and_mul(gate_up)  # no [M, I] activation written
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(kernels.gelu(gate, self.gelu) * up)
