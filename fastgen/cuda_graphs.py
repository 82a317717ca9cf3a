"""CUDA graphs for decode-only steps.

A decode step launches a few hundred small kernels; replaying a captured graph removes their
launch cost. Graphs are captured once per padded batch size over static input buffers; a step's
inputs are copied into the buffers and the graph of the next larger size is replayed. Padding
rows write no KV (slot -1) and their logits are dropped. Attention is captured with a
``max_context_len`` that its launch shape (split-KV count) must fit: ``max_model_len``, and for
batches of up to `BUCKETED_BATCH` rows also the shorter `CONTEXT_BUCKETS`, so that a short context
is not split for the longest one (one sequence of Llama-3-8B in 64 splits where 8 see its keys); a
step replays the graph of its padded size and of the shortest bucket that holds its contexts.
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


BUCKETED_BATCH = 8  # batches up to here get a graph per context bucket: their attention splits most
CONTEXT_BUCKETS = (512, 2048)  # shorter context bounds than max_model_len, for the small batches


def context_buckets(size: int, max_model_len: int) -> list[int]:
    """The ``max_context_len`` values a batch of ``size`` rows is captured at, ascending."""
    if size > BUCKETED_BATCH:
        return [max_model_len]
    return [*(bucket for bucket in CONTEXT_BUCKETS if bucket < max_model_len), max_model_len]


def pick_graph(
    sizes: list[int], max_model_len: int, num_seqs: int, longest_context: int
) -> tuple[int, int]:
    """The (padded size, context bucket) whose graph replays a decode step of ``num_seqs`` rows
    whose longest context is ``longest_context``: the smallest of each that holds the step."""
    size = next(s for s in sizes if s >= num_seqs)
    bucket = next(b for b in context_buckets(size, max_model_len) if b >= longest_context)
    return size, bucket


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
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # by (size, context bucket)
        self.logits: dict[tuple[int, int], torch.Tensor] = {}

    def _forward(self, size: int, max_context_len: int) -> torch.Tensor:
        batch = ForwardBatch(
            positions=self.positions[:size],
            slot_mapping=self.slots[:size],
            query_start=self.query_start[: size + 1],
            context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_context_len=max_context_len,
        )
        hidden = self.model(self.token_ids[:size], batch)
        return self.model.compute_logits(hidden)

    def _capture_one(self, size: int, pool, stream: torch.cuda.Stream) -> None:
        for bucket in reversed(context_buckets(size, self.max_model_len)):
            self._forward(size, bucket)  # warm up: compile kernels, allocate workspaces
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.logits[size, bucket] = self._forward(size, bucket)
            self.graphs[size, bucket] = graph

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
        size, bucket = pick_graph(self.sizes, self.max_model_len, count, max(host.context_lens))
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
        self.graphs[size, bucket].replay()
        return self.logits[size, bucket][:count]
