"""Per-row FP8 quantization: the Triton kernel against its PyTorch reference.

Under the interpreter in float32 and float16 (rows of different magnitudes, an all-zero row, a
ragged K, a K longer than one block); the ``gpu`` test in bf16 at Llama-2-7B's activation widths.
"""

from __future__ import annotations

import pytest
import torch
from fastgen.kernels import quant


def e4m3_step(q: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values at each |q|: 2**-9 below 2**-6 (subnormals), else 1/8 of the
    power of two at or below |q|."""
    magnitude = q.float().abs()
    normal = torch.exp2(torch.floor(torch.log2(magnitude.clamp(min=2**-6))) - 3)
    return torch.where(magnitude < 2**-6, torch.full_like(magnitude, 2**-9), normal)


def assert_same_quantization(actual, expected) -> None:
    (q, scale), (q_ref, scale_ref) = actual, expected
    assert q.dtype == quant.FP8 and q.shape == q_ref.shape and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    # a division rounded differently may land one e4m3 step away, never further, and rarely
    gap = (q.float() - q_ref.float()).abs()
    differ = gap > 0
    detail = ""
    if differ.any():
        worst = gap.argmax()
        detail = (f"{int(differ.sum())} of {q.numel()} differ; worst {q.flatten()[worst].item()} vs "
                  f"{q_ref.flatten()[worst].item()}")
    assert (gap <= torch.maximum(e4m3_step(q), e4m3_step(q_ref))).all(), detail
    assert differ.float().mean() <= 0.01, detail


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("k", [100, 2500])
def test_matches_reference(k, dtype, device, seed) -> None:
    x = torch.randn(5, k, device=device) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 200.0], device=device)[:, None]
    x[3] = 0.0
    x = x.to(dtype)
    q, scale = quant.quantize_rows_triton(x)
    assert_same_quantization((q, scale), quant.quantize_rows_reference(x))
    assert not q[3].float().any() and scale[3].item() == pytest.approx(quant.MIN_SCALE)
    assert (q.float().abs().amax(dim=1)[[0, 1, 2, 4]] == quant.FP8_MAX).all()


def test_strided_rows_and_no_rows(device, seed) -> None:
    x = torch.randn(3, 64, device=device)[:, ::2]
    assert_same_quantization(quant.quantize_rows_triton(x), quant.quantize_rows_reference(x))
    q, scale = quant.quantize_rows_triton(torch.empty(0, 32, device=device))
    assert q.shape == (0, 32) and scale.shape == (0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [4096, 11008, 14336])
def test_bf16_activation_widths(k, seed) -> None:
    x = torch.randn(768, k, dtype=torch.bfloat16, device="cuda") * 3
    assert_same_quantization(quant.quantize_rows(x), quant.quantize_rows_reference(x))


def test_rounds_to_nearest_e4m3_ties_to_even(device) -> None:
    """With the row's max at 448 the scale is 1, so q is x rounded: every e4m3 value, every
    midpoint between neighbours (ties), and points just either side of each midpoint."""
    grid = torch.arange(256, dtype=torch.uint8).view(quant.FP8).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids * (1 + 1e-6), mids * (1 - 1e-6)])
    values = torch.cat([values, -values])
    x = values.to(device)[None, :]
    q, scale = quant.quantize_rows_triton(x)
    assert scale.item() == 1.0
    assert torch.equal(q.float(), x.to(quant.FP8).float())
