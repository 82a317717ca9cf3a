"""HostBatch: the lists of a step and their tensors; the packed upload's layout."""

from itertools import pairwise

import pytest
import torch

from fastgen.batch import HostBatch, PackedLists
from fastgen.plan import SequenceChunk


def mixed_batch() -> HostBatch:
    host = HostBatch()
    host.add(SequenceChunk(0, [7], 9, [], True), [3, 5, 8], 4)  # a decode at position 9
    host.add(SequenceChunk(1, [1, 2, 3, 4, 5], 2, [], False), [6, 2], 4)  # a prompt chunk
    host.add(SequenceChunk(2, [9, 8, 7], 0, [], True), [4], 4)  # a whole short prompt
    return host


def test_host_batch_lists():
    host = mixed_batch()
    assert host.num_decodes == 1 and host.num_seqs == 3 and host.num_tokens == 9
    assert host.positions == [9, 2, 3, 4, 5, 6, 0, 1, 2]
    # slot = block_table[position // 4] * 4 + position % 4
    assert host.slots == [8 * 4 + 1, 6 * 4 + 2, 6 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2, 16, 17, 18]
    assert host.query_start == [0, 1, 6, 9]
    assert host.context_lens == [10, 7, 3]
    assert host.sample_indices == [0, 8]
    assert host.max_query_len == 5 and not host.is_decode_only
    assert host.padded_block_tables() == [[3, 5, 8], [6, 2, 0], [4, 0, 0]]


def test_to_device_on_cpu_matches_the_lists():
    host = mixed_batch()
    token_ids, batch, sample_indices = host.to_device(torch.device("cpu"))
    assert token_ids.dtype == torch.int64 and token_ids.tolist() == host.token_ids
    assert batch.positions.tolist() == host.positions and batch.positions.dtype == torch.int64
    assert batch.slot_mapping.tolist() == host.slots
    assert batch.query_start.dtype == torch.int32 and batch.query_start.tolist() == host.query_start
    assert batch.context_lens.tolist() == host.context_lens
    assert batch.block_tables.dtype == torch.int32
    assert batch.block_tables.tolist() == host.padded_block_tables()
    assert sample_indices.tolist() == host.sample_indices
    assert batch.max_context_len == 10 and batch.num_decodes == 1
    assert batch.cpu_attention_plan is not None


def test_packed_lists_round_trip_with_aligned_starts():
    int64_lists = [[1, -2, 3], [], [2**40], [5, 6]]
    int32_lists = [[7], [8, 9, 10, 11, 12], [], [-1, 2**30]]
    packed = PackedLists.pack(int64_lists, int32_lists, pin=False)
    assert packed.buffer.dtype == torch.uint8
    assert all(offset % 16 == 0 for offset, _ in packed.int64_spans + packed.int32_spans)
    # a copy of the bytes (as the device gets them) unpacks to the same values
    int64_tensors, int32_tensors = packed.unpack(packed.buffer.clone())
    assert [t.dtype for t in int64_tensors] == [torch.int64] * 4
    assert [t.dtype for t in int32_tensors] == [torch.int32] * 4
    assert [t.tolist() for t in int64_tensors] == int64_lists
    assert [t.tolist() for t in int32_tensors] == int32_lists
    # the lists do not overlap: each one's bytes end before the next one's begin
    byte_spans = [(offset, 8 * length) for offset, length in packed.int64_spans]
    byte_spans += [(offset, 4 * length) for offset, length in packed.int32_spans]
    assert all(start + size <= following for (start, size), (following, _) in pairwise(byte_spans))
    assert packed.buffer.numel() % 16 == 0


@pytest.mark.gpu
def test_to_device_on_gpu_matches_cpu_with_aligned_tensors():
    host = mixed_batch()
    cpu_ids, cpu_batch, cpu_samples = host.to_device(torch.device("cpu"))
    gpu_ids, gpu_batch, gpu_samples = host.to_device(torch.device("cuda"))
    pairs = [(cpu_ids, gpu_ids), (cpu_samples, gpu_samples)] + [
        (getattr(cpu_batch, name), getattr(gpu_batch, name))
        for name in ("positions", "slot_mapping", "query_start", "context_lens", "block_tables")
    ]
    for expected, actual in pairs:
        assert actual.is_cuda and actual.dtype == expected.dtype
        assert torch.equal(actual.cpu(), expected)
        assert actual.data_ptr() % 16 == 0  # no new Triton variant from an unaligned pointer
