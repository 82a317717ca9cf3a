"""CUDA graphs for decode-only steps.

A decode step launches a few hundred small kernels; replaying a captured graph removes their
launch cost. Graphs are captured once per padded batch size over static input buffers; a step's
inputs are copied into the buffers and the graph of the next larger size is replayed. Padding
rows write no KV (slot -1) and their logits are dropped. Attention is captured with
``max_context_len = max_model_len``, so its launch shape (split-KV count) fits every replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from itertools import chain

import torch
from torch import nn

from fastgen.batch import HostBatch, upload_int_lists
from fastgen.layers.attention import ForwardBatch

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then steps of 8 to 64, 16 to 256, 32 beyond."""
    sizes = [1, 2, 4]
    size = 8
    while size <= max_batch:
        sizes.append(size)
        size += 8 if size < 64 else 16 if size < 256 else 32
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return [s for s in sizes if s <= max_batch]


def capture_sizes_on_side_stream(
    device: torch.device, sizes: list[int], capture_one: Callable[[int, object, torch.cuda.Stream], None]
) -> float:
    """Call ``capture_one(size, pool, stream)`` for every size, largest first (smaller graphs
    then reuse the largest one's memory pool), on a side stream as capture requires; seconds taken."""
    started = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode(), torch.cuda.stream(stream):
        for size in sorted(sizes, reverse=True):
            capture_one(size, pool, stream)
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    return time.perf_counter() - started


class DecodeGraphs:
    """Captured decode graphs of one model; `run` replays the smallest one that fits."""

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        max_batch: int,
        max_model_len: int,
        block_size: int,
    ):
        self.model = model
        self.device = device
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.sizes = capture_sizes(max_batch)
        int64, int32 = torch.int64, torch.int32
        self.token_ids = torch.zeros(max_batch, dtype=int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=int64, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=int64, device=device)
        self.query_start = torch.arange(max_batch + 1, dtype=int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=int32, device=device)
        self.block_tables = torch.zeros(max_batch, self.max_blocks, dtype=int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _forward(self, size: int) -> torch.Tensor:
        batch = ForwardBatch(
            positions=self.positions[:size],
            slot_mapping=self.slots[:size],
            query_start=self.query_start[: size + 1],
            context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_context_len=self.max_model_len,
        )
        hidden = self.model(self.token_ids[:size], batch)
        return self.model.compute_logits(hidden)

    def _capture_one(self, size: int, pool, stream: torch.cuda.Stream) -> None:
        self._forward(size)  # warm up: compile kernels, allocate workspaces
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            self.logits[size] = self._forward(size)
        self.graphs[size] = graph

    def capture(self) -> None:
        seconds = capture_sizes_on_side_stream(self.device, self.sizes, self._capture_one)
        logger.info("captured %d decode graphs in %.1f s", len(self.graphs), seconds)

    def fits(self, host: HostBatch) -> bool:
        return host.is_decode_only and host.num_seqs <= self.max_batch

    def run(
        self, host: HostBatch, before_replay: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """Logits ``[num_seqs, vocab]`` of a decode-only step; ``before_replay`` may change the
        token ids in place once they are on the device (the runner's feed of tokens sampled on
        the device)."""
        count = host.num_seqs
        size = next(s for s in self.sizes if s >= count)
        pad = size - count
        width = max(len(t) for t in host.block_tables)
        (token_ids, positions, slots), (context_lens, tables) = upload_int_lists(
            self.device,
            [host.token_ids + [0] * pad, host.positions + [0] * pad, host.slots + [-1] * pad],
            [host.context_lens + [1] * pad, list(chain.from_iterable(host.padded_block_tables(width)))],
        )
        self.token_ids[:size].copy_(token_ids)
        self.positions[:size].copy_(positions)
        self.slots[:size].copy_(slots)
        self.context_lens[:size].copy_(context_lens)
        self.block_tables[:count, :width].copy_(tables.view(count, width))
        if before_replay is not None:
            before_replay(self.token_ids[:count])
        self.graphs[size].replay()
        return self.logits[size][:count]
