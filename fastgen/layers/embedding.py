"""Token embedding and LM head, split across ranks by vocabulary."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .linear import copy_checked, cpu_few_rows, linear, load_full
from .parallel import SINGLE, TensorParallel

# oneDNN's matmul, where this torch was built with it (the op torch's compiler emits for float32
# linears on the CPU)
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class VocabParallelEmbedding(nn.Module):
    """Embedding table whose rows (vocabulary) are split across ranks; the last shard is padded.
    ``multiplier`` scales the looked-up rows (rounded to the table's dtype first, as HF's Gemma)."""

    def __init__(
        self, vocab_size: int, hidden_size: int, *, tp: TensorParallel = SINGLE, multiplier: float = 1.0
    ):
        super().__init__()
        self.tp = tp
        self.multiplier = multiplier
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        rows = self.vocab_end - self.vocab_start
        copy_checked(param.data[:rows], loaded[self.vocab_start : self.vocab_end], "vocab shard")

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            out = nn.functional.embedding(token_ids, self.weight)
        else:
            mine = (token_ids >= self.vocab_start) & (token_ids < self.vocab_end)
            local_ids = torch.where(mine, token_ids - self.vocab_start, 0)
            out = nn.functional.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
            out = self.tp.all_reduce(out)
        if self.multiplier != 1.0:
            out = out * torch.tensor(self.multiplier, dtype=out.dtype)
        return out


class LMHead(nn.Module):
    """Projection to vocabulary logits, split by vocabulary like ``embedding``; each rank computes
    its slice, then the slices are gathered. With ``tie_weights`` it shares the embedding table;
    ``bias`` adds a bias split the same way (Phi)."""

    def __init__(self, embedding: VocabParallelEmbedding, *, tie_weights: bool, bias: bool = False):
        super().__init__()
        self.tp = embedding.tp
        self.vocab_size = embedding.vocab_size
        if tie_weights:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.zeros_like(embedding.weight), requires_grad=False)
            self.weight.weight_loader = embedding._load
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(embedding.shard_size), requires_grad=False)
            self.bias.weight_loader = embedding._load

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = vocab_projection(hidden, self.weight, self.bias)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]


def vocab_projection(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden @ weight.T + bias``, the LM head's product, with the weight in its one layout
    ``[vocab, hidden]`` (the embedding's when tied).

    On the CPU in float32 at decode batch sizes (up to 32 rows), torch's default GEMM (MKL) reads
    a weight of this shape (tens of thousands of short rows) far slower than memory allows. `linear`
    asks it for ``weight @ hidden.T`` at 2 to 4 rows (`cpu_few_rows`), which reads it fastest there;
    at the other row counts oneDNN's matmul is faster (benchmarks/results/cpu_generate-2026-12-06.md).
    Both sum in another order than F.linear, so logits agree to float32 rounding."""
    cpu_float32 = hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32
    decode_sized = hidden.dim() == 2 and hidden.shape[0] <= 32 and not cpu_few_rows(hidden, weight)
    if _ONEDNN_LINEAR and cpu_float32 and decode_sized:
        return torch.ops.mkldnn._linear_pointwise(hidden, weight, bias, "none", [], "")
    return linear(hidden, weight, bias)


class PositionEmbedding(nn.Module):
    """Learned absolute position embeddings, whole on every rank: position ``p`` reads row
    ``p + offset`` of a table of ``max_positions + offset`` rows (OPT keeps two unused rows first)."""

    def __init__(self, max_positions: int, hidden_size: int, *, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(max_positions + offset, hidden_size), requires_grad=False)
        self.weight.weight_loader = load_full

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(positions + self.offset, self.weight)
