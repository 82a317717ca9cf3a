"""Linear products on the CPU in float32: `linear` at a few rows (`cpu_few_rows`), the LM head's
`vocab_projection` at decode batch sizes and the gated MLP's gate and up as two products
(`cpu_split_fused`) give F.linear's outputs to float32 rounding, with and without a bias; the tied
head keeps one weight."""

from __future__ import annotations

import pytest
import torch

from fastgen.layers.embedding import LMHead, VocabParallelEmbedding, vocab_projection
from fastgen.layers.linear import cpu_few_rows, cpu_split_fused, linear
from fastgen.layers.mlp import GatedMLP


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_at_few_rows_equals_f_linear(rows, with_bias) -> None:
    torch.manual_seed(rows)
    weight, hidden = torch.randn(300, 64), torch.randn(rows, 64)
    bias = torch.randn(300) if with_bias else None
    assert cpu_few_rows(hidden, weight) == (2 <= rows <= 4)
    out = linear(hidden, weight, bias)
    assert out.shape == (rows, 300) and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(hidden, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 32, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_vocab_projection_equals_linear(rows, with_bias) -> None:
    torch.manual_seed(rows)
    weight = torch.randn(1000, 96)
    bias = torch.randn(1000) if with_bias else None
    hidden = torch.randn(rows, 96)
    with torch.inference_mode():
        logits = vocab_projection(hidden, weight, bias)
    assert logits.shape == (rows, 1000) and logits.is_contiguous()
    expected = torch.nn.functional.linear(hidden, weight, bias)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)


def test_other_dtypes_take_linear() -> None:
    weight, hidden = torch.randn(300, 64, dtype=torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(vocab_projection(hidden, weight, None), linear(hidden, weight))


def test_tied_head_reads_the_embedding_table() -> None:
    embedding = VocabParallelEmbedding(500, 32)
    embedding.weight.data.normal_()
    head = LMHead(embedding, tie_weights=True)
    assert head.weight is embedding.weight
    hidden = embedding(torch.tensor([3, 7, 11]))
    logits = head(hidden)
    assert logits.shape == (3, 500)
    assert logits.argmax(dim=-1).tolist() == [3, 7, 11]  # each row is closest to itself


@pytest.mark.parametrize("rows", [1, 4, 5, 16, 32, 33])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_mlp_at_decode_rows_equals_the_fused_product(rows, act, with_bias) -> None:
    """At 5 to 32 rows on the CPU the gated MLP reads gate and up as two products (`cpu_split_fused`);
    at every row count it gives what one product of the fused weight gives, to float32 rounding."""
    torch.manual_seed(rows)
    mlp = GatedMLP(64, 96, act=act, bias=with_bias)
    for param in mlp.parameters():
        param.data.normal_()
    hidden = torch.randn(rows, 64)
    assert cpu_split_fused(hidden, mlp.gate_up_proj.weight) == (5 <= rows <= 32)
    gate, up = mlp.gate_up_proj.forward_parts(hidden)
    fused = torch.nn.functional.linear(hidden, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
    torch.testing.assert_close(torch.cat([gate, up], dim=-1), fused, atol=1e-4, rtol=1e-5)
    fused_gate, fused_up = fused.chunk(2, dim=-1)
    if act == "silu":
        activated = torch.nn.functional.silu(fused_gate)
    else:
        activated = torch.nn.functional.gelu(fused_gate, approximate="tanh")
    expected = torch.nn.functional.linear(activated * fused_up, mlp.down_proj.weight, mlp.down_proj.bias)
    torch.testing.assert_close(mlp(hidden), expected, atol=1e-3, rtol=1e-4)
