"""The host-side logic of piecewise graphs (capture and replay themselves run in the GPU tests)."""

from __future__ import annotations

import pytest
import torch

from fastgen.layers.attention import ForwardBatch, PagedAttention
from fastgen.piecewise_graphs import SegmentRecorder, StaticBuffers, token_buckets


@pytest.mark.parametrize("budget", [1, 16, 100, 768, 2048, 5000])
def test_token_buckets_cover_every_count_up_to_the_budget(budget):
    sizes = token_buckets(budget)
    assert sizes == sorted(set(sizes)) and sizes[-1] == budget
    for count in range(1, budget + 1):
        bucket = next(s for s in sizes if s >= count)
        assert bucket - count < max(128, count)  # padding stays bounded
    assert len(sizes) <= 8 + budget // 128


def test_static_copies_keep_the_fused_qkv_layout():
    buffers = StaticBuffers(32, torch.device("cpu"))
    recorder = SegmentRecorder(None, buffers, capture=False)
    qkv = torch.randn(10, 4 * 8 + 2 * 2 * 8)
    q, k, v = qkv.split([32, 16, 16], dim=-1)
    q, k, v = q.view(-1, 4, 8), k.view(-1, 2, 8), v.view(-1, 2, 8)
    static = recorder._to_static(q, k, v)
    for copy, original in zip(static, (q, k, v), strict=True):
        assert torch.equal(copy, original) and copy.stride() == original.stride()
        assert copy.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
    # a second bucket reuses the same memory
    again = recorder._to_static(*(x[:5] for x in (q, k, v)))
    assert again[0].data_ptr() == static[0].data_ptr()


def test_separate_tensors_get_one_buffer_each():
    recorder = SegmentRecorder(None, StaticBuffers(8, torch.device("cpu")), capture=False)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    static = recorder._to_static(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(static, (q, k, v), strict=True))
    assert len({t.data_ptr() for t in static}) == 3


def test_recorder_stands_in_for_attention_and_records_holes():
    recorder = SegmentRecorder(None, StaticBuffers(8, torch.device("cpu")), capture=False)
    layer = PagedAttention(4, 2, 8, scale=1.0, sliding_window=None)
    unused = torch.empty(0, dtype=torch.int32)
    positions = torch.zeros(3, dtype=torch.int64)
    batch = ForwardBatch(positions, unused, unused, unused, unused, 3, 3, recorder=recorder)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    out = layer(q, k, v, batch)
    assert out.shape == q.shape
    assert len(recorder.holes) == 1 and recorder.holes[0].module is layer and recorder.holes[0].out is out
    assert recorder.graphs == []  # nothing captured without capture=True
