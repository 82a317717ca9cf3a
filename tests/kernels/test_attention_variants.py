"""Start-up warm-up launches every paged-attention variant that serving can launch.

Triton compiles a kernel per variant: its constexprs and launch options, and a class of every
argument it specializes on (integers equal to 1, divisible by 16 or neither; pointers 16-byte
aligned or not). The kernels are replaced here by recorders that note each launch's variant key
the way Triton forms it, so the test runs on the CPU: the variants of many random serving-like
batches must all be among those of `warm_up_attention`.
"""

from __future__ import annotations

import random

import pytest
import torch
from fastgen.kernels import attention_triton

from fastgen.kernel_warmup import split_counts, warm_up_attention
from fastgen.layers.attention import PagedAttention


def _argument_class(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return ("pointer", value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return "one" if value == 1 else "multiple of 16" if value % 16 == 0 else "int"
    if isinstance(value, float):
        return "float"
    return value


class _VariantRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **constexprs)`` records a variant key."""

    def __init__(self, kernel: object):
        self.names = list(kernel.arg_names)
        free = getattr(kernel, "do_not_specialize", None) or kernel.kwargs.get("do_not_specialize") or ()
        self.unspecialized = set(free)
        self.variants: set[tuple] = set()

    def __getitem__(self, grid: tuple):
        def launch(*args: object, **keywords: object) -> None:
            specialized = tuple(
                (name, _argument_class(value))
                for name, value in zip(self.names, args)
                if name not in self.unspecialized
            )
            self.variants.add(specialized + tuple(sorted(keywords.items())))

        return launch


@pytest.fixture
def recorders(monkeypatch):
    main = _VariantRecorder(attention_triton._paged_attention_kernel)
    merge = _VariantRecorder(attention_triton._merge_splits_kernel)
    monkeypatch.setattr(attention_triton, "_paged_attention_kernel", main)
    monkeypatch.setattr(attention_triton, "_merge_splits_kernel", merge)
    return main, merge


def _layer(num_heads: int, num_kv_heads: int, head_dim: int, softcap, cache_dtype, blocks: int):
    layer = PagedAttention(
        num_heads, num_kv_heads, head_dim, scale=head_dim**-0.5, sliding_window=None, softcap=softcap
    )
    layer.key_cache = torch.zeros(blocks, 16, num_kv_heads, head_dim, dtype=cache_dtype)
    layer.value_cache = torch.zeros_like(layer.key_cache)
    return layer


def _random_step(layer: PagedAttention, dtype: torch.dtype, rng: random.Random) -> None:
    """One attention call shaped like a Dynamic SplitFuse step: decodes first, then chunks."""
    num_seqs = rng.randint(1, 48)
    num_decodes = rng.randint(0, num_seqs)
    query_lens = [1] * num_decodes + [
        rng.choice([1, 2, 7, 16, 33, 200, 768]) for _ in range(num_seqs - num_decodes)
    ]
    contexts = [length + rng.choice([0, 1, 15, 16, 17, 300, 2047, 4000]) for length in query_lens]
    block_size = layer.key_cache.shape[1]
    width = max(-(-c // block_size) for c in contexts) + rng.choice([0, 0, 1, 5])  # padded tables
    num_tokens = sum(query_lens)
    fused_width = (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim
    fused = torch.zeros(num_tokens, fused_width, dtype=dtype)
    query = fused[:, : layer.num_heads * layer.head_dim].view(num_tokens, layer.num_heads, layer.head_dim)
    starts = [0]
    for length in query_lens:
        starts.append(starts[-1] + length)
    attention_triton.paged_attention_triton(
        query,
        layer.key_cache,
        layer.value_cache,
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor(contexts, dtype=torch.int32),
        torch.zeros(num_seqs, width, dtype=torch.int32),
        scale=layer.scale,
        softcap=layer.softcap,
        sliding_window=rng.choice([None, 4096]),
        max_query_len=max(query_lens),
        max_context_len=max(contexts),
        num_decodes=num_decodes,
        num_splits=rng.choice([None, None, rng.randint(1, attention_triton.MAX_SPLITS)]),
    )


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "softcap", "cache_dtype"),
    [
        (32, 8, 128, None, torch.bfloat16),  # Llama-3-8B
        (32, 32, 128, None, torch.bfloat16),  # Llama-2-7B
        (8, 4, 256, 50.0, torch.bfloat16),  # Gemma 2
        (32, 8, 128, None, torch.float8_e4m3fn),  # FP8 KV cache
        (16, 16, 64, None, torch.float16),
    ],
)
def test_warm_up_covers_every_variant_serving_launches(
    recorders, num_heads, num_kv_heads, head_dim, softcap, cache_dtype
):
    dtype = torch.float16 if cache_dtype == torch.float16 else torch.bfloat16
    layer = _layer(num_heads, num_kv_heads, head_dim, softcap, cache_dtype, blocks=2)
    launches = warm_up_attention([layer, layer], dtype)
    assert launches == 3 * len(split_counts())  # one signature: the second layer adds nothing
    warmed = [set(recorder.variants) for recorder in recorders]
    for recorder in recorders:
        recorder.variants.clear()
    rng = random.Random(20261206)
    for _ in range(300):
        _random_step(layer, dtype, rng)
    for recorder, known in zip(recorders, warmed):
        assert recorder.variants, "the random steps launched nothing"
        assert recorder.variants <= known, recorder.variants - known


def test_split_counts_reach_every_merge_width():
    counts = split_counts()
    assert counts[0] == 1 and counts[-1] == attention_triton.MAX_SPLITS
    widths = {1 << (n - 1).bit_length() for n in range(2, attention_triton.MAX_SPLITS + 1)}
    assert widths <= set(counts)
