"""The LM head's product on the CPU (`vocab_projection`): the paths it takes at decode batch sizes
give `linear`'s logits to float32 rounding, with and without a bias, and keep one weight."""

from __future__ import annotations

import pytest
import torch

from fastgen.layers.embedding import LMHead, VocabParallelEmbedding, vocab_projection
from fastgen.layers.linear import linear


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
    torch.testing.assert_close(logits, linear(hidden, weight, bias), atol=1e-4, rtol=1e-5)


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
