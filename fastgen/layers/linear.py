"""Linear layers with Megatron-style tensor-parallel sharding.

Each parameter carries a ``weight_loader(param, loaded, shard_id)``: ``loaded`` is a full
checkpoint tensor or a lazy safetensors slice (anything indexable with a ``shape`` or
``get_shape()``), so each rank reads only the rows or columns it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastgen import kernels

from .parallel import SINGLE, TensorParallel
from .quantization import fp8_linear

_HALF = (torch.float16, torch.bfloat16)


def small_batch(x: torch.Tensor) -> bool:
    """Whether a linear of ``x`` takes the Triton small-batch kernel: decode-sized half-precision
    rows on CUDA (up to 8), where the fused kernels (``fused_linear.py``) apply too."""
    return x.is_cuda and x.dtype in _HALF and x.dim() == 2 and x.shape[0] <= 8


@dataclass(frozen=True)
class RMSNormInput:
    """Rows that the linear reading them normalizes first (the ``norm_linear`` fusion): the
    activations are ``rms_norm(hidden (+ residual), weight, eps)``, and that linear writes the new
    residual ``hidden + residual`` into ``residual_out``, so exactly one linear must read this.
    Made by `RMSNorm.into_linear` for rows where `small_batch` holds."""

    hidden: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor
    eps: float
    residual_out: torch.Tensor | None


def linear(
    x: torch.Tensor | RMSNormInput,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``. Decode-sized half-precision inputs on CUDA (up to 8 rows) take the
    Triton small-batch kernel (faster than cuBLAS there: benchmarks/NOTES-runner.md), FP8 weights
    included (scaled per row, activations left in their dtype); other FP8 products go through
    `fp8_linear`, everything else cuBLAS / torch. An `RMSNormInput` is normalized by the same
    kernel as it is read."""
    if isinstance(x, RMSNormInput):
        result = kernels.rms_norm_linear(
            x.hidden, x.weight, x.eps, weight, bias, x.residual, weight_scale, x.residual_out
        )
        return result if x.residual is None else result[0]
    if small_batch(x):
        return kernels.linear_small_batch(x, weight, bias, weight_scale=weight_scale)
    if weight_scale is not None:
        return fp8_linear(x, weight, weight_scale, bias)
    if cpu_few_rows(x, weight):
        # MKL's GEMM reads the weight at up to twice the speed when asked for weight @ x.T at these
        # sizes (benchmarks/results/cpu_generate-2026-12-06.md); the same product summed in
        # another order
        out = torch.mm(weight, x.t()).t().contiguous()
        return out if bias is None else out + bias
    return nn.functional.linear(x, weight, bias)


def cpu_few_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` computes ``x @ weight.T`` as ``(weight @ x.T).T``: float32 on the CPU, 2 to
    4 rows (decodes of a small batch)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == 2
        and 2 <= x.shape[0] <= 4
    )


def cpu_split_fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a fused weight (gate and up) is better read as its parts, one product each: float32
    on the CPU at 5 to 32 rows (decodes of a larger batch). MKL's GEMM takes 4-10% less for the two
    halves of the gate/up weight there than for the whole, the same at 1 and 64 rows and above
    (benchmarks/results/cpu_generate-2026-12-06.md, section F); at 2 to 4 rows `cpu_few_rows`
    serves the whole weight faster."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == 2
        and 5 <= x.shape[0] <= 32
    )


def loaded_shape(loaded: Any) -> tuple[int, ...]:
    return tuple(loaded.get_shape()) if hasattr(loaded, "get_shape") else tuple(loaded.shape)


def copy_checked(dest: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if tuple(dest.shape) != tuple(source.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(source.shape)} != expected {tuple(dest.shape)}")
    dest.copy_(source)


def load_full(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    """Loader of an unsharded parameter."""
    copy_checked(param.data, loaded[:], "weight")


class ColumnParallelLinear(nn.Module):
    """``y = x W^T``, output features split across ranks; ``output_sizes`` lists fused outputs
    (e.g. gate and up), each split evenly, so shard ``i`` of the checkpoint lands at its offset."""

    def __init__(
        self, input_size: int, output_sizes: list[int], *, bias: bool = False, tp: TensorParallel = SINGLE
    ):
        super().__init__()
        self.tp = tp
        self.local_sizes = [tp.split(size, "output features") for size in output_sizes]
        local_out = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(local_out, input_size), requires_grad=False)
        self.weight.weight_loader = self._load
        self.weight_scale: torch.Tensor | None = None  # set when the weight is quantized to FP8
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out), requires_grad=False)
            self.bias.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: Any, shard_id: int | None = None) -> None:
        index = shard_id or 0
        size = self.local_sizes[index]
        offset = sum(self.local_sizes[:index])
        start = self.tp.rank * size
        copy_checked(param.data[offset : offset + size], loaded[start : start + size], "column shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.weight_scale)

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The fused outputs (``output_sizes``) as separate tensors, one product per part of the
        weight (row views, no copy); equal to splitting `forward`'s output to float32 rounding."""
        if self.weight_scale is not None:  # FP8: one product, its output split
            return list(self.forward(x).split(self.local_sizes, dim=-1))
        weights = self.weight.split(self.local_sizes)
        biases = [None] * len(weights) if self.bias is None else self.bias.split(self.local_sizes)
        return [linear(x, weight, bias) for weight, bias in zip(weights, biases, strict=True)]


class ReplicatedLinear(ColumnParallelLinear):
    """``y = x W^T`` held whole on every rank (small projections, e.g. OPT-350m's in and out of the
    embedding width)."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False):
        super().__init__(input_size, [output_size], bias=bias, tp=SINGLE)


class QKVParallelLinear(nn.Module):
    """Fused query/key/value projection split by heads. With fewer KV heads than ranks, each KV
    head is replicated on ``tp.size / num_kv_heads`` ranks (as MQA/GQA models need)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.tp = tp
        self.head_dim = head_dim
        self.num_local_heads = tp.split(num_heads, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_local_kv_heads = tp.split(num_kv_heads, "num_key_value_heads")
            self.kv_head_start = tp.rank * self.num_local_kv_heads
        else:
            if tp.size % num_kv_heads:
                raise ValueError(
                    f"tensor_parallel={tp.size} is not a multiple of num_key_value_heads={num_kv_heads}"
                )
            self.num_local_kv_heads = 1
            self.kv_head_start = tp.rank * num_kv_heads // tp.size
        self.q_size = self.num_local_heads * head_dim
        self.kv_size = self.num_local_kv_heads * head_dim
        out = self.q_size + 2 * self.kv_size
        self.weight = nn.Parameter(torch.empty(out, hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load
        self.weight_scale: torch.Tensor | None = None  # set when the weight is quantized to FP8
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out), requires_grad=False)
            self.bias.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: Any, shard_id: str) -> None:
        if shard_id == "q":
            offset, size = 0, self.q_size
            start = self.tp.rank * self.q_size
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size = self.kv_size
            start = self.kv_head_start * self.head_dim
        copy_checked(param.data[offset : offset + size], loaded[start : start + size], f"{shard_id} shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.weight_scale)

    def forward_rotary_kv(self, x: torch.Tensor | RMSNormInput, write: kernels.RotaryKVWrite) -> torch.Tensor:
        """`forward` with the rotary and the KV-cache write in the same kernel (the ``qkv_rotary``
        fusion): the queries come back rotated, the keys as projected, and the rotated keys and the
        values are in ``write``'s caches."""
        norm = None
        if isinstance(x, RMSNormInput):
            norm = kernels.NormArgs(x.weight, x.eps, x.residual, x.residual_out)
            x = x.hidden
        return kernels.qkv_rotary_linear(x, self.weight, self.bias, self.weight_scale, write, norm)


class RowParallelLinear(nn.Module):
    """``y = x W^T``, input features split across ranks, partial sums all-reduced."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.local_in = tp.split(input_size, "input features")
        self.weight = nn.Parameter(torch.empty(output_size, self.local_in), requires_grad=False)
        self.weight.weight_loader = self._load_weight
        self.weight_scale: torch.Tensor | None = None  # set when the weight is quantized to FP8
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = load_full

    def _load_weight(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        start = self.tp.rank * self.local_in
        copy_checked(param.data, loaded[:, start : start + self.local_in], "row shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(linear(x, self.weight, weight_scale=self.weight_scale))

    def forward_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``forward(silu_and_mul(gate_up))`` in one kernel (the ``gated_down`` fusion) for rows
        where `small_batch` holds: each rank's ``gate_up`` shard holds its own gate and up halves."""
        return self._reduce(kernels.silu_and_mul_linear(gate_up, self.weight, weight_scale=self.weight_scale))

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Partial sums of the ranks all-reduced, then the bias (added once)."""
        out = self.tp.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
