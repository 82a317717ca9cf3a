"""Flattening a step plan into the ragged batch the model reads.

`HostBatch` holds plain Python lists (built once per step on the host); `to_device` turns them into
a `ForwardBatch` of tensors, and the CUDA-graph runner copies them into its static buffers.
`upload_int_lists` moves a step's integer lists to a GPU in one copy from pinned memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

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
        block_tables = self.padded_block_tables()
        (token_ids, positions, slots, sample_indices), (query_start, context_lens, tables) = (
            upload_int_lists(
                device,
                [self.token_ids, self.positions, self.slots, self.sample_indices],
                [self.query_start, self.context_lens, list(chain.from_iterable(block_tables))],
            )
        )
        batch = ForwardBatch(
            positions=positions,
            slot_mapping=slots,
            query_start=query_start,
            context_lens=context_lens,
            block_tables=tables.view(len(block_tables), -1),
            max_query_len=self.max_query_len,
            max_context_len=max(self.context_lens),
            num_decodes=self.num_decodes,
        )
        if positions.device.type == "cpu":
            # from the lists at hand: the CPU attention needs them on the host, once per step
            batch.cpu_attention_plan = CpuAttentionPlan(
                self.query_start, self.context_lens, block_tables, workspace=cpu_workspace
            )
        return token_ids, batch, sample_indices


# Triton specializes a kernel on whether each pointer is 16-byte aligned: every list starts on
# such a boundary, so a step's offsets never make a new kernel variant.
_ALIGN_BYTES = 16


@dataclass(frozen=True)
class PackedLists:
    """Integer lists laid out in one byte buffer: int64 lists first, then int32 ones, each
    starting at a multiple of 16 bytes."""

    buffer: torch.Tensor  # uint8
    int64_spans: list[tuple[int, int]]  # (byte offset, length)
    int32_spans: list[tuple[int, int]]

    @classmethod
    def pack(
        cls, int64_lists: Sequence[list[int]], int32_lists: Sequence[list[int]], *, pin: bool
    ) -> PackedLists:
        int64_spans, end64 = _spans(int64_lists, 8, 0)
        int32_spans, end = _spans(int32_lists, 4, end64)
        buffer = torch.empty(end, dtype=torch.uint8, pin_memory=pin)
        for (offset, _), values in zip(int64_spans, int64_lists):
            buffer[offset : offset + 8 * len(values)].view(torch.int64).copy_(
                torch.tensor(values, dtype=torch.int64)
            )
        for (offset, _), values in zip(int32_spans, int32_lists):
            buffer[offset : offset + 4 * len(values)].view(torch.int32).copy_(
                torch.tensor(values, dtype=torch.int32)
            )
        return cls(buffer, int64_spans, int32_spans)

    def unpack(self, buffer: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of ``buffer`` (this layout's bytes, e.g. copied to a device) as the lists' tensors."""

        def views(spans: list[tuple[int, int]], dtype: torch.dtype, size: int) -> list[torch.Tensor]:
            return [buffer[offset : offset + size * length].view(dtype) for offset, length in spans]

        return views(self.int64_spans, torch.int64, 8), views(self.int32_spans, torch.int32, 4)


def _spans(lists: Sequence[list[int]], item_bytes: int, start: int) -> tuple[list[tuple[int, int]], int]:
    spans, offset = [], start
    for values in lists:
        spans.append((offset, len(values)))
        offset += -(-item_bytes * len(values) // _ALIGN_BYTES) * _ALIGN_BYTES
    return spans, offset


def upload_int_lists(
    device: torch.device, int64_lists: Sequence[list[int]], int32_lists: Sequence[list[int]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The lists as int64 and int32 tensors on ``device``. To a GPU they go as one asynchronous
    copy from pinned memory: the thread launching a step does not wait on the driver's staging of
    pageable memory, and a step makes one copy instead of one per list."""
    if torch.device(device).type == "cpu":
        return (
            [torch.tensor(values, dtype=torch.int64) for values in int64_lists],
            [torch.tensor(values, dtype=torch.int32) for values in int32_lists],
        )
    packed = PackedLists.pack(int64_lists, int32_lists, pin=True)
    return packed.unpack(packed.buffer.to(device, non_blocking=True))
