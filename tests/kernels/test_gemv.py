"""Small-batch linear (decode GEMV): the Triton kernel against its float32 reference.

On CPU the kernel runs under Triton's interpreter in float32 and float16 at small shapes whose N
and K are not multiples of the blocks, through both multiply paths (CUDA-core FMAs, tensor-core
dot) and all three ways to finish (no split, split-K with atomics, split-K with a second pass).
Outputs are NaN-poisoned, inputs fresh random numbers (the ``seed`` fixture prints the seed).
The ``gpu`` tests run bf16 at Llama-2-7B's shapes against ``F.linear`` (cuBLAS), and in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
from fastgen.kernels import gemv, linear_small_batch
from fastgen.kernels.gemv import GemvConfig

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1.6e-2)}
LLAMA2_7B = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096),
             "down": (4096, 11008), "lm_head": (32000, 4096)}
FINISH = {"no split": (1, True), "split atomic": (3, True), "split two-pass": (3, False)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "an output element was not written"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_atomic_workspaces_clean() -> None:
    for sums, counters in gemv._ATOMIC_WORKSPACES.values():
        assert not sums.any() and not counters.any(), "the atomic workspace must be left zeroed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("finish", FINISH)
@pytest.mark.parametrize("use_dot", [False, True], ids=["fma", "dot"])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_matches_reference(m, use_dot, finish, dtype, device, seed) -> None:
    split_k, atomic = FINISH[finish]
    config = GemvConfig(block_n=16, block_k=32, split_k=split_k, use_dot=use_dot, atomic_reduce=atomic)
    # ragged N and K with a bias, then exact multiples of the blocks (the unmasked loads) without
    for n, k, with_bias in [(50, 200, True), (64, 256, False)]:
        x = torch.randn(m, k, dtype=dtype, device=device)
        weight = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
        bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
        out = poisoned((m, n), dtype, device)
        result = gemv.linear_small_batch_with_config(x, weight, bias, out, config)
        assert result is out
        assert_close(out, gemv.linear_small_batch_reference(x, weight, bias))
    assert_atomic_workspaces_clean()


def fp8_weight(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 weights with per-row float32 scales of different magnitudes ([N, 1], as stored)."""
    weight = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(gemv.FP8)
    scale = torch.rand(n, 1, device=device) / (100 * k**0.5) + 1e-4
    return weight, scale


@pytest.mark.parametrize("finish", FINISH)
@pytest.mark.parametrize("use_dot", [False, True], ids=["fma", "dot"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_fp8_weights_match_reference(m, use_dot, finish, device, seed) -> None:
    """FP8 weights (one byte a weight, twice the K per tile) scaled per output row, fp16 x."""
    split_k, atomic = FINISH[finish]
    block_k = gemv.path_tile(triton.next_power_of_2(m), use_dot, weight_bytes=1)[1]
    assert block_k == 2 * gemv.path_tile(triton.next_power_of_2(m), use_dot)[1]
    config = GemvConfig(block_n=16, block_k=64, split_k=split_k, use_dot=use_dot, atomic_reduce=atomic)
    for n, k, with_bias in [(50, 200, True), (64, 256, False)]:
        x = torch.randn(m, k, dtype=torch.float16, device=device)
        weight, scale = fp8_weight(n, k, device)
        bias = torch.randn(n, dtype=torch.float16, device=device) if with_bias else None
        out = poisoned((m, n), torch.float16, device)
        gemv.linear_small_batch_with_config(x, weight, bias, out, config, scale)
        expected = gemv.linear_small_batch_reference(x, weight, bias, weight_scale=scale)
        assert_close(out, expected)
        unscaled = gemv.linear_small_batch_reference(x, weight.float().half(), bias)
        assert not torch.allclose(unscaled, expected), "the scales must matter"
    assert_atomic_workspaces_clean()


def test_fp8_weights_through_the_shape_rule(device, seed) -> None:
    n, k = 72, 1100
    weight, scale = fp8_weight(n, k, device)
    for m in (1, 2, 8):
        x = torch.randn(m, k, dtype=torch.float16, device=device)
        out = gemv.linear_small_batch_triton(x, weight, None, None, scale)
        assert_close(out, gemv.linear_small_batch_reference(x, weight, weight_scale=scale))
    # FP8 without scales, or with float32 activations, is declined
    assert gemv.linear_small_batch_triton(x, weight) is None
    assert gemv.linear_small_batch_triton(x.float(), weight, None, None, scale) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_shape_rule_configs(dtype, device, seed) -> None:
    """The configs the rule picks (16x256 FMA tiles at M = 1, 64x128 dot tiles above, split K)."""
    n, k = 100, 2100
    weight = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
    bias = torch.randn(n, dtype=dtype, device=device)
    splits = set()
    for m in range(1, 9):
        x = torch.randn(m, k, dtype=dtype, device=device)
        splits.add(gemv.choose_config(m, n, k).split_k)
        out = poisoned((m, n), dtype, device)
        assert gemv.linear_small_batch_triton(x, weight, bias, out) is out
        assert_close(out, gemv.linear_small_batch_reference(x, weight, bias))
    assert splits == {2, 4}, "both paths split K at this shape"
    assert_atomic_workspaces_clean()


def test_leading_dims_strided_out_and_repeat_calls(device, seed) -> None:
    k, n = 96, 40
    weight = torch.randn(n, k, device=device)
    x = torch.randn(2, 3, k, device=device)
    result = gemv.linear_small_batch_triton(x, weight)
    assert result.shape == (2, 3, n)
    assert_close(result, gemv.linear_small_batch_reference(x, weight))
    # rows of a wider buffer, and a strided x (every other column of a wider tensor)
    config = GemvConfig(block_n=16, block_k=32, split_k=2)
    for m in (4, 1, 4):  # later calls rely on earlier ones leaving the atomic workspace zeroed
        x = torch.randn(m, 2 * k, device=device)[:, ::2]
        buffer = poisoned((m, n + 8), torch.float32, device)
        gemv.linear_small_batch_with_config(x, weight, None, buffer[:, :n], config)
        assert_close(buffer[:, :n], gemv.linear_small_batch_reference(x, weight))
        assert buffer[:, n:].isnan().all(), "wrote outside out"
    with pytest.raises(ValueError, match="out must be"):
        gemv.linear_small_batch_triton(x, weight, out=torch.empty(4, n + 1, device=device))


def test_declines_what_it_does_not_serve(device, seed) -> None:
    weight = torch.randn(24, 64, device=device)
    assert gemv.linear_small_batch_triton(torch.randn(9, 64, device=device), weight) is None
    assert gemv.linear_small_batch_triton(torch.randn(2, 64, device=device), weight.half()) is None
    k_strided = torch.randn(64, 24, device=device).t()
    assert gemv.linear_small_batch_triton(torch.randn(2, 64, device=device), k_strided) is None
    # the public op serves every M: the reference on CPU, cuBLAS past 8 rows on CUDA
    for m in (3, 9):
        x = torch.randn(m, 64, device=device)
        assert_close(linear_small_batch(x, weight), gemv.linear_small_batch_reference(x, weight))


def test_fp8_split_rule_for_llama2_7b() -> None:
    """e4m3 weights at M = 1: no matrix of the 7B splits K (down's 11008 one-byte columns in two
    halves would leave 5504 bytes a row a split: slower, 21.4 vs 19.8-20.0 us on the H100)."""
    for n, k in LLAMA2_7B.values():
        assert gemv.choose_config(1, n, k, num_sms=132, weight_bytes=1).split_k == 1


def test_choose_config_for_llama2_7b() -> None:
    for n, k in LLAMA2_7B.values():
        for m in (1, 2, 3, 4, 8):
            config = gemv.choose_config(m, n, k, num_sms=132)
            assert config.use_dot == (m > 1)
            programs = triton.cdiv(n, config.block_n) * config.split_k
            k_steps = triton.cdiv(k, config.block_k)
            halved_row_bytes = k * 2 // (2 * config.split_k)
            short_k = m == 1 and programs >= 132 and halved_row_bytes < gemv.MIN_SPLIT_ROW_BYTES
            assert (programs >= 2 * 132 or config.split_k == 8 or k_steps // (2 * config.split_k) < 4
                    or short_k)
            assert k_steps // config.split_k >= 4
            # at M = 1 the grid of o_proj (N = K = 4096) has a program on every SM: too short a K to split
            assert (config.split_k > 1) == ((n == 4096 and (m > 1 or k > 4096)) or (m > 1 and n == 12288))


# ---------------------------------------------------------------- GPU (bf16, real shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("name", LLAMA2_7B)
def test_llama2_7b_shapes_match_cublas(name, seed) -> None:
    n, k = LLAMA2_7B[name]
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    for m in range(1, 9):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        with_bias = bias if m % 2 else None
        out = poisoned((m, n), torch.bfloat16, torch.device("cuda"))
        assert gemv.linear_small_batch_triton(x, weight, with_bias, out) is out
        expected = F.linear(x, weight, with_bias)
        assert_close(out, expected)
        exact = gemv.linear_small_batch_reference(x, weight, with_bias).float()
        error = (out.float() - exact).norm() / exact.norm()
        assert error < 1e-2, f"M={m}: relative error {error:.2e}"
    assert_atomic_workspaces_clean()


@pytest.mark.gpu
@pytest.mark.parametrize("name", LLAMA2_7B)
def test_llama2_7b_shapes_fp8_weights(name, seed) -> None:
    n, k = LLAMA2_7B[name]
    weight, scale = fp8_weight(n, k, "cuda")
    for m in (1, 2, 5, 8):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        out = gemv.linear_small_batch_triton(x, weight, None, None, scale)
        exact = gemv.linear_small_batch_reference(x, weight, weight_scale=scale).float()
        error = (out.float() - exact).norm() / exact.norm()
        assert error < 1e-2, f"M={m}: relative error {error:.2e}"
    assert_atomic_workspaces_clean()


@pytest.mark.gpu
def test_cuda_graph_replay(seed) -> None:
    """Captured launches replay correctly on new inputs, including a first call during capture
    (an N never seen before, whose split-K then takes the two-launch reduction)."""
    k = 4096
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for n in (4096, 4096 + 64)]
    x = torch.zeros(4, k, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gemv.linear_small_batch_triton(x, weights[0])  # warm-up: compile, make the workspace
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = [gemv.linear_small_batch_triton(x, w) for w in weights]
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        for w, out in zip(weights, outs):
            assert_close(out, F.linear(x, w))
    torch.cuda.synchronize()
    assert_atomic_workspaces_clean()
