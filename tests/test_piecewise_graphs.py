"""The host-side logic of piecewise graphs (capture and replay themselves run in the GPU tests):
token buckets, static copies, and the split of a model's forward at its attention layers, which the
runner makes by swapping the layers' forward for the time of a capture (the model knows nothing
of graphs)."""

from __future__ import annotations

import pytest
import torch

from fastgen.layers.attention import ForwardBatch, PagedAttention
from fastgen.layers.parallel import SINGLE
from fastgen.models.config import ModelConfig
from fastgen.models.loader import build_model
from fastgen.piecewise_graphs import (
    MixedGraphs,
    SegmentRecorder,
    StaticBuffers,
    attention_recorded_by,
    fused_qkv_rows,
    token_buckets,
)


@pytest.mark.parametrize("budget", [1, 8, 16, 100, 768, 2048, 5000])
def test_token_buckets_cover_every_count_up_to_the_budget(budget):
    """Every count fits a bucket; none is below 16 rows (a segment never runs decode-sized rows,
    whose fused QKV projection would write the KV cache inside it)."""
    sizes = token_buckets(budget)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max(budget, 16) and sizes[0] >= 16
    for count in range(1, budget + 1):
        bucket = next(s for s in sizes if s >= count)
        assert bucket - count < max(128, count)  # padding stays bounded
    assert len(sizes) <= 8 + budget // 128


def _split_qkv(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v as a model makes them: head views of one fused projection's output."""
    qkv = torch.randn(tokens, 4 * 8 + 2 * 2 * 8)
    q, k, v = qkv.split([32, 16, 16], dim=-1)
    return q.view(-1, 4, 8), k.view(-1, 2, 8), v.view(-1, 2, 8)


@pytest.mark.parametrize("inference_mode", [False, True])
def test_static_copies_keep_the_fused_qkv_layout(inference_mode):
    """One buffer and one copy for the fused projection, also under inference mode (graph capture
    runs in it), where views record no base."""
    buffers = StaticBuffers(32, torch.device("cpu"))
    recorder = SegmentRecorder(None, buffers, capture=False)
    with torch.inference_mode(inference_mode):
        q, k, v = _split_qkv(10)
        static = recorder._to_static(q, k, v)
        for copy, original in zip(static, (q, k, v), strict=True):
            assert torch.equal(copy, original) and copy.stride() == original.stride()
            assert copy.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
        assert len({x.untyped_storage().data_ptr() for x in static}) == 1
        assert list(buffers._buffers) == [("qkv", (64,), torch.float32)]
        # a second bucket reuses the same memory
        again = recorder._to_static(*(x[:5] for x in (q, k, v)))
        assert again[0].data_ptr() == static[0].data_ptr()


def test_fused_rows_only_for_adjacent_dense_parts():
    q, k, v = _split_qkv(6)
    rows = fused_qkv_rows(q, k, v)
    assert rows is not None and rows.shape == (6, 64) and rows.data_ptr() == q.data_ptr()
    assert fused_qkv_rows(q, v, k) is None  # out of order
    assert fused_qkv_rows(q, k, v.clone()) is None  # another tensor
    qkv = torch.randn(6, 80)  # a gap after the values
    gapped = [part.view(6, -1, 8) for part in qkv[:, :64].split([32, 16, 16], dim=-1)]
    assert fused_qkv_rows(*gapped) is None
    assert fused_qkv_rows(*(x[:0] for x in (q, k, v))) is None


def test_separate_tensors_get_one_buffer_each():
    recorder = SegmentRecorder(None, StaticBuffers(8, torch.device("cpu")), capture=False)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    static = recorder._to_static(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(static, (q, k, v), strict=True))
    assert len({t.data_ptr() for t in static}) == 3


def test_recorder_stands_in_for_attention_only_while_capturing():
    recorder = SegmentRecorder(None, StaticBuffers(8, torch.device("cpu")), capture=False)
    layer = PagedAttention(4, 2, 8, scale=1.0, sliding_window=None)
    holder = torch.nn.ModuleList([layer])
    unused = torch.empty(0, dtype=torch.int32)
    batch = ForwardBatch(torch.zeros(3, dtype=torch.int64), unused, unused, unused, unused, 3, 3)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    with attention_recorded_by(holder, recorder):
        out = layer(q, k, v, batch)
    assert out.shape == q.shape
    assert len(recorder.holes) == 1 and recorder.holes[0].module is layer and recorder.holes[0].out is out
    assert recorder.graphs == []  # nothing captured without capture=True
    assert "forward" not in vars(layer)  # the layer's own forward again
    with pytest.raises(IndexError):  # ... which writes its (here unallocated) KV cache
        layer(q, k, v, batch)


TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


class SpyingRecorder(SegmentRecorder):
    """Notes the layer and the query each attention call hands over."""

    def __init__(self, buffers: StaticBuffers):
        super().__init__(None, buffers, capture=False)
        self.seen: list[tuple[PagedAttention, torch.Tensor]] = []

    def attention(self, module, q, k, v, batch, rotary=None):
        self.seen.append((module, q.clone()))
        return super().attention(module, q, k, v, batch, rotary)


@pytest.mark.parametrize(
    "family",
    [
        dict(model_type="llama"),
        dict(model_type="phi", partial_rotary_factor=0.5),  # attention and MLP side by side
        dict(model_type="gemma2", head_dim=8),  # norms around each block's output
        dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=64),
        dict(model_type="opt", ffn_dim=64, do_layer_norm_before=False, word_embed_proj_dim=16),  # post-norm
    ],
)
def test_a_models_forward_splits_at_each_attention_layer(family):
    """A forward of every block shape, recorded on the CPU without graphs: one hole per layer, in
    order, whose output buffer is what the model continues with; afterwards the layers attend
    for themselves again."""
    config = ModelConfig.from_dict({**TINY, **family})
    model = build_model(
        None, config, dtype=torch.float32, device=torch.device("cpu"), tp=SINGLE, max_model_len=64,
        load_format="dummy",
    )  # fmt: skip
    graphs = MixedGraphs(model, device=torch.device("cpu"), max_tokens=16)
    graphs.token_ids.copy_(torch.randint(0, 64, (16,)))
    graphs.positions.copy_(torch.arange(16))
    recorder = SpyingRecorder(graphs.buffers)
    hidden = graphs._forward(12, recorder)
    layers = [module for module in model.modules() if isinstance(module, PagedAttention)]
    assert hidden.shape == (12, config.embedding_dim or config.hidden_size) and len(layers) == 3
    assert [hole.module for hole in recorder.holes] == [module for module, _ in recorder.seen] == layers
    kv_heads = config.num_kv_heads
    assert all(hole.out.shape == (12, 4, 8) and hole.k.shape == (12, kv_heads, 8) for hole in recorder.holes)
    last_q = recorder.seen[-1][1]  # the static buffers are shared: they hold the last layer's copy
    assert torch.equal(recorder.holes[-1].q, last_q) and last_q.abs().sum() > 0
    assert all("forward" not in vars(layer) for layer in layers)


def test_a_rotary_fused_into_the_cache_write_travels_to_its_hole(monkeypatch):
    """With the rotary_kv fusion the layers hand over unrotated q/k and their rotary: each hole
    keeps its layer's rotary for the attention it replays."""
    from fastgen.models.decoder import Attention

    monkeypatch.setattr(PagedAttention, "fuses_rotary", staticmethod(lambda q: True))
    config = ModelConfig.from_dict({**TINY, "model_type": "llama"})
    model = build_model(
        None, config, dtype=torch.float32, device=torch.device("cpu"), tp=SINGLE, max_model_len=64,
        load_format="dummy",
    )  # fmt: skip
    graphs = MixedGraphs(model, device=torch.device("cpu"), max_tokens=16)
    graphs.token_ids.copy_(torch.randint(0, 64, (16,)))
    graphs.positions.copy_(torch.arange(16))
    recorder = SegmentRecorder(None, graphs.buffers, capture=False)
    graphs._forward(12, recorder)
    rotaries = [module.rotary for module in model.modules() if isinstance(module, Attention)]
    assert len(rotaries) == 3 and all(rotary is not None for rotary in rotaries)
    assert [hole.rotary for hole in recorder.holes] == rotaries
