"""Rotary fused with the KV-cache write: bit for bit what ``apply_rotary`` then ``write_kv_cache``
give (the query, and the cache slots), for the Triton kernel and the reference alike.

On CPU the kernels run under Triton's interpreter (float32, float16, the float8 cache); bfloat16
runs on the GPU (``python -m pytest -m gpu tests/kernels/test_rotary_kv.py``).
"""

from __future__ import annotations

import pytest
import torch
from fastgen.kernels import cache, rotary, rotary_kv

DTYPES = [torch.float32, torch.float16]
UNFUSED = {
    "triton": (rotary.apply_rotary_triton, cache.write_kv_cache_triton),
    "reference": (rotary.apply_rotary_reference, cache.write_kv_cache_reference),
}
FUSED = {
    "triton": rotary_kv.rotary_and_write_kv_cache_triton,
    "reference": rotary_kv.rotary_and_write_kv_cache_reference,
}


def make_step(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
    dtype: torch.dtype, device: torch.device, *, num_blocks: int = 6, block_size: int = 16,
    cache_dtype: torch.dtype | None = None, scale: float = 1.0, padding: tuple[int, ...] = (1, -2),
) -> dict:
    """A step's fused QKV output (q, k, v strided views of it), positions, scattered slots with
    ``padding`` tokens at -1, a random cos/sin table, and NaN-poisoned caches (zeros in float8)."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, dtype=dtype, device=device) * scale
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    max_positions = 300
    angles = torch.rand(max_positions, rotary_dim // 2, device=device) * 6.3
    slot_mapping = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slot_mapping[list(padding)] = -1  # padding tokens write nothing
    cache_dtype = cache_dtype or dtype
    fill = 0.0 if cache_dtype == torch.float8_e4m3fn else float("nan")
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, fill, device=device).to(cache_dtype)
    return dict(
        positions=torch.randint(0, max_positions, (num_tokens,), device=device),
        query=q.view(num_tokens, num_heads, head_dim),
        key=k.view(num_tokens, num_kv_heads, head_dim),
        value=v.view(num_tokens, num_kv_heads, head_dim),
        key_cache=key_cache,
        value_cache=key_cache.clone(),
        slot_mapping=slot_mapping,
        cos_sin_cache=torch.cat([angles.cos(), angles.sin()], dim=-1),
        rotary_dim=rotary_dim,
    )


def copy_step(step: dict) -> dict:
    """An independent copy, with q, k, v still strided views of one QKV tensor."""
    qkv = step["query"]._base.clone()
    sizes = [step[name].shape[1] * step[name].shape[2] for name in ("query", "key", "value")]
    q, k, v = qkv.split(sizes, dim=-1)
    copied = {name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in step.items()}
    for name, view in zip(("query", "key", "value"), (q, k, v), strict=True):
        copied[name] = view.view(step[name].shape)
    return copied


def run_unfused(backend: str, step: dict) -> None:
    apply_rotary, write_kv_cache = UNFUSED[backend]
    apply_rotary(step["positions"], step["query"], step["key"], step["cos_sin_cache"], step["rotary_dim"])
    write_kv_cache(step["key"], step["value"], step["key_cache"], step["value_cache"], step["slot_mapping"])


def run_fused(backend: str, step: dict) -> torch.Tensor:
    return FUSED[backend](**step)


FLOAT8_NEGATIVE_ZERO = 0x80


def bits(x: torch.Tensor) -> torch.Tensor:
    """``x``'s bit pattern, so that NaN slots (never written) compare equal to themselves; a float8
    cache's -0 counts as +0. On the H100, 2 of 3.3 million fp8 key entries came out as zeros of
    opposite signs (seed 1770606513): the attention reads both as the same 0."""
    pattern = x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()])
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        pattern = pattern.masked_fill(pattern == FLOAT8_NEGATIVE_ZERO, 0)
    return pattern


def bit_difference(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """How far apart two tensors are: how many elements differ, and by how many units in the last
    place at most (the distance between their bit patterns), so a failure says rounding from error."""
    differ = bits(actual) != bits(expected)
    if not differ.any():
        return "equal"
    ulps = (bits(actual).long() - bits(expected).long()).abs()[differ]
    return (f"{int(differ.sum())} of {actual.numel()} elements differ, by up to {int(ulps.max())} ulps "
            f"(max |difference| {(actual.float() - expected.float()).abs().nan_to_num(0.0).max():.3g})")


def assert_same_as_unfused(backend: str, fused: dict, unfused: dict) -> None:
    key_before = fused["key"].clone()
    result = run_fused(backend, fused)
    run_unfused(backend, unfused)
    assert result is fused["query"]
    for name in ("query", "value", "key_cache", "value_cache"):
        difference = bit_difference(fused[name], unfused[name])
        assert difference == "equal", f"{name}: {difference}"
    assert torch.equal(fused["key"], key_before), "key itself is not rotated"


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "rotary_dim"), [
    (4, 4, 64, 64),   # MHA, full rotary
    (6, 2, 32, 32),   # GQA
    (5, 5, 80, 32),   # partial rotary (Phi-2's head and rotary dims)
    (7, 1, 48, 16),   # MQA, partial rotary, head counts not powers of two
    (3, 3, 80, 80),   # full rotary whose half (40) is not a power of two
])
def test_matches_rotary_then_cache_write(num_heads, num_kv_heads, head_dim, rotary_dim, dtype, backend,
                                         device, seed) -> None:
    step = make_step(9, num_heads, num_kv_heads, head_dim, rotary_dim, dtype, device)
    assert_same_as_unfused(backend, step, copy_step(step))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_float8_cache(backend, device, seed) -> None:
    """A float8 e4m3 cache: the rotated key rounded to float16 first, then saturated to +-448 and
    rounded to nearest, exactly as the unfused write does."""
    step = make_step(7, 4, 2, 64, 32, torch.float16, device, cache_dtype=torch.float8_e4m3fn, scale=150.0)
    step["key"][0, 0, :3] = torch.tensor([1000.0, 3e-3, -600.0])  # saturated, subnormal, saturated
    assert_same_as_unfused(backend, step, copy_step(step))
    assert step["key_cache"].float().abs().max() == 448.0


def test_triton_matches_the_reference(device, seed) -> None:
    """The interpreter's float32 math is the reference's, to the bit."""
    step = make_step(6, 4, 2, 64, 48, torch.float32, device)
    other = copy_step(step)
    run_fused("triton", step)
    run_fused("reference", other)
    for name in ("query", "key_cache", "value_cache"):
        assert torch.equal(bits(step[name]), bits(other[name])), name


def test_no_tokens_and_bad_rotary_dim(device) -> None:
    step = make_step(3, 2, 2, 16, 16, torch.float32, device)
    empty = make_step(0, 2, 2, 16, 16, torch.float32, device, padding=())
    before = empty["key_cache"].clone()
    assert run_fused("triton", empty) is empty["query"]
    assert torch.equal(bits(empty["key_cache"]), bits(before))
    with pytest.raises(ValueError, match="rotary_dim"):
        run_fused("triton", {**step, "rotary_dim": 7})


def test_dispatch_on_cpu_is_the_reference(monkeypatch, seed) -> None:
    calls = []
    monkeypatch.setattr(rotary_kv, "rotary_and_write_kv_cache_reference", lambda *a: calls.append(a) or a[1])
    step = make_step(3, 2, 2, 16, 16, torch.float32, torch.device("cpu"))
    assert rotary_kv.rotary_and_write_kv_cache(*step.values()) is step["query"] and len(calls) == 1


# ---- GPU: bfloat16 and float8 caches at real shapes (python -m pytest -m gpu tests/kernels) ----


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["bf16-cache", "fp8-cache"])
@pytest.mark.parametrize("num_tokens", [1, 7, 2048])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "rotary_dim"), [
    (32, 32, 128, 128),  # Llama-2-7B
    (32, 8, 128, 128),   # Llama-3-8B
    (32, 32, 80, 32),    # Phi-2
    (14, 2, 64, 64),     # Qwen2-0.5B
])
def test_gpu_bfloat16_matches_unfused_kernels(num_heads, num_kv_heads, head_dim, rotary_dim, num_tokens,
                                              cache_dtype, seed) -> None:
    step = make_step(num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim, torch.bfloat16,
                     torch.device("cuda"), num_blocks=200, cache_dtype=cache_dtype, scale=60.0,
                     padding=() if num_tokens == 1 else (1, -2))
    assert_same_as_unfused("triton", step, copy_step(step))


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["bf16-cache", "fp8-cache"])
def test_gpu_triton_kernels_match_the_torch_reference(cache_dtype, seed) -> None:
    """Without FMA contraction the kernels round each product as torch's separate operations do:
    fused and unfused Triton kernels give the reference's bits on the GPU too (Llama-3-8B shape)."""
    step = make_step(37, 32, 8, 128, 128, torch.bfloat16, torch.device("cuda"), num_blocks=200,
                     cache_dtype=cache_dtype, scale=60.0)
    for backend_run in (run_fused, lambda backend, step: run_unfused(backend, step)):
        triton_step, reference_step = copy_step(step), copy_step(step)
        backend_run("triton", triton_step)
        backend_run("reference", reference_step)
        for name in ("query", "value", "key_cache", "value_cache"):
            difference = bit_difference(triton_step[name], reference_step[name])
            assert difference == "equal", f"{name}: {difference}"
