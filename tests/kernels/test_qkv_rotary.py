"""The QKV projection with rotary and cache write in its epilogue (``qkv_rotary``) against the two
kernels it replaces: the small-batch projection (with the same launch config and prologue) and
``rotary_and_write_kv_cache``. Bit for bit: the projection's rows (queries rotated, keys as
projected, values), the new residual, and every cache slot (NaN-poisoned before, so a slot written
by one path and not the other shows).

On CPU the kernels run under Triton's interpreter (float32, float16; FP8 weights with float16
activations; FP8 caches), through both multiply paths (one row: CUDA cores; more: tensor cores).
The ``gpu`` tests run bfloat16 at the Llama-2-7B and Llama-3-8B shapes, where the epilogue's
rounded products (``mul.rn``) meet the rotary kernel compiled without FMA contraction.
"""

from __future__ import annotations

import pytest
import torch
from fastgen.kernels import fused_linear, gemv, qkv_rotary, rotary_kv
from fastgen.kernels.qkv_rotary import NormArgs, RotaryKVWrite

from .test_gemv import fp8_weight
from .test_rotary_kv import bit_difference

EPS = 1e-5


def make_write(rows: int, num_heads: int, num_kv_heads: int, head_dim: int, device, *, rotary_dim=None,
               cache_dtype=torch.float16, num_blocks: int = 4, block_size: int = 8) -> RotaryKVWrite:
    """Positions, scattered slots (the second row padding when there are two or more), a random
    cos/sin table and poisoned caches (zeros in float8, which has no NaN)."""
    rotary_dim = rotary_dim or head_dim
    angles = torch.rand(200, rotary_dim // 2, device=device) * 6.3
    slots = torch.randperm(num_blocks * block_size, device=device)[:rows]
    if rows >= 2:
        slots[1] = -1
    fill = 0.0 if cache_dtype == torch.float8_e4m3fn else float("nan")
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, fill, device=device).to(cache_dtype)
    return RotaryKVWrite(
        positions=torch.randint(0, 200, (rows,), device=device),
        slot_mapping=slots,
        cos_sin_cache=torch.cat([angles.cos(), angles.sin()], dim=-1),
        key_cache=key_cache,
        value_cache=key_cache.clone(),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )


def copy_write(write: RotaryKVWrite) -> RotaryKVWrite:
    return RotaryKVWrite(write.positions, write.slot_mapping, write.cos_sin_cache, write.key_cache.clone(),
                         write.value_cache.clone(), write.num_heads, write.num_kv_heads, write.head_dim)


def make_inputs(rows: int, hidden: int, write: RotaryKVWrite, dtype, device, *, fp8: bool, bias: bool,
                norm: str) -> dict:
    """x, weight (and FP8 scale), bias, and the norm ("none", "norm", "norm+residual")."""
    n = (write.num_heads + 2 * write.num_kv_heads) * write.head_dim
    if fp8:
        weight, scale = fp8_weight(n, hidden, device)
    else:
        weight, scale = (torch.randn(n, hidden, device=device) / hidden**0.5).to(dtype), None
    norm_args = None
    if norm != "none":
        residual = torch.randn(rows, hidden, device=device).to(dtype) if norm == "norm+residual" else None
        norm_args = NormArgs(torch.rand(hidden, device=device).to(dtype) + 0.5, EPS, residual)
    return dict(
        x=torch.randn(rows, hidden, device=device).to(dtype),
        weight=weight,
        bias=torch.randn(n, device=device).to(dtype) if bias else None,
        weight_scale=scale,
        norm=norm_args,
    )


def with_residual_out(inputs: dict) -> dict:
    """A copy whose norm (if it adds a residual) writes its new residual into a buffer of its own."""
    norm = inputs["norm"]
    if norm is None or norm.residual is None:
        return dict(inputs)
    buffer = torch.full_like(norm.residual, float("nan"))
    return {**inputs, "norm": NormArgs(norm.weight, norm.eps, norm.residual, buffer)}


def run_unfused_kernels(inputs: dict, write: RotaryKVWrite) -> torch.Tensor:
    """The small-batch projection (its prologue, the fused kernel's config) and then the fused
    rotary + cache write, both Triton."""
    x, weight, bias, scale, norm = (inputs[name] for name in ("x", "weight", "bias", "weight_scale", "norm"))
    config = qkv_rotary._fused_config(x.shape[0], weight, write)
    if norm is None:
        qkv = gemv.linear_small_batch_with_config(x, weight, bias, None, config, scale)
    else:
        qkv = fused_linear.rms_norm_linear_triton(x, norm.weight, norm.eps, weight, bias, norm.residual,
                                                  scale, norm.residual_out, config=config)
        qkv = qkv if norm.residual is None else qkv[0]
    q, k, v = write.split(qkv)
    rotary_kv.rotary_and_write_kv_cache_triton(write.positions, q, k, v, write.key_cache, write.value_cache,
                                               write.slot_mapping, write.cos_sin_cache, write.rotary_dim)
    return qkv


def assert_same_as_unfused(inputs: dict, write: RotaryKVWrite) -> None:
    fused_inputs, unfused_inputs = with_residual_out(inputs), with_residual_out(inputs)
    fused_write, unfused_write = copy_write(write), copy_write(write)
    fused = qkv_rotary.qkv_rotary_linear_triton(**fused_inputs, write=fused_write)
    assert fused is not None, "the fused kernel declined"
    unfused = run_unfused_kernels(unfused_inputs, unfused_write)
    pairs = {"qkv": (fused, unfused), "key_cache": (fused_write.key_cache, unfused_write.key_cache),
             "value_cache": (fused_write.value_cache, unfused_write.value_cache)}
    if fused_inputs["norm"] is not None and fused_inputs["norm"].residual is not None:
        pairs["residual_out"] = (fused_inputs["norm"].residual_out, unfused_inputs["norm"].residual_out)
    for name, (actual, expected) in pairs.items():
        difference = bit_difference(actual, expected)
        assert difference == "equal", f"{name}: {difference}"
    if write.value_cache.dtype != torch.float8_e4m3fn:  # every valid row's keys and values, nothing else
        expected_count = int((write.slot_mapping >= 0).sum()) * write.num_kv_heads * write.head_dim
        for cache in (fused_write.key_cache, fused_write.value_cache):
            assert int((~cache.isnan()).sum()) == expected_count


CASES = [
    # rows, heads, kv heads, head_dim, hidden: one row (CUDA cores, 8 pairs a tile), more (tensor cores, 32)
    pytest.param(1, 4, 2, 32, 96, id="1-row-gqa-hd32"),
    pytest.param(1, 3, 3, 16, 256, id="1-row-mha-hd16"),
    pytest.param(2, 2, 1, 64, 96, id="2-rows-mqa-hd64"),
    pytest.param(5, 2, 2, 64, 64, id="5-rows-mha-hd64"),
]


@pytest.mark.parametrize(("rows", "heads", "kv_heads", "head_dim", "hidden"), CASES)
@pytest.mark.parametrize("norm", ["none", "norm", "norm+residual"])
@pytest.mark.parametrize(("dtype", "fp8", "bias"), [
    pytest.param(torch.float32, False, True, id="float32-bias"),
    pytest.param(torch.float16, False, False, id="float16"),
    pytest.param(torch.float16, True, True, id="fp8-weights-bias"),
])  # fmt: skip
def test_equals_projection_then_rotary_kv(rows, heads, kv_heads, head_dim, hidden, norm, dtype, fp8, bias,
                                          device, seed) -> None:
    write = make_write(rows, heads, kv_heads, head_dim, device, cache_dtype=dtype)
    inputs = make_inputs(rows, hidden, write, dtype, device, fp8=fp8, bias=bias, norm=norm)
    assert_same_as_unfused(inputs, write)


def test_float8_cache(device, seed) -> None:
    write = make_write(3, 4, 2, 64, device, cache_dtype=torch.float8_e4m3fn)
    inputs = make_inputs(3, 128, write, torch.float16, device, fp8=False, bias=False, norm="norm+residual")
    assert_same_as_unfused(inputs, write)


def test_dispatch_falls_back_where_the_kernel_declines(device, seed) -> None:
    """Partial rotary, and pairs that a tile would split across heads (two rows take 32 pairs a
    tile; a head of 32 features has 16): the dispatcher runs the two kernels instead, with the same
    result as the references."""
    partial = make_write(1, 2, 2, 32, device, rotary_dim=16)
    narrow = make_write(2, 2, 2, 32, device)
    for write in (partial, narrow):
        rows = write.positions.shape[0]
        inputs = make_inputs(rows, 64, write, torch.float32, device, fp8=False, bias=False, norm="none")
        assert qkv_rotary.qkv_rotary_linear_triton(**inputs, write=copy_write(write)) is None
        ours, reference = copy_write(write), copy_write(write)
        qkv = qkv_rotary.qkv_rotary_linear(**inputs, write=ours)
        expected = qkv_rotary.qkv_rotary_linear_reference(**inputs, write=reference)
        torch.testing.assert_close(qkv, expected, equal_nan=True)
        torch.testing.assert_close(ours.key_cache, reference.key_cache, equal_nan=True)


def test_reference_composes_the_unfused_references(device, seed) -> None:
    """The reference rotates the queries, keeps the keys as projected and writes the caches."""
    write = make_write(3, 2, 1, 16, device, cache_dtype=torch.float32)
    inputs = make_inputs(3, 48, write, torch.float32, device, fp8=False, bias=True, norm="none")
    qkv = qkv_rotary.qkv_rotary_linear_reference(**inputs, write=write)
    projected = inputs["x"] @ inputs["weight"].T + inputs["bias"]
    _, k, v = write.split(projected)
    torch.testing.assert_close(write.split(qkv)[1], k)
    torch.testing.assert_close(write.split(qkv)[2], v)
    valid = write.slot_mapping >= 0
    flat_values = write.value_cache.view(-1, write.num_kv_heads, write.head_dim)
    torch.testing.assert_close(flat_values[write.slot_mapping[valid]], v[valid])
    q = write.split(qkv)[0]
    assert not torch.allclose(q, write.split(projected)[0]), "the queries are rotated"
    assert torch.allclose(q.norm(dim=-1), write.split(projected)[0].norm(dim=-1), rtol=1e-4), \
        "a rotation keeps each head's length"


# ---- GPU ----

SHAPES_7B_8B = [pytest.param(32, 32, 4096, id="llama2-7b"), pytest.param(32, 8, 4096, id="llama3-8b")]


@pytest.mark.gpu
@pytest.mark.parametrize(("heads", "kv_heads", "hidden"), SHAPES_7B_8B)
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize(("fp8", "cache_dtype"), [
    pytest.param(False, torch.bfloat16, id="bf16"),
    pytest.param(True, torch.bfloat16, id="fp8-weights"),
    pytest.param(False, torch.float8_e4m3fn, id="fp8-cache"),
])  # fmt: skip
def test_gpu_bfloat16_equals_unfused_kernels(heads, kv_heads, hidden, rows, fp8, cache_dtype, seed) -> None:
    write = make_write(rows, heads, kv_heads, 128, "cuda", cache_dtype=cache_dtype, num_blocks=64,
                       block_size=16)
    inputs = make_inputs(rows, hidden, write, torch.bfloat16, "cuda", fp8=fp8, bias=False,
                         norm="norm+residual")
    assert_same_as_unfused(inputs, write)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(seed) -> None:
    """Captured once, replayed with new inputs, positions and slots: the results of a fresh call."""
    write = make_write(1, 32, 8, 128, "cuda", cache_dtype=torch.bfloat16, num_blocks=64, block_size=16)
    inputs = make_inputs(1, 4096, write, torch.bfloat16, "cuda", fp8=False, bias=False, norm="norm")
    qkv_rotary.qkv_rotary_linear(**inputs, write=write)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = qkv_rotary.qkv_rotary_linear(**inputs, write=write)
    inputs["x"].copy_(torch.randn_like(inputs["x"]))
    write.positions.fill_(77)
    write.slot_mapping.fill_(5)
    graph.replay()
    fresh = copy_write(write)
    expected = qkv_rotary.qkv_rotary_linear(**inputs, write=fresh)
    assert torch.equal(captured, expected)
    assert torch.equal(write.key_cache.view(-1, 8, 128)[5], fresh.key_cache.view(-1, 8, 128)[5])
