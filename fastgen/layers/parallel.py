"""Tensor-parallel context: which shard this process holds and how shards talk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """Rank and size of the tensor-parallel group; collectives are no-ops at size 1."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along the last dimension."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)

    def min_max_over_ranks(self, value: int) -> tuple[int, int]:
        """The smallest and largest ``value`` any rank holds (e.g. KV blocks each rank can fit)."""
        if self.size == 1:
            return value, value
        device = torch.device("cuda", torch.cuda.current_device()) if _uses_nccl() else None
        both = torch.tensor([-value, value], dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return -int(both[0]), int(both[1])

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total`` items that must divide evenly."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel={self.size}")
        return total // self.size


SINGLE = TensorParallel()


def _uses_nccl() -> bool:
    return dist.get_backend() == "nccl"


def init_distributed(tp: TensorParallel, device: torch.device, *, timeout_s: float = 600.0) -> None:
    """Join the default process group of ``tp.size`` ranks: NCCL on CUDA, gloo on the CPU.

    The rendezvous is ``env://`` (``MASTER_ADDR`` / ``MASTER_PORT``, set by the engine). NVLink
    multicast (NVLS) stays off on GPU.
    """
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=tp.rank, world_size=tp.size, timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", rank=tp.rank, world_size=tp.size, timeout=timeout)
