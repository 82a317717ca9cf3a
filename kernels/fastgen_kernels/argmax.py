"""Greedy token choice: the argmax of each row of logits, in two stages on the GPU.

``torch.argmax`` reduces a row in one thread block: at batch 1 a 128256-token row (Llama 3) takes
one multiprocessor for tens of microseconds while the other 131 idle, on the critical path of every
decode step. Here each row is cut into `CHUNK`-token pieces reduced in parallel (value and first
index of each piece's maximum), then one small program per row picks the first piece holding the
row's maximum. The result equals ``torch.argmax``: the first index of the maximum (a NaN counts
as infinity: in a row of numbers, the first NaN wins, as in torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from ._dispatch import use_triton

CHUNK = 4096  # tokens a first-stage program reduces: 32 programs a row of Llama 3's vocabulary


def argmax_reference(logits: torch.Tensor) -> torch.Tensor:
    """Int64 ``[rows]``: the first index of each row's maximum."""
    return logits.argmax(dim=-1)


@triton.jit
def _chunk_max_kernel(
    logits_ptr, values_ptr, indices_ptr, vocab, stride_row, num_chunks, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.enter(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offsets = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row * stride_row + offsets, mask=offsets < vocab, other=float("-inf"))
    x = x.to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN beats every number, as in torch.argmax
    value, index = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(values_ptr + row * num_chunks + chunk, value)
    tl.store(indices_ptr + row * num_chunks + chunk, chunk * CHUNK + index)


@triton.jit
def _pick_chunk_kernel(
    values_ptr, indices_ptr, out_ptr, num_chunks, BLOCK_CHUNKS: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl.enter(USE_PDL)
    row = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    values = tl.load(values_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=float("-inf"))
    _, best = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(indices_ptr + row * num_chunks + best))


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Int64 ``[rows]``: the first index of each row's maximum in ``logits`` ``[rows, vocab]``, as
    ``torch.argmax(logits, dim=-1)``: Triton on CUDA tensors, the reference elsewhere."""
    return argmax_triton(logits) if use_triton(logits) else argmax_reference(logits)


def argmax_triton(logits: torch.Tensor) -> torch.Tensor:
    """The two-stage argmax of ``logits`` ``[rows, vocab]`` (see the module docstring)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(vocab, CHUNK)
    values = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, num_chunks, dtype=torch.int64, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    options = pdl.launch_options(logits.device)
    _chunk_max_kernel[(rows, num_chunks)](
        logits, values, indices, vocab, logits.stride(0), num_chunks, CHUNK=CHUNK, num_warps=4, **options
    )
    _pick_chunk_kernel[(rows,)](
        values, indices, out, num_chunks, BLOCK_CHUNKS=triton.next_power_of_2(num_chunks), num_warps=1,
        **options,
    )
    return out
