"""Piecewise CUDA graphs for steps that carry prompt chunks.

An eager step launches hundreds of kernels; on a slow host their launches can take longer than the
GPU needs for the step (figures in benchmarks/NOTES-engine.md). Everything between two attentions
(norms, GEMMs, rotary, activations, residual adds) depends only on the number of tokens, so it is
captured once per padded token count as a chain of graph *segments*; attention, whose launch shape
depends on the batch's sequences, runs eagerly in the *holes* between segments, with the exact
shapes of the step.

Capture runs the model's own forward, which knows nothing of graphs: for the time of a capture the
runner swaps each attention layer's forward for the recorder's (`attention_recorded_by`), which
copies q/k/v into static buffers (inside the segment), closes the segment, remembers the hole, and
opens the next segment, which reads the attention output from a static buffer. (A layer whose
rotary goes into its cache write, see `PagedAttention.fuses_rotary`, hands over unrotated q/k and
its rotary: the hole applies it with the write.) The static buffers are shared by every layer and
bucket (replays are sequential on one stream), so the graphs hold no per-layer activations: the
q/k/v copies cost a few percent of a full-budget step, far less than keeping each layer's QKV alive
per bucket would cost in memory. Segments touch no KV cache, so capture happens before the cache
exists.
Replay: copy the step's token ids and positions into static buffers, then replay segment 0,
attend, replay segment 1, ... The final hidden states of the padded tokens come back; the runner
computes logits on the sampled rows only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fastgen.cuda_graphs import capture_sizes_on_side_stream
from fastgen.layers.attention import ForwardBatch, PagedAttention
from fastgen.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


MIN_SEGMENT_ROWS = 16


def token_buckets(max_tokens: int) -> list[int]:
    """Padded token counts: powers of two from `MIN_SEGMENT_ROWS` up to 256, then steps of 128 (256
    past 2048), the last one ``max_tokens`` (or `MIN_SEGMENT_ROWS` when that is smaller). Segments
    never run decode-sized rows (up to 8): those take the small-batch kernels, whose QKV projection
    can write the KV cache itself (the ``qkv_rotary`` fusion), and the cache belongs to the holes."""
    sizes, size = [], MIN_SEGMENT_ROWS
    while size < min(max_tokens, 256):
        sizes.append(size)
        size *= 2
    while size < max_tokens:
        sizes.append(size)
        size += 128 if size < 2048 else 256
    sizes.append(max(max_tokens, MIN_SEGMENT_ROWS))
    return sizes


@dataclass
class _Hole:
    """One attention call between two segments, over static buffers."""

    module: PagedAttention
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    rotary: RotaryEmbedding | None = None  # applied by the attention's cache write


class StaticBuffers:
    """Token-major buffers of ``max_tokens`` rows, one per (role, row shape, dtype)."""

    def __init__(self, max_tokens: int, device: torch.device):
        self.max_tokens = max_tokens
        self.device = device
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, like: torch.Tensor) -> torch.Tensor:
        key = (role, tuple(like.shape[1:]), like.dtype)
        if key not in self._buffers:
            shape = (self.max_tokens, *like.shape[1:])
            self._buffers[key] = torch.zeros(shape, dtype=like.dtype, device=self.device)
        return self._buffers[key][: like.shape[0]]


def fused_qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The contiguous ``[tokens, q + k + v features]`` rows whose consecutive column ranges q, k
    and v are (a fused QKV projection split into heads), else None. Read from storage offsets and
    strides: views made under ``torch.inference_mode`` (graph capture runs in it) record no base."""
    parts = (q, k, v)
    tokens = q.shape[0]
    if tokens == 0 or any(x.shape[0] != tokens or x.dtype != q.dtype or x.device != q.device for x in parts):
        return None
    if len({x.untyped_storage().data_ptr() for x in parts}) != 1:
        return None
    widths = [math.prod(x.shape[1:]) for x in parts]
    for x in parts:  # each token's features dense, in order
        if x[0].stride() != torch.empty(x.shape[1:], device="meta").stride():
            return None
    row = sum(widths)
    if tokens > 1 and any(x.stride(0) != row for x in parts):
        return None
    if (k.storage_offset() != q.storage_offset() + widths[0]
            or v.storage_offset() != k.storage_offset() + widths[1]):  # fmt: skip
        return None
    return q.as_strided((tokens, row), (row, 1))


class SegmentRecorder:
    """Splits a forward pass at its attention calls while capturing it (see module docstring).

    With ``capture=False`` nothing is captured: a warm-up pass that compiles the segments'
    kernels and allocates the static buffers before the KV cache exists.
    """

    def __init__(self, pool, buffers: StaticBuffers, capture: bool = True):
        self.pool = pool
        self.buffers = buffers
        self.capture = capture
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.holes: list[_Hole] = []
        self._current: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        if self.capture:
            self._current = torch.cuda.CUDAGraph()
            self._current.capture_begin(pool=self.pool)

    def end(self) -> None:
        if self._current is not None:
            self._current.capture_end()
            self.graphs.append(self._current)
            self._current = None

    def _to_static(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """Copies of q/k/v in the static buffers: one contiguous copy when they are views of one
        fused QKV projection (the usual case), else one copy each."""
        rows = fused_qkv_rows(q, k, v)
        if rows is not None:
            static_rows = self.buffers.get("qkv", rows)
            static_rows.copy_(rows)
            shift = static_rows.storage_offset() - rows.storage_offset()
            return [
                static_rows.as_strided(x.shape, x.stride(), x.storage_offset() + shift) for x in (q, k, v)
            ]
        static = [self.buffers.get(role, x) for role, x in (("q", q), ("k", k), ("v", v))]
        for buffer, x in zip(static, (q, k, v), strict=True):
            buffer.copy_(x)
        return static

    def attention(
        self,
        module: PagedAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """Stands in for ``module``'s forward during a capture: the attention becomes a hole."""
        static = self._to_static(q, k, v)
        out = self.buffers.get("out", q)
        self.end()
        self.holes.append(_Hole(module, *static, out, rotary))
        self.begin()
        return out


@contextlib.contextmanager
def attention_recorded_by(model: nn.Module, recorder: SegmentRecorder) -> Iterator[None]:
    """For the time of a capture, every attention layer of ``model`` hands its calls to
    ``recorder`` (an instance attribute shadows the class's forward); afterwards the layers are
    as they were."""
    layers = [module for module in model.modules() if isinstance(module, PagedAttention)]
    for layer in layers:
        layer.forward = functools.partial(recorder.attention, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class MixedGraphs:
    """Piecewise graphs of one model for every token bucket; `run` replays the one that fits."""

    def __init__(self, model: nn.Module, *, device: torch.device, max_tokens: int):
        self.model = model
        self.device = device
        self.sizes = token_buckets(max_tokens)
        rows = self.sizes[-1]
        self.token_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.buffers = StaticBuffers(rows, device)
        self.segments: dict[int, SegmentRecorder] = {}
        self.hidden: dict[int, torch.Tensor] = {}

    def _forward(self, size: int, recorder: SegmentRecorder) -> torch.Tensor:
        unused = torch.empty(0, dtype=torch.int32, device=self.device)
        batch = ForwardBatch(
            positions=self.positions[:size],
            slot_mapping=unused,
            query_start=unused,
            context_lens=unused,
            block_tables=unused,
            max_query_len=size,
            max_context_len=size,
        )
        with attention_recorded_by(self.model, recorder):
            return self.model(self.token_ids[:size], batch)

    def _capture_one(self, size: int, pool, stream: torch.cuda.Stream) -> None:
        self._forward(size, SegmentRecorder(pool, self.buffers, capture=False))  # warm-up
        recorder = SegmentRecorder(pool, self.buffers)
        recorder.begin()
        self.hidden[size] = self._forward(size, recorder)
        recorder.end()
        self.segments[size] = recorder

    def capture(self) -> None:
        seconds = capture_sizes_on_side_stream(self.device, self.sizes, self._capture_one)
        count = sum(len(r.graphs) for r in self.segments.values())
        buckets = len(self.sizes)
        logger.info("captured %d graph segments, %d token buckets, in %.1f s", count, buckets, seconds)

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    def run(self, token_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states ``[num_tokens, hidden]`` of the step's tokens.

        ``token_ids`` and ``batch`` are the step's exact-size inputs on the device. The padding
        rows of the static buffers keep earlier steps' values: valid ids and positions, whose
        rows nothing reads."""
        count = token_ids.shape[0]
        size = next(s for s in self.sizes if s >= count)
        self.token_ids[:count].copy_(token_ids)
        self.positions[:count].copy_(batch.positions)
        recorder = self.segments[size]
        for index, graph in enumerate(recorder.graphs):
            graph.replay()
            if index < len(recorder.holes):
                hole = recorder.holes[index]
                q, k, v, out = hole.q[:count], hole.k[:count], hole.v[:count], hole.out[:count]
                hole.module.attend(q, k, v, batch, out=out, rotary=hole.rotary)
        return self.hidden[size][:count]
