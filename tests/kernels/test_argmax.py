"""The two-stage greedy argmax against ``torch.argmax``: first index of the maximum, ties and NaN."""

import pytest
import torch
from fastgen.kernels.argmax import CHUNK, argmax_reference, argmax_triton


def test_matches_torch_on_random_rows(device, seed) -> None:
    """Vocabularies below, at and across chunk edges; float32, float16 and a strided row view."""
    for vocab in (7, CHUNK, CHUNK + 1, 3 * CHUNK - 5):
        for dtype in (torch.float32, torch.float16):
            logits = (torch.randn(5, vocab, device=device) * 4).to(dtype)
            assert torch.equal(argmax_triton(logits), argmax_reference(logits)), (vocab, dtype)
    wide = torch.randn(3, 2 * CHUNK + 40, device=device)
    view = wide[:, 20 : 20 + 2 * CHUNK]  # rows of a larger tensor: stride != vocab
    assert torch.equal(argmax_triton(view), argmax_reference(view))


def test_the_first_of_tied_maxima_wins_across_chunks(device) -> None:
    vocab = 3 * CHUNK
    logits = torch.zeros(4, vocab, device=device)
    logits[0, [CHUNK + 3, 2 * CHUNK + 1]] = 5.0  # in two later chunks: the earlier one
    logits[1, [9, 10, CHUNK]] = 5.0  # twice in the first chunk and again in the second
    logits[2, -1] = 5.0  # the last token
    logits[3] = float("-inf")  # nothing finite: index 0, as torch
    expected = torch.tensor([CHUNK + 3, 9, vocab - 1, 0], device=device)
    assert torch.equal(argmax_triton(logits), expected)
    assert torch.equal(argmax_reference(logits), expected)


def test_a_nan_wins_as_in_torch(device) -> None:
    logits = torch.randn(2, 2 * CHUNK, device=device)
    logits[0, CHUNK + 7] = float("nan")
    logits[1, [5, CHUNK + 2]] = float("nan")
    assert argmax_triton(logits).tolist() == argmax_reference(logits).tolist() == [CHUNK + 7, 5]


def test_no_rows() -> None:
    assert argmax_triton(torch.empty(0, 10)).shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 49152, 128256])
def test_gpu_real_vocabularies(vocab, seed) -> None:
    cuda = torch.device("cuda")
    for rows in (1, 7, 256):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(rows, vocab, device=cuda) * 3).to(dtype)
            assert torch.equal(argmax_triton(logits), logits.argmax(-1)), (rows, dtype)
