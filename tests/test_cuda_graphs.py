"""Which decode graphs are captured and which one a step replays (pure functions: no GPU).

The capture and replay themselves run in the GPU tests (`test_gpu_engine.py`, graphs on and off).
"""

from __future__ import annotations

import pytest

from fastgen.cuda_graphs import BUCKETED_BATCH, capture_sizes, context_buckets, pick_graph


def test_small_batches_get_a_graph_per_context_bucket() -> None:
    assert context_buckets(1, 4096) == [512, 2048, 4096]
    assert context_buckets(BUCKETED_BATCH, 4096) == [512, 2048, 4096]
    assert context_buckets(BUCKETED_BATCH + 8, 4096) == [4096]  # larger batches fill the GPU unsplit
    assert context_buckets(1, 2048) == [512, 2048]  # no bucket at or past the model's length twice
    assert context_buckets(1, 1000) == [512, 1000]
    assert context_buckets(1, 300) == [300]
    assert all(buckets == sorted(buckets) for buckets in (context_buckets(s, 8192) for s in (1, 8, 64)))


@pytest.mark.parametrize("max_model_len", [300, 1000, 4096, 32768])
def test_a_step_replays_the_smallest_graph_that_holds_it(max_model_len) -> None:
    sizes = capture_sizes(64)
    for num_seqs in (1, 3, 8, 9, 64):
        for longest in sorted({1, 511, 512, 513, 2048, 2049, max_model_len}):
            if longest > max_model_len:
                continue
            size, bucket = pick_graph(sizes, max_model_len, num_seqs, longest)
            assert size == min(s for s in sizes if s >= num_seqs)
            assert bucket in context_buckets(size, max_model_len) and bucket >= longest
            smaller = [b for b in context_buckets(size, max_model_len) if b < bucket]
            assert all(b < longest for b in smaller), "a shorter bucket held the step"
