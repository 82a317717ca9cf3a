"""Norms, rotary, activations and the KV-cache write: Triton kernels against their references.

On CPU the kernels run under Triton's interpreter in float32 and float16 (its bfloat16 casts
truncate instead of rounding, and its bfloat16 ``tl.dot`` is broken); bfloat16 runs on the GPU.
Outputs are NaN-poisoned or freshly allocated, inputs fresh random numbers (the ``seed`` fixture
prints the seed).
"""

from __future__ import annotations

import pytest
import torch
from fastgen.kernels import activation, cache, norm, rotary

DTYPES = [torch.float32, torch.float16]
# float32 kernels differ from torch in the last bits; half types by one rounding of the output
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 300])
def test_rms_norm(hidden, dtype, device, seed) -> None:
    x = torch.randn(7, hidden, dtype=dtype, device=device) * 3
    weight = torch.randn(hidden, dtype=dtype, device=device)
    assert_close(norm.rms_norm_triton(x, weight, 1e-6), norm.rms_norm_reference(x, weight, 1e-6))
    residual = torch.randn_like(x)
    expected, expected_residual = norm.rms_norm_reference(x, weight, 1e-6, residual)
    x_before = x.clone()
    out, new_residual = norm.rms_norm_triton(x, weight, 1e-6, residual)
    assert_close(out, expected)
    assert_close(new_residual, expected_residual)
    assert new_residual.data_ptr() == residual.data_ptr(), "documented: written into residual"
    assert torch.equal(x, x_before)


def test_rms_norm_float32_weight_promotes(device, seed) -> None:
    x = torch.randn(3, 5, 96, dtype=torch.float16, device=device)
    weight = torch.randn(96, dtype=torch.float32, device=device)
    actual, expected = norm.rms_norm_triton(x, weight, 1e-5), norm.rms_norm_reference(x, weight, 1e-5)
    assert actual.dtype == expected.dtype == torch.float32
    # float32 out, but (as in HF) the normalized x is rounded to float16 before the weight multiplies
    # it: a last-bit difference in rsqrt may flip that rounding by one float16 ulp (~1e-3 relative)
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(with_bias, dtype, device, seed) -> None:
    hidden = 200
    x = torch.randn(9, hidden, dtype=dtype, device=device) + 2
    weight = torch.randn(hidden, dtype=dtype, device=device)
    bias = torch.randn(hidden, dtype=dtype, device=device) if with_bias else None
    assert_close(norm.layer_norm_triton(x, weight, bias, 1e-5),
                 norm.layer_norm_reference(x, weight, bias, 1e-5))
    residual = torch.randn_like(x)
    expected, expected_residual = norm.layer_norm_reference(x, weight, bias, 1e-5, residual)
    out, new_residual = norm.layer_norm_triton(x, weight, bias, 1e-5, residual)
    assert_close(out, expected)
    assert_close(new_residual, expected_residual)


def test_norm_residual_of_other_dtype_gets_a_new_tensor(device, seed) -> None:
    x = torch.randn(4, 128, dtype=torch.float16, device=device)
    weight = torch.randn(128, dtype=torch.float16, device=device)
    residual = torch.randn(4, 128, dtype=torch.float32, device=device)
    kept = residual.clone()
    out, new_residual = norm.rms_norm_triton(x, weight, 1e-6, residual)
    expected, expected_residual = norm.rms_norm_reference(x, weight, 1e-6, residual)
    assert_close(out, expected)
    assert_close(new_residual, expected_residual)
    assert torch.equal(residual, kept)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "rotary_dim"), [
    (4, 4, 64, 64),   # full rotary
    (6, 2, 128, 128),
    (5, 5, 80, 32),   # partial rotary (Phi-2 shape, fewer heads)
    (7, 1, 96, 48),
])
def test_rotary(num_heads, num_kv_heads, head_dim, rotary_dim, dtype, device, seed) -> None:
    num_tokens, max_positions = 11, 300
    # a fused QKV output: query and key are strided views, rotated in place
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    angles = torch.rand(max_positions, rotary_dim // 2, device=device) * 6.3
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, max_positions, (num_tokens,), device=device)
    expected_query, expected_key = query.clone(), key.clone()
    rotary.apply_rotary_reference(positions, expected_query, expected_key, cos_sin_cache, rotary_dim)
    value_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    result = rotary.apply_rotary_triton(positions, query, key, cos_sin_cache, rotary_dim)
    assert result[0] is query and result[1] is key
    assert_close(query, expected_query)
    assert_close(key, expected_key)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], value_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "rotary_dim"), [
    (9, 3, 64, 64),  # SmolLM2-135M
    (5, 5, 80, 32),  # partial rotary
])
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_rotary_reference_of_fused_qkv_views(num_heads, num_kv_heads, head_dim, rotary_dim, dtype,
                                             num_tokens, seed) -> None:
    """On the CPU, query and key as slices of one QKV output rotate as one tensor: the same bits as
    rotating them apart (copies), the rotation of the formula to rounding, values untouched."""
    max_positions = 300
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    assert rotary._heads_together(query, key) is not None
    assert rotary._heads_together(query.clone(), key.clone()) is None
    angles = torch.rand(max_positions, rotary_dim // 2) * 6.3
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, max_positions, (num_tokens,))
    apart_query, apart_key = query.clone(), key.clone()
    rotary.apply_rotary_reference(positions, apart_query, apart_key, cos_sin_cache, rotary_dim)
    value_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    unrotated = qkv[:, : (num_heads + num_kv_heads) * head_dim].clone().view(num_tokens, -1, head_dim)
    rotary.apply_rotary_reference(positions, query, key, cos_sin_cache, rotary_dim)
    assert torch.equal(query, apart_query) and torch.equal(key, apart_key)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], value_before)
    half = rotary_dim // 2
    cos, sin = cos_sin_cache[positions, None, :half], cos_sin_cache[positions, None, half:]
    x1, x2 = unrotated[..., :half].float(), unrotated[..., half:rotary_dim].float()
    rest = unrotated[..., rotary_dim:].float()
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    rotated = torch.cat([query, key], dim=1).float()
    torch.testing.assert_close(rotated, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(dtype, device, seed) -> None:
    x = torch.randn(3, 5, 2 * 700, dtype=dtype, device=device) * 3
    assert_close(activation.silu_and_mul_triton(x), activation.silu_and_mul_reference(x))
    strided = torch.randn(6, 2 * 2 * 96, dtype=dtype, device=device)[:, : 2 * 96]
    assert_close(activation.silu_and_mul_triton(strided), activation.silu_and_mul_reference(strided))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate, dtype, device, seed) -> None:
    x = torch.randn(3, 1000, dtype=dtype, device=device) * 4
    assert_close(activation.gelu_triton(x, approximate), activation.gelu_reference(x, approximate))
    with pytest.raises(ValueError, match="approximate"):
        activation.gelu_triton(x, "fast")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size"), [(2, 64, 16), (1, 80, 32), (3, 128, 64)])
def test_write_kv_cache(num_kv_heads, head_dim, block_size, dtype, device, seed) -> None:
    num_tokens, num_blocks = 13, 5
    kv = torch.randn(num_tokens, 2 * num_kv_heads * head_dim, dtype=dtype, device=device)
    key = kv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = kv[:, num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                           device=device)
    value_cache = key_cache.clone()
    slot_mapping = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slot_mapping[[2, 7]] = -1  # padding tokens are skipped
    expected_key, expected_value = key_cache.clone(), value_cache.clone()
    cache.write_kv_cache_reference(key, value, expected_key, expected_value, slot_mapping)
    cache.write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping.to(torch.int32))
    assert torch.equal(key_cache.nan_to_num(123.0), expected_key.nan_to_num(123.0))
    assert torch.equal(value_cache.nan_to_num(123.0), expected_value.nan_to_num(123.0))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_write_kv_cache_without_padding_on_the_cpu(cache_dtype, seed) -> None:
    """On the CPU, slots without padding are written by one copy per cache: the same as the masked
    write (of the same slots with a padding token among them), int32 or int64 slots alike."""
    num_tokens, num_kv_heads, head_dim, block_size = 11, 3, 64, 16
    kv = torch.randn(num_tokens + 1, 2 * num_kv_heads * head_dim) * 100
    key = kv[:, : num_kv_heads * head_dim].view(-1, num_kv_heads, head_dim)
    value = kv[:, num_kv_heads * head_dim :].view(-1, num_kv_heads, head_dim)
    empty = torch.zeros(4, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    slots = torch.randperm(4 * block_size)[:num_tokens]
    padded = torch.cat([slots[:5], torch.tensor([-1]), slots[5:]])
    expected = empty.clone(), empty.clone()
    cache.write_kv_cache_reference(torch.cat([key[:5], key[11:], key[5:11]]),
                                   torch.cat([value[:5], value[11:], value[5:11]]), *expected, padded)
    for slot_mapping in (slots, slots.to(torch.int32)):
        written = empty.clone(), empty.clone()
        cache.write_kv_cache_reference(key[:num_tokens], value[:num_tokens], *written, slot_mapping)
        for got, want in zip(written, expected, strict=True):
            assert torch.equal(got.float().nan_to_num(1.0), want.float().nan_to_num(1.0))


def test_write_kv_cache_to_fp8(device, seed) -> None:
    """A float8 e4m3 cache: values rounded to nearest, beyond +-448 saturated (not NaN)."""
    num_tokens, num_kv_heads, head_dim, block_size = 9, 2, 64, 16
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=device) * 100
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device=device)
    key[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, 3e-3])  # the last one is subnormal in e4m3
    key_cache = torch.zeros(3, block_size, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=device)
    value_cache = key_cache.clone()
    slot_mapping = torch.randperm(3 * block_size, device=device)[:num_tokens]
    expected_key, expected_value = key_cache.clone(), value_cache.clone()
    cache.write_kv_cache_reference(key, value, expected_key, expected_value, slot_mapping)
    cache.write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping.to(torch.int32))
    assert torch.equal(key_cache.float(), expected_key.float())
    assert torch.equal(value_cache.float(), expected_value.float())
    first = key_cache.view(-1, num_kv_heads, head_dim)[slot_mapping[0], 0, :4].float()
    assert first.tolist() == [448.0, -448.0, 448.0, 2**-8]
    stored = key_cache.view(-1, num_kv_heads, head_dim)[slot_mapping.long()].float()
    assert torch.allclose(stored, key.clamp(-448, 448), rtol=2**-4, atol=2**-9)


# ---- GPU: bfloat16 at real shapes (python -m pytest -m gpu tests/kernels) ----


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "rotary_dim"), [
    (32, 32, 128, 128),  # Llama-2-7B
    (32, 8, 128, 128),   # Llama-3-8B
    (32, 32, 80, 32),    # Phi-2
])
def test_gpu_real_shapes(num_heads, num_kv_heads, head_dim, rotary_dim, seed) -> None:
    cuda, dtype, tokens = torch.device("cuda"), torch.bfloat16, 2048
    hidden = num_heads * head_dim
    x = torch.randn(tokens, hidden, dtype=dtype, device=cuda)
    weight = torch.randn(hidden, dtype=dtype, device=cuda)
    bias = torch.randn(hidden, dtype=dtype, device=cuda)
    residual = torch.randn_like(x)
    expected = norm.rms_norm_reference(x, weight, 1e-6, residual)
    for got, want in zip(norm.rms_norm_triton(x, weight, 1e-6, residual.clone()), expected):
        assert_close(got, want)
    expected = norm.layer_norm_reference(x, weight, bias, 1e-5, residual)
    for got, want in zip(norm.layer_norm_triton(x, weight, bias, 1e-5, residual.clone()), expected):
        assert_close(got, want)
    gate_up = torch.randn(tokens, 2 * 11008, dtype=dtype, device=cuda)
    assert_close(activation.silu_and_mul_triton(gate_up), activation.silu_and_mul_reference(gate_up))
    for approximate in ("none", "tanh"):
        assert_close(activation.gelu_triton(x, approximate), activation.gelu_reference(x, approximate))

    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=cuda)
    query = qkv[:, :hidden].view(tokens, num_heads, head_dim)
    key = qkv[:, hidden : hidden + num_kv_heads * head_dim].view(tokens, num_kv_heads, head_dim)
    value = qkv[:, hidden + num_kv_heads * head_dim :].view(tokens, num_kv_heads, head_dim)
    angles = torch.rand(4096, rotary_dim // 2, device=cuda) * 6.3
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, 4096, (tokens,), device=cuda)
    expected_query, expected_key = query.clone(), key.clone()
    rotary.apply_rotary_reference(positions, expected_query, expected_key, cos_sin_cache, rotary_dim)
    rotary.apply_rotary_triton(positions, query, key, cos_sin_cache, rotary_dim)
    assert_close(query, expected_query)
    assert_close(key, expected_key)

    key_cache = torch.full((200, 16, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=cuda)
    value_cache = key_cache.clone()
    slot_mapping = torch.randperm(200 * 16, device=cuda)[:tokens]
    expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()
    cache.write_kv_cache_reference(key, value, expected_key_cache, expected_value_cache, slot_mapping)
    cache.write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping)
    assert torch.equal(key_cache.nan_to_num(0.5), expected_key_cache.nan_to_num(0.5))
    assert torch.equal(value_cache.nan_to_num(0.5), expected_value_cache.nan_to_num(0.5))
