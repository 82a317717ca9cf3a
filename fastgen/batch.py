"""Flattening a step plan into the ragged batch the model reads.

`HostBatch` holds plain Python lists (built once per step on the host); `to_device` turns them into
a `ForwardBatch` of tensors, and the CUDA-graph runner copies them into its static buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastgen.kernels.attention import CpuAttentionPlan, CpuAttentionWorkspace
from fastgen.layers.attention import ForwardBatch
from fastgen.plan import SequenceChunk


@dataclass
class HostBatch:
    """One step's inputs on the host, in chunk order."""

    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_start: list[int] = field(default_factory=lambda: [0])
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sample_indices: list[int] = field(default_factory=list)
    max_query_len: int = 0
    num_decodes: int = 0  # leading sequences with one query token


    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence contributes one token and samples (the CUDA-graph case)."""
        return self.max_query_len == 1 and len(self.sample_indices) == self.num_seqs

    def add(self, chunk: SequenceChunk, block_table: list[int], block_size: int) -> None:
        count = len(chunk.token_ids)
        start = chunk.start_position
        if count == 1 and self.num_decodes == self.num_seqs:
            self.num_decodes += 1
        self.token_ids.extend(chunk.token_ids)
        if count == 1:
            self.positions.append(start)
            self.slots.append(block_table[start // block_size] * block_size + start % block_size)
        else:
            chunk_positions = range(start, start + count)
            self.positions.extend(chunk_positions)
            self.slots.extend(
                block_table[p // block_size] * block_size + p % block_size for p in chunk_positions
            )
        end = self.query_start[-1] + count
        self.query_start.append(end)
        self.context_lens.append(start + count)
        self.block_tables.append(block_table)
        self.max_query_len = max(self.max_query_len, count)
        if chunk.sample:
            self.sample_indices.append(end - 1)

    def padded_block_tables(self, width: int | None = None) -> list[list[int]]:
        width = width or max(len(t) for t in self.block_tables)
        return [t + [0] * (width - len(t)) if len(t) < width else t[:width] for t in self.block_tables]

    def to_device(
        self, device: torch.device, cpu_workspace: CpuAttentionWorkspace | None = None
    ) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
        """(token ids, batch, sample indices) as tensors on ``device``; on the CPU, the step's
        attention plan gathers into ``cpu_workspace`` (the runner's, kept from step to step)."""

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        block_tables = self.padded_block_tables()
        batch = ForwardBatch(
            positions=tensor(self.positions, torch.int64),
            slot_mapping=tensor(self.slots, torch.int64),
            query_start=tensor(self.query_start, torch.int32),
            context_lens=tensor(self.context_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            max_query_len=self.max_query_len,
            max_context_len=max(self.context_lens),
            num_decodes=self.num_decodes,
        )
        if batch.positions.device.type == "cpu":
            # from the lists at hand: the CPU attention needs them on the host, once per step
            batch.cpu_attention_plan = CpuAttentionPlan(
                self.query_start, self.context_lens, block_tables, workspace=cpu_workspace
            )
        return tensor(self.token_ids, torch.int64), batch, tensor(self.sample_indices, torch.int64)
