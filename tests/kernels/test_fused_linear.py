"""Fused small-batch linears (``gated_down``, ``norm_linear``) against the unfused kernels.

The fused kernel computes its activations with the unfused kernels' own helpers and rounds them as
they do. ``gated_down`` must equal ``silu_and_mul`` then the small-batch linear **bit for bit** with
the same launch config. ``norm_linear``'s new residual must too, but its RMS statistic is a
``tl.sum`` in the GEMV's layout where the norm kernel's is one in its own, so the two may differ in
the last float32 bits: its output, the unfused kernels' and the reference composition's must each
lie in the envelope that :func:`norm_linear_envelope` derives (a few half-precision ulps). On CPU
the kernels run under Triton's interpreter (float32, float16; FP8 weights with float16
activations) at ragged shapes, through both multiply paths and all three ways to finish; the
interpreter runs programs one after the other, so even the atomic split-K sums in the same order.
The ``gpu`` tests run bf16 at Llama-2-7B's shapes: ``gated_down`` bitwise with the deterministic
split-K (two launches) and within float32 rounding with the float32 atomics, whose order of arrival
changes from run to run; ``norm_linear`` in its envelope either way.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fastgen.kernels import fused_linear, gemv, norm, rms_norm_linear, silu_and_mul_linear
from fastgen.kernels.activation import silu_and_mul_triton
from fastgen.kernels.gemv import GemvConfig

from .test_gemv import FINISH, LLAMA2_7B, assert_atomic_workspaces_clean, assert_close, fp8_weight, poisoned

EPS = 1e-5
# (N, K, bias): K not a multiple of BLOCK_K with a bias (its 2K of gate_up is one: the SiLU-mul
# prologue must mask by K, not by its input's width), then exact multiples without
SHAPES = [(50, 208, True), (64, 256, False)]


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "an output element was not written"
    assert torch.equal(actual, expected), f"max difference {(actual.float() - expected.float()).abs().max()}"


# Relative distance from the exact 1 / sqrt(mean(h ** 2) + eps) within which any float32 rstd of
# the kernels or the reference lies: a float32 sum of non-negative squares whose longest chain of
# additions is c is within (c + 1) * 2**-24 of the exact sum; tl.sum chains at most
# BLOCK / (32 * num_warps) <= 64 additions in a thread and then a tree of at most 10 levels, torch's
# reductions (the reference) a few hundred at most, and the division, sqrt and reciprocal round 3
# more times: under 2**-16 (in practice a few 2**-24), taken with a margin of 2.
RSTD_SLACK = 2.0**-15


def norm_linear_envelope(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, radius), float64 [M, N]: where ``linear(rms_norm(x (+ residual)), weight) + bias``
    lies when computed as the kernels and the reference do, whatever the order of the float32 sums.

    - The activations ``a = round(w * round(h * rstd))`` (round: to x's dtype, after a float32
      product) are monotone in rstd, so with rstd anywhere in ``exact * (1 +- RSTD_SLACK)`` each
      lies between its values at the two ends, ``a_lo`` and ``a_hi``: equal for most; one ulp apart
      where ``h * rstd`` is near a rounding boundary (float32 activations: ~2 * RSTD_SLACK apart).
    - The exact sums over any such activations lie within ``|W| @ (a_hi - a_lo) / 2`` of
      ``W @ (a_lo + a_hi) / 2 + bias`` (W with the FP8 scale applied).
    - A float32 dot product of K terms is within ``K * 2**-24 * (|W| @ |a|)`` of its exact value
      (any order); 16 more roundings cover split-K's partial sums, the FP8 scale and the bias, and
      the factor 2 the tensor cores' truncating accumulation.

    The rounding of the output to x's dtype is added by :func:`assert_in_envelope`."""
    hidden = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    exact = torch.rsqrt(hidden.double().pow(2).mean(-1, keepdim=True) + eps)
    ends = []
    for rstd in (exact * (1 - RSTD_SLACK), exact * (1 + RSTD_SLACK)):
        normed = (hidden.float() * rstd.float()).to(x.dtype)
        ends.append((norm_weight.float() * normed.float()).to(x.dtype).double())
    low, high = torch.minimum(*ends), torch.maximum(*ends)
    full = weight.double() if scale is None else weight.double() * scale.double().reshape(-1, 1)
    bias64 = full.new_zeros(full.shape[0]) if bias is None else bias.double()
    center = (low + high) / 2 @ full.T + bias64
    spread = (high - low) / 2 @ full.abs().T
    magnitude = torch.maximum(low.abs(), high.abs()) @ full.abs().T + bias64.abs()
    return center, spread + 2 * (x.shape[-1] + 16) * 2.0**-24 * magnitude


def assert_in_envelope(actual: torch.Tensor, envelope: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``actual`` (x's dtype) within the envelope's radius of its center, plus half an ulp of
    ``actual`` for its own rounding (half the smallest subnormal below the normal range)."""
    center, radius = envelope
    assert not actual.isnan().any(), "an output element was not written"
    info = torch.finfo(actual.dtype)
    value = actual.double().reshape(center.shape)
    rounding = torch.clamp(info.eps * value.abs(), min=info.eps * info.smallest_normal) / 2
    excess = (value - center).abs() - (radius + rounding)
    assert (excess <= 0).all(), (
        f"{int((excess > 0).sum())} outputs outside the envelope, by up to {excess.max():.3g} "
        f"(radius up to {radius.max():.3g}, max |difference| {(value - center).abs().max():.3g})"
    )


def make_weight(n: int, k: int, dtype: torch.dtype, device, fp8: bool):
    if fp8:
        return fp8_weight(n, k, device)
    return torch.randn(n, k, dtype=dtype, device=device) / k**0.5, None


def make_config(finish: str, use_dot: bool, fp8: bool) -> GemvConfig:
    split_k, atomic = FINISH[finish]
    return GemvConfig(
        block_n=16, block_k=64 if fp8 else 32, split_k=split_k, use_dot=use_dot, atomic_reduce=atomic
    )


# (dtype, FP8 weights, rows): float16 at every M, float32 and FP8 weights at two (interpreter time)
CASES = [pytest.param(torch.float16, False, m, id=f"float16-{m}") for m in (1, 2, 5, 8)]
CASES += [pytest.param(torch.float32, False, m, id=f"float32-{m}") for m in (1, 5)]
CASES += [pytest.param(torch.float16, True, m, id=f"fp8-weights-{m}") for m in (2, 8)]


def shapes_for(m: int) -> list[tuple[int, int, bool]]:
    """The ragged shape always, the even one (unmasked loads) at one and eight rows."""
    return SHAPES if m in (1, 8) else SHAPES[:1]


@pytest.mark.parametrize(("dtype", "fp8", "m"), CASES)
@pytest.mark.parametrize("finish", FINISH)
@pytest.mark.parametrize("use_dot", [False, True], ids=["fma", "dot"])
def test_silu_and_mul_linear_equals_unfused(m, use_dot, finish, dtype, fp8, device, seed) -> None:
    config = make_config(finish, use_dot, fp8)
    for n, k, with_bias in shapes_for(m):
        gate_up = torch.randn(m, 2 * k, dtype=dtype, device=device) * 2
        weight, scale = make_weight(n, k, dtype, device, fp8)
        bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
        out = poisoned((m, n), dtype, device)
        assert fused_linear.silu_and_mul_linear_triton(gate_up, weight, bias, out, scale, config) is out
        unfused = gemv.linear_small_batch_with_config(
            silu_and_mul_triton(gate_up), weight, bias, None, config, scale
        )
        assert_equal(out, unfused)
        assert_close(
            out, fused_linear.silu_and_mul_linear_reference(gate_up, weight, bias, weight_scale=scale)
        )
    assert_atomic_workspaces_clean()


@pytest.mark.parametrize(("dtype", "fp8", "m"), CASES)
@pytest.mark.parametrize("finish", FINISH)
@pytest.mark.parametrize("use_dot", [False, True], ids=["fma", "dot"])
def test_rms_norm_linear_matches_unfused(m, use_dot, finish, dtype, fp8, device, seed) -> None:
    config = make_config(finish, use_dot, fp8)
    for (n, k, with_bias), with_residual in zip(shapes_for(m), (True, False)):
        x = torch.randn(m, k, dtype=dtype, device=device)
        residual = torch.randn(m, k, dtype=dtype, device=device) if with_residual else None
        norm_weight = 1 + torch.randn(k, dtype=dtype, device=device) / 4
        weight, scale = make_weight(n, k, dtype, device, fp8)
        bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
        x_before, residual_before = x.clone(), None if residual is None else residual.clone()
        residual_out = poisoned((m, k), dtype, device)
        fused = fused_linear.rms_norm_linear_triton(
            x, norm_weight, EPS, weight, bias, residual, scale, residual_out, config
        )
        # unfused: the norm kernel (which adds the residual in place, so on a copy), then the linear
        normed = norm.rms_norm_triton(x, norm_weight, EPS, None if residual is None else residual.clone())
        if residual is not None:
            (y, new_residual), (normed, expected_residual) = fused, normed
            assert new_residual is residual_out
            assert_equal(new_residual, expected_residual)
            assert torch.equal(residual, residual_before), "the fused kernel must not write residual"
        else:
            y = fused
        assert torch.equal(x, x_before)
        envelope = norm_linear_envelope(x, norm_weight, EPS, weight, bias, residual, scale)
        assert_in_envelope(y, envelope)
        unfused = gemv.linear_small_batch_with_config(normed, weight, bias, None, config, scale)
        assert_in_envelope(unfused, envelope)
        expected = fused_linear.rms_norm_linear_reference(x, norm_weight, EPS, weight, bias, residual, scale)
        assert_in_envelope(expected if residual is None else expected[0], envelope)
    assert_atomic_workspaces_clean()


def test_norm_kernel_narrow_rows(device, seed) -> None:
    """Rows of 1 and 3 columns (blocks of 1 and 4)."""
    for width in (1, 3):
        x = torch.randn(4, width, device=device)
        weight = torch.randn(width, device=device)
        assert_close(norm.rms_norm_triton(x, weight, EPS), norm.rms_norm_reference(x, weight, EPS))


def test_shape_rule_and_dispatch(device, seed) -> None:
    """The public functions: the fused kernel through the shape rule where the small-batch kernel
    applies on CUDA, the reference composition on CPU; ``residual_out`` filled either way."""
    n, k = 72, 300
    for m in (1, 3, 8):
        gate_up = torch.randn(m, 2 * k, dtype=torch.float16, device=device)
        weight = torch.randn(n, k, dtype=torch.float16, device=device) / k**0.5
        expected = fused_linear.silu_and_mul_linear_reference(gate_up, weight)
        assert_close(fused_linear.silu_and_mul_linear_triton(gate_up, weight), expected)
        assert_close(silu_and_mul_linear(gate_up, weight), expected)
        x, residual = torch.randn(2, m, k, dtype=torch.float16, device=device)
        norm_weight = torch.randn(k, dtype=torch.float16, device=device)
        y, new_residual = fused_linear.rms_norm_linear_reference(x, norm_weight, EPS, weight, None, residual)
        fused_y, fused_residual = fused_linear.rms_norm_linear_triton(
            x, norm_weight, EPS, weight, None, residual
        )
        envelope = norm_linear_envelope(x, norm_weight, EPS, weight, None, residual)
        assert_in_envelope(fused_y, envelope)
        assert_close(fused_y, y)
        assert torch.equal(fused_residual, new_residual)
        residual_out = torch.empty_like(x)
        public = rms_norm_linear(x, norm_weight, EPS, weight, None, residual, residual_out=residual_out)
        assert public[1] is residual_out and torch.equal(residual_out, new_residual)
        assert_in_envelope(public[0], envelope)
    assert_atomic_workspaces_clean()


def test_declines_what_it_does_not_serve(device) -> None:
    k = 64
    weight = torch.randn(24, k, device=device)
    norm_weight = torch.ones(k, device=device)
    assert fused_linear.silu_and_mul_linear_triton(torch.randn(9, 2 * k, device=device), weight) is None
    assert fused_linear.silu_and_mul_linear_triton(torch.randn(2, 2 * k + 1, device=device), weight) is None
    assert fused_linear.silu_and_mul_linear_triton(torch.randn(2, k, device=device), weight) is None
    x = torch.randn(2, k, device=device)
    assert (
        fused_linear.rms_norm_linear_triton(torch.randn(9, k, device=device), norm_weight, EPS, weight)
        is None
    )
    assert fused_linear.rms_norm_linear_triton(x, norm_weight.half(), EPS, weight) is None
    wide = torch.randn(2, gemv.MAX_NORM_WIDTH + 2, device=device)
    assert (
        fused_linear.rms_norm_linear_triton(
            wide, torch.ones(wide.shape[1]), EPS, torch.randn(4, wide.shape[1])
        )
        is None
    )
    residual = torch.randn_like(x)
    with pytest.raises(ValueError, match="must not alias"):
        fused_linear.rms_norm_linear_triton(
            x, norm_weight, EPS, weight, None, residual, residual_out=residual
        )


# ---------------------------------------------------------------- GPU (bf16, real shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-weights"])
def test_llama2_7b_gated_down(fp8, seed) -> None:
    n, k = LLAMA2_7B["down"]
    weight, scale = make_weight(n, k, torch.bfloat16, "cuda", fp8)
    for m in (1, 2, 5, 8):
        gate_up = torch.randn(m, 2 * k, dtype=torch.bfloat16, device="cuda") * 2
        config = gemv.choose_config_for(m, weight, gate_up.device)
        for deterministic in (True, False):
            launch = dataclasses.replace(config, atomic_reduce=False) if deterministic else config
            fused = fused_linear.silu_and_mul_linear_triton(gate_up, weight, None, None, scale, launch)
            unfused = gemv.linear_small_batch_with_config(
                silu_and_mul_triton(gate_up), weight, None, None, launch, scale
            )
            # atomics add the split-K partial sums in their order of arrival: float32 rounding apart
            (assert_equal if deterministic or config.split_k == 1 else assert_close)(fused, unfused)
        assert_close(silu_and_mul_linear(gate_up, weight, weight_scale=scale), unfused)
    assert_atomic_workspaces_clean()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-weights"])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "o_proj"])
def test_llama2_7b_norm_linear(name, fp8, seed) -> None:
    n, k = LLAMA2_7B[name]
    weight, scale = make_weight(n, k, torch.bfloat16, "cuda", fp8)
    norm_weight = 1 + torch.randn(k, dtype=torch.bfloat16, device="cuda") / 4
    for m in (1, 2, 5, 8):
        x, residual = torch.randn(2, m, k, dtype=torch.bfloat16, device="cuda")
        config = gemv.choose_config_for(m, weight, x.device)
        normed, expected_residual = norm.rms_norm_triton(x, norm_weight, EPS, residual.clone())
        envelope = norm_linear_envelope(x, norm_weight, EPS, weight, None, residual, scale)
        for deterministic in (True, False):
            launch = dataclasses.replace(config, atomic_reduce=False) if deterministic else config
            y, new_residual = fused_linear.rms_norm_linear_triton(
                x, norm_weight, EPS, weight, None, residual, scale, None, launch
            )
            assert_equal(new_residual, expected_residual)
            # the fused RMS adds in the GEMV's order, the norm kernel's in its own: an envelope
            assert_in_envelope(y, envelope)
            assert_in_envelope(gemv.linear_small_batch_with_config(normed, weight, None, None, launch, scale),
                               envelope)
    assert_atomic_workspaces_clean()


@pytest.mark.gpu
def test_fused_cuda_graph_replay(seed) -> None:
    """Both fusions captured in a graph replay on new inputs: gated_down equal to the unfused kernels,
    norm_linear (and the unfused norm and linear) in its envelope, its new residual equal."""
    k, n = 4096, 4096
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    down = torch.randn(n, 11008, dtype=torch.bfloat16, device="cuda") * 0.02
    norm_weight = torch.randn(k, dtype=torch.bfloat16, device="cuda")
    x, residual = torch.zeros(2, 1, k, dtype=torch.bfloat16, device="cuda")
    gate_up = torch.zeros(1, 2 * 11008, dtype=torch.bfloat16, device="cuda")
    config = dataclasses.replace(gemv.choose_config_for(1, weight, x.device), atomic_reduce=False)
    down_config = dataclasses.replace(gemv.choose_config_for(1, down, x.device), atomic_reduce=False)

    def step():
        y, new_residual = fused_linear.rms_norm_linear_triton(
            x, norm_weight, EPS, weight, None, residual, None, None, config
        )
        return (
            y,
            new_residual,
            fused_linear.silu_and_mul_linear_triton(gate_up, down, None, None, None, down_config),
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = step()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        for tensor in (x, residual, gate_up):
            tensor.copy_(torch.randn_like(tensor))
        graph.replay()
        normed, new_residual = norm.rms_norm_triton(x, norm_weight, EPS, residual.clone())
        envelope = norm_linear_envelope(x, norm_weight, EPS, weight, None, residual)
        assert_in_envelope(outs[0], envelope)
        assert_in_envelope(gemv.linear_small_batch_with_config(normed, weight, None, None, config), envelope)
        assert_equal(outs[1], new_residual)
        activations = silu_and_mul_triton(gate_up)
        assert_equal(outs[2], gemv.linear_small_batch_with_config(activations, down, None, None, down_config))
