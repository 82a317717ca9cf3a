"""Paged attention: the Triton kernel against the reference on ragged batches.

On CPU the kernel runs under Triton's interpreter, in float32 and float16 only: the interpreter's
bfloat16 ``tl.dot`` is broken (and its bfloat16 casts truncate), so bfloat16 is tested on the GPU.
Inputs are fresh random numbers each run (the ``seed`` fixture prints the seed); outputs are
NaN-poisoned before the call; block tables are shuffled, and entries past a sequence's last block
point at a NaN-filled block, so a read past the context shows up as NaN. The split-KV scratch, left
unfilled by the kernel's host code, is NaN-filled here, so an entry the merge reads unwritten shows.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastgen.kernels import attention, attention_triton
from fastgen.kernels.attention import paged_attention_reference
from fastgen.kernels.attention_triton import paged_attention_triton

TOLERANCE = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_batch(
    specs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    strided_query: bool = False,
    cache_dtype: torch.dtype | None = None,
) -> dict:
    """A ragged batch: ``specs`` holds (query_len, context_len) per sequence; the caches are in
    ``cache_dtype`` (default: ``dtype``)."""
    blocks_needed = [math.ceil(context / block_size) for _, context in specs]
    num_blocks = sum(blocks_needed) + 2
    poison_block = num_blocks - 1
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    value_cache = torch.randn_like(key_cache)
    key_cache[poison_block] = float("nan")
    value_cache[poison_block] = float("nan")
    if cache_dtype is not None:  # e.g. float8 e4m3: keys spread over more of its range (callers scale down)
        key_cache, value_cache = (key_cache * 20).to(cache_dtype), value_cache.to(cache_dtype)
    order = torch.randperm(num_blocks - 1).tolist()
    block_tables = torch.full((len(specs), max(blocks_needed) + 2), poison_block, dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks_needed):
        block_tables[seq, :count] = torch.tensor(order[used:used + count], dtype=torch.int32)
        used += count
    query_lens = [query_len for query_len, _ in specs]
    query_start = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    num_tokens = int(query_start[-1])
    if strided_query:  # a slice of a fused QKV projection, as the models pass it
        qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
        query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    else:
        query = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    return {
        "query": query,
        "key_cache": key_cache,
        "value_cache": value_cache,
        "query_start": query_start.to(device),
        "context_lens": torch.tensor([context for _, context in specs], dtype=torch.int32, device=device),
        "block_tables": block_tables.to(device),
    }


def check(
    specs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    give_maxima: bool = True,
    strided_query: bool = False,
    num_decodes: int = 0,
    softcap: float | None = None,
    cache_dtype: torch.dtype | None = None,
) -> None:
    """Run the Triton kernel on a batch and compare it with the float32 reference."""
    batch = make_batch(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, strided_query,
                       cache_dtype)
    scale = head_dim**-0.5 if cache_dtype is None else head_dim**-0.5 / 20
    out = torch.full(batch["query"].shape, float("nan"), dtype=dtype, device=device)
    maxima = {}
    if give_maxima:
        maxima = {"max_query_len": max(q for q, _ in specs), "max_context_len": max(c for _, c in specs)}
    result = paged_attention_triton(
        **batch, scale=scale, sliding_window=sliding_window, out=out, num_splits=num_splits,
        num_decodes=num_decodes, softcap=softcap, **maxima,
    )
    assert result is out
    expected = paged_attention_reference(
        batch["query"].float(), batch["key_cache"].float(), batch["value_cache"].float(),
        batch["query_start"], batch["context_lens"], batch["block_tables"],
        scale=scale, sliding_window=sliding_window, softcap=softcap,
    )
    covered = torch.zeros(out.shape[0], dtype=torch.bool, device=device)
    covered[: int(batch["query_start"][-1])] = True
    assert not out[covered].isnan().any(), "unwritten or NaN outputs"
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def poison_split_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand out the split-KV scratch NaN-filled instead of uninitialised."""
    def poisoned(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    monkeypatch.setattr(attention_triton, "_empty_partials", poisoned)


@pytest.fixture(autouse=True)
def nan_split_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_split_scratch(monkeypatch)


def small_tile_config(
    head_dim: int, group: int, dtype: torch.dtype, prefill_heavy: bool = True, cache_bytes: int = 2
) -> dict:
    """Small tiles, so small test batches span many query tiles and key tiles."""
    return {
        "BLOCK_M": max(16, triton_next_pow2(group)), "BLOCK_N": 16,
        "BLOCK_M_DECODE": max(16, triton_next_pow2(group)), "BLOCK_N_DECODE": 16,
        "num_warps_prefill": 4, "num_warps_decode": 4, "num_stages": 2, "num_stages_decode": 2,
        "fp8_f16_dot": False,
    }


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_triton, "launch_config", small_tile_config)


def triton_next_pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()


DTYPES = [torch.float32, torch.float16]

# (num_heads, num_kv_heads, head_dim, block_size): every group ratio, head dim and block size once
SHAPES = [
    (4, 4, 64, 16),    # MHA
    (8, 2, 128, 32),   # GQA 4
    (7, 1, 80, 16),    # MQA, group 7, head_dim 80 (padded to 128)
    (14, 2, 96, 64),   # GQA 7, head_dim 96
    (2, 1, 256, 16),   # head_dim 256
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_only(shape, dtype, device, seed) -> None:
    num_heads, num_kv_heads, head_dim, block_size = shape
    specs = [(1, c) for c in (1, 17, 100, 64, 203)]
    check(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_mixed_batch(shape, dtype, device, seed) -> None:
    """Decodes and prompt chunks in one launch; chunks with and without earlier context."""
    num_heads, num_kv_heads, head_dim, block_size = shape
    specs = [(1, 50), (37, 37), (1, 7), (12, 160), (70, 85), (1, 1)]
    check(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, strided_query=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_only(dtype, device, seed) -> None:
    specs = [(150, 150), (3, 3), (40, 300)]
    check(specs, 8, 2, 64, 16, dtype, device, give_maxima=False)


@pytest.mark.parametrize("group", [1, 4, 7])
def test_small_tiles_many_query_and_key_tiles(group, small_tiles, device, seed) -> None:
    """Small tiles: chunks span many query tiles, the slot search sees many sequences, and a
    chunk's context spans many blocks; block_size 32 > BLOCK_N exercises one-block tiles."""
    specs = [(1, 33), (45, 45), (9, 300), (1, 128), (30, 64), (2, 2), (1, 16)]
    for block_size in (16, 32):
        check(specs, 2 * group, 2, 64, block_size, torch.float16, device)


@pytest.mark.parametrize(("window", "specs"), [
    (8, [(1, 100), (1, 5), (1, 64)]),
    (20, [(30, 30), (1, 90), (16, 140), (1, 3)]),
    (1, [(5, 40), (1, 17)]),
])
def test_sliding_window(window, specs, device, seed) -> None:
    check(specs, 8, 2, 80, 16, torch.float16, device, sliding_window=window)
    check(specs, 4, 4, 64, 32, torch.float32, device, sliding_window=window)


def test_softcap_everywhere(small_tiles, device, seed) -> None:
    """Gemma 2's capped scores (a cap of 1 changes them all) in decode, chunk, split and window paths."""
    specs = [(1, 70), (1, 9), (24, 60), (5, 5)]
    check(specs, 4, 2, 64, 16, torch.float32, device, softcap=1.0, num_decodes=2)
    check(specs, 4, 2, 64, 16, torch.float16, device, softcap=1.0, num_splits=3, sliding_window=20)
    batch = make_batch(specs, 4, 2, 64, 16, torch.float32, device)
    capped, plain = (
        paged_attention_reference(**batch, scale=1.0, softcap=cap) for cap in (1.0, None)
    )
    assert not torch.allclose(capped, plain)  # the cap matters at these scores


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_split_kv_decode(num_splits, device, seed) -> None:
    """The split-KV path and its merge, forced on at small sizes (some splits see no key)."""
    specs = [(1, 300), (1, 5), (1, 129), (1, 64)]
    check(specs, 8, 2, 64, 16, torch.float32, device, num_splits=num_splits)
    check(specs, 7, 1, 96, 32, torch.float16, device, num_splits=num_splits, sliding_window=50)


def test_split_kv_mixed(small_tiles, device, seed) -> None:
    specs = [(1, 200), (40, 90), (1, 3), (20, 20)]
    check(specs, 4, 2, 64, 16, torch.float16, device, num_splits=3)
    check(specs, 4, 2, 64, 16, torch.float16, device, num_splits=4, sliding_window=24)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_fp8_cache(shape, dtype, small_tiles, device, seed) -> None:
    """A float8 e4m3 cache (``kv_cache_dtype="fp8"``) is widened to the query's dtype on load:
    a mixed batch, and decodes split over the context."""
    specs = [(1, 40), (1, 7), (9, 30), (1, 65)]
    check(specs, *shape, dtype, device, num_decodes=2, cache_dtype=torch.float8_e4m3fn)
    check([(1, 70), (1, 33)], *shape, dtype, device, num_splits=3, num_decodes=2,
          cache_dtype=torch.float8_e4m3fn)


def test_fp8_cache_under_bfloat16_queries_with_float16_dots(monkeypatch, device, seed) -> None:
    """``fp8_f16_dot``: bfloat16 queries over a float8 cache take their dots in float16 (keys and
    values widened to it, the query clamped into its range); a mixed batch and split decodes. The
    interpreter runs it on the CPU: its dots are then float16, which it computes correctly."""
    def f16_dots(*args, **kwargs) -> dict:
        return dict(small_tile_config(*args, **kwargs), fp8_f16_dot=True)

    monkeypatch.setattr(attention_triton, "launch_config", f16_dots)
    fp8 = torch.float8_e4m3fn
    check([(1, 40), (1, 7), (9, 30), (1, 65)], 4, 2, 64, 16, torch.bfloat16, device, num_decodes=2,
          cache_dtype=fp8)
    check([(1, 70), (1, 33)], 4, 1, 64, 16, torch.bfloat16, device, num_splits=3, cache_dtype=fp8)


def test_fp8_cache_default_tiles(device, seed) -> None:
    """The decode tiles a one-byte cache gets by default (128 keys)."""
    assert attention_triton.launch_config(64, 1, torch.float32, cache_bytes=1)["BLOCK_N_DECODE"] == 128
    check([(1, 300), (1, 20), (1, 129)], 4, 4, 64, 16, torch.float32, device, num_decodes=3,
          cache_dtype=torch.float8_e4m3fn)


def test_empty_sequences_and_trailing_tokens(device, seed) -> None:
    """Sequences with no query tokens (CUDA-graph padding) are skipped, and output rows past the
    last sequence's tokens are left as they were."""
    batch = make_batch([(1, 40), (0, 0), (3, 30), (0, 0)], 4, 2, 64, 16, torch.float32, device)
    padded_query = torch.cat([batch["query"], torch.randn_like(batch["query"][:2])])
    out = torch.full_like(padded_query, 7.0)
    batch["query"] = padded_query
    paged_attention_triton(**batch, scale=0.125, out=out, max_query_len=3, max_context_len=40)
    expected = paged_attention_reference(**batch, scale=0.125, out=torch.full_like(padded_query, 7.0))
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
    assert (out[-2:] == 7.0).all()
    paged_attention_triton(**batch, scale=0.125, out=out, max_query_len=3, max_context_len=40,
                           num_splits=2)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)


def test_split_choice() -> None:
    """Decode-only launches: few sequences split, up to a round of resident programs and down to
    one 64-key tile a split; past a quarter round, up to four ways with 256 keys a split."""
    cpu = torch.device("cpu")  # the interpreter's 8 multiprocessors: 32 resident programs
    resident = attention_triton.DECODE_PROGRAMS_PER_SM * 8
    assert attention_triton.choose_num_splits(2, 32768, cpu) == resident // 2
    assert attention_triton.choose_num_splits(resident // 4, 32768, cpu) == 4
    assert attention_triton.choose_num_splits(2, 600, cpu) == 10  # at least 64 keys a split
    assert attention_triton.choose_num_splits(2, 200, cpu) == 4
    assert attention_triton.choose_num_splits(2, 64, cpu) == 1
    # past a quarter round: 9 programs fill 0.28 of a round, in 3 splits 0.84
    assert attention_triton.choose_num_splits(resident // 4 + 1, 32768, cpu) == 3
    assert attention_triton.choose_num_splits(resident // 4 + 1, 600, cpu) == 2  # 256 keys a split
    assert attention_triton.choose_num_splits(resident // 4 + 1, 500, cpu) == 1
    assert attention_triton.choose_num_splits(resident, 32768, cpu) == 1  # one full round
    assert attention_triton.choose_num_splits(10_000, 32768, cpu) == 1


@pytest.mark.parametrize(
    ("programs", "splits"),
    # GQA 32/8 at 1300 tokens, an H100's 528 resident decode programs (sweep of NOTES-kernels,
    # "Balanced splits"): 32, 64, 128, 256, 75 and 200 sequences; MHA 20 sequences
    [(256, 2), (512, 1), (1024, 1), (2048, 1), (600, 4), (1600, 4), (640, 4)],
)
def test_balanced_splits_on_measured_shapes(programs, splits) -> None:
    """The split counts the measured-fastest (or within 1% of it) on an H100."""
    assert attention_triton.balanced_splits(programs, 528, 4) == splits
    assert attention_triton.balanced_splits(programs, 528, 1) == 1


def test_split_choice_with_prompt_chunks() -> None:
    """Launches with prompt chunks split only to fill up to one round of resident programs: a
    launch of more than half a round does not split."""
    cpu = torch.device("cpu")
    wide = attention_triton.launch_config(128, 4, torch.bfloat16, prefill_heavy=True)
    narrow = attention_triton.launch_config(128, 4, torch.bfloat16, prefill_heavy=False)
    assert attention_triton.programs_per_sm(wide, has_prefill=True) == 1
    assert attention_triton.programs_per_sm(narrow, has_prefill=True) == 3
    decode_per_sm = attention_triton.DECODE_PROGRAMS_PER_SM
    assert attention_triton.programs_per_sm(wide, has_prefill=False) == decode_per_sm

    def choose(programs: int, context: int, per_sm: int) -> int:
        return attention_triton.choose_num_splits(programs, context, cpu, decode_only=False,
                                                  programs_per_sm=per_sm)

    for per_sm in (1, 3):
        round_ = per_sm * 8  # the interpreter's 8 multiprocessors
        assert choose(2, 32768, per_sm) == round_ // 2
        assert choose(round_ // 2, 32768, per_sm) == 2
        assert choose(round_ // 2 + 1, 32768, per_sm) == 1
        assert choose(round_ + 1, 32768, per_sm) == 1
        assert choose(2, 200, per_sm) == 1


def test_decode_launches_pipeline_two_tiles() -> None:
    config = attention_triton.launch_config(128, 4, torch.bfloat16, prefill_heavy=False)
    assert config["num_stages_decode"] == 2 and config["num_stages"] == 3
    assert attention_triton.launch_config(128, 4, torch.bfloat16, cache_bytes=1)["num_stages_decode"] == 2


def test_dispatcher_on_cpu_matches_reference(seed) -> None:
    """The CPU path (tests/kernels/test_attention_cpu.py) agrees with the reference to rounding."""
    batch = make_batch([(1, 20), (4, 9)], 4, 2, 64, 16, torch.float32, torch.device("cpu"))
    out = attention.paged_attention(**batch, scale=0.125)
    expected = paged_attention_reference(**batch, scale=0.125)
    torch.testing.assert_close(out, expected)


# ---- GPU: bfloat16 at real model shapes (python -m pytest -m gpu tests/kernels) ----

MODELS = {
    "llama2-7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),
    "phi2": (32, 32, 80),
}


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_real_shapes(model, block_size, seed) -> None:
    num_heads, num_kv_heads, head_dim = MODELS[model]
    cuda = torch.device("cuda")
    decode = [(1, int(c)) for c in torch.randint(1, 4096, (48,))]
    check(decode, num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16, cuda)
    mixed = [*decode[:24], (512, 512), (200, 1500), (56, 3000)]
    check(mixed, num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16, cuda, strided_query=True)
    few_long = [(1, 16000), (1, 9000)]
    check(few_long, num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16, cuda)
    check(mixed, num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16, cuda, sliding_window=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("f16_dots", [False, True], ids=["bf16-dots", "f16-dots"])
@pytest.mark.parametrize("model", ["llama2-7b", "llama3-8b"])
def test_gpu_fp8_cache(model, f16_dots, monkeypatch, seed) -> None:
    default = attention_triton.launch_config
    monkeypatch.setattr(attention_triton, "launch_config",
                        lambda *args, **kwargs: dict(default(*args, **kwargs), fp8_f16_dot=f16_dots))
    num_heads, num_kv_heads, head_dim = MODELS[model]
    cuda, fp8 = torch.device("cuda"), torch.float8_e4m3fn
    decode = [(1, int(c)) for c in torch.randint(1, 4096, (32,))]
    for specs in (decode, [*decode[:16], (512, 512), (200, 1500)], [(1, 16000), (1, 9000)]):
        check(specs, num_heads, num_kv_heads, head_dim, 16, torch.bfloat16, cuda, cache_dtype=fp8)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph(seed) -> None:
    """Decode-only steps capture into a CUDA graph and replay on new contents."""
    cuda = torch.device("cuda")
    batch = make_batch([(1, 2048)] * 8, 32, 8, 128, 16, torch.bfloat16, cuda)
    out = torch.empty_like(batch["query"])
    kwargs = {"scale": 128**-0.5, "max_query_len": 1, "max_context_len": 4096, "out": out}
    paged_attention_triton(**batch, **kwargs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_triton(**batch, **kwargs)
    for _ in range(2):
        batch["query"].copy_(torch.randn_like(batch["query"]))
        batch["context_lens"].copy_(torch.randint(1, 2048, (8,), device=cuda, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        expected = paged_attention_reference(
            batch["query"].float(), batch["key_cache"].float(), batch["value_cache"].float(),
            batch["query_start"], batch["context_lens"], batch["block_tables"], scale=128**-0.5,
        )
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
