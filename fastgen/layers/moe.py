"""Mixture of experts (Mixtral): a router picks each token's top-k experts, each expert is a gated
SiLU MLP, and the token's output is the experts' outputs weighted by the renormalized router
probabilities (`fastgen.kernels.fused_moe`: two grouped matmuls on CUDA, which CUDA graphs
capture; a loop over the experts elsewhere).

Experts are split across ranks by intermediate features, like `GatedMLP`: every rank holds a
slice of every expert, routes every token the same way (the router is replicated), and one
all-reduce sums the partial outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fastgen import kernels

from .linear import copy_checked, linear, load_full
from .parallel import SINGLE, TensorParallel


class Router(nn.Module):
    """The replicated ``[num_experts, hidden]`` projection to router logits."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.weight.weight_loader = load_full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class MoE(nn.Module):
    """Top-k routed gated MLP experts. Checkpoint tensors ``experts.{e}.w1`` (gate), ``w3`` (up)
    and ``w2`` (down) land in two stacked parameters, ``w13`` and ``w2``."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.local = tp.split(intermediate_size, "expert features")
        self.gate = Router(hidden_size, num_experts)  # the checkpoint's name for the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden_size), requires_grad=False)
        self.w13.weight_loader = self._load_w13
        self.w13.checkpoint_tensors = self._w13_tensors
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.local), requires_grad=False)
        self.w2.weight_loader = self._load_w2
        self.w2.checkpoint_tensors = self._w2_tensors

    # -- loading: (checkpoint name under this module, shard id, full shape) ------------------------

    def _w13_tensors(self) -> Iterator[tuple[str, Any, tuple[int, ...]]]:
        shape = (self.intermediate_size, self.hidden_size)
        for expert in range(self.num_experts):
            for which, name in enumerate(("w1", "w3")):
                yield f"experts.{expert}.{name}.weight", (expert, which), shape

    def _w2_tensors(self) -> Iterator[tuple[str, Any, tuple[int, ...]]]:
        for expert in range(self.num_experts):
            yield f"experts.{expert}.w2.weight", expert, (self.hidden_size, self.intermediate_size)

    def _load_w13(self, param: nn.Parameter, loaded: Any, shard_id: tuple[int, int]) -> None:
        expert, which = shard_id
        start = self.tp.rank * self.local
        target = param.data[expert, which * self.local : (which + 1) * self.local]
        copy_checked(target, loaded[start : start + self.local], "expert column shard")

    def _load_w2(self, param: nn.Parameter, loaded: Any, shard_id: int) -> None:
        start = self.tp.rank * self.local
        copy_checked(param.data[shard_id], loaded[:, start : start + self.local], "expert row shard")

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probabilities.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return self.tp.all_reduce(kernels.fused_moe(x, weights, experts, self.w13, self.w2))
