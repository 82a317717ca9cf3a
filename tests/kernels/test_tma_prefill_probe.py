"""The prefill probe's TMA kernel (benchmarks/tma_prefill_probe.py) against torch's attention: a
probe's timings mean nothing if its kernel is wrong."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton

from benchmarks import tma_prefill_probe as probe


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_prefill_tma_matches_sdpa(kv_heads, device, seed) -> None:
    """Causal attention of ragged fresh prompts, read from fused QKV rows; the 32-query tiles
    leave one tile of the shorter prompt past its end (its store clipped) and partial tiles."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    heads, lengths = 4, [40, 70, 1]
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    qkv = torch.randn(sum(lengths), (heads + 2 * kv_heads) * probe.HEAD_DIM, device=device, dtype=dtype)
    starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    out = probe.prefill_tma(qkv, starts, max(lengths), heads, kv_heads, 32, 16, 4, 2, False)
    expected = probe.sdpa_rows(probe.sdpa(probe.sdpa_inputs(qkv.float(), lengths, heads, kv_heads)))
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
