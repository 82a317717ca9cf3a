"""Mixture-of-experts feed-forward: ``sum_j weight[t, j] * expert_{id[t, j]}(x[t])`` over each
token's top-k experts, every expert a gated SiLU MLP (``w13`` stacks gate and up, ``w2`` is down).

The reference loops over the experts that got tokens, gathering them with ``nonzero`` (the routing
goes to the host, so it cannot be captured in a CUDA graph), in the order and with the roundings
of HF transformers' Mixtral.

The Triton path keeps every shape a function of the token count alone, so it captures:

1. **Routing to blocks** (torch ops, no host sync): the ``N * k`` (token, choice) *slots* are
   sorted by expert, and each expert's run is padded to a multiple of ``BLOCK_M``, so every block
   of ``BLOCK_M`` sorted slots belongs to one expert. The padded slot list has room for the worst
   case (``N * k / BLOCK_M + E`` blocks); unused places hold an out-of-range slot, and unused blocks
   the expert id ``E``, which makes their programs return at once.
2. **Two grouped matmuls** (`_grouped_matmul_kernel`): a program takes one block and one tile of
   output features, reads its expert's weight tile and the block's rows (gathered by slot), and
   writes one row per slot: first ``x[token] @ w13[e].T`` for every slot, then, after SiLU-and-mul,
   ``h[slot] @ w2[e].T`` scaled by the slot's routing weight.
3. The ``k`` rows of each token are summed.

Accumulation is float32 (IEEE for float32 inputs), rounded once per matmul output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from .activation import silu_and_mul


def fused_moe_reference(
    x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """x [N, H]; weights and expert_ids [N, k] (weights in x's dtype); w13 [E, 2I, H]; w2 [E, H, I]."""
    out = torch.zeros_like(x)
    for expert in expert_ids.unique().tolist():  # increasing ids, as HF adds them up
        rows, choices = (expert_ids == expert).nonzero(as_tuple=True)
        hidden = silu_and_mul(torch.nn.functional.linear(x[rows], w13[expert]))
        expert_out = torch.nn.functional.linear(hidden, w2[expert])
        out.index_add_(0, rows, expert_out * weights[rows, choices, None])
    return out


def route_to_blocks(
    expert_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, block_experts): the slots (``token * k + choice``) sorted by expert, each expert's run
    padded to whole blocks with ``N * k`` (no slot); and the expert of each block (``num_experts``
    for the unused blocks at the end). Shapes depend only on ``expert_ids.shape``."""
    flat = expert_ids.flatten()
    num_slots = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(num_slots, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    destination = (block_end - blocks)[sorted_experts] * block_m + rank_in_expert
    max_blocks = -(-num_slots // block_m) + num_experts
    slots = torch.full((max_blocks * block_m,), num_slots, dtype=torch.int64, device=device)
    slots[destination] = order
    block_experts = torch.searchsorted(block_end, torch.arange(max_blocks, device=device), right=True)
    return slots, block_experts


@triton.jit
def _grouped_matmul_kernel(
    a_ptr, b_ptr, c_ptr, scale_ptr, slots_ptr, block_experts_ptr,
    num_slots, num_experts, N, K,
    stride_a_row, stride_b_expert, stride_b_n, stride_c_row,
    ROWS_PER_A: tl.constexpr,  # slots per row of a (top_k for x, 1 for the hidden rows)
    SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert >= num_experts:
        return
    slot = tl.load(slots_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slot < num_slots
    a_rows = tl.where(valid, slot // ROWS_PER_A, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    depth = tl.arange(0, BLOCK_K)
    b_base = b_ptr + expert.to(tl.int64) * stride_b_expert + cols[None, :].to(tl.int64) * stride_b_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + depth) < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_a_row + (k0 + depth)[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(b_base + (k0 + depth)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if SCALE:
        acc = acc * tl.load(scale_ptr + slot, mask=valid, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + tl.where(valid, slot, 0).to(tl.int64)[:, None] * stride_c_row + cols[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def _grouped_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    block_experts: torch.Tensor,
    num_slots: int,
    rows_per_a: int,
    scale: torch.Tensor | None,
    block_m: int,
) -> torch.Tensor:
    """c[slot] = a[slot // rows_per_a] @ b[expert of slot].T (* scale[slot]) for every slot."""
    num_experts, n, k = b.shape
    c = torch.empty(num_slots, n, dtype=a.dtype, device=a.device)
    block_n = 64
    block_k = 64 if k >= 64 else triton.next_power_of_2(max(k, 16))
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    _grouped_matmul_kernel[grid](
        a, b, c, scale if scale is not None else c, slots, block_experts,
        num_slots, num_experts, n, k,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        ROWS_PER_A=rows_per_a, SCALE=scale is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return c


def fused_moe_triton(
    x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """`fused_moe_reference` as two grouped matmuls over expert-sorted slots (graph capturable)."""
    num_tokens, top_k = expert_ids.shape
    num_slots = num_tokens * top_k
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    block_m = 16 if num_slots <= 64 * w13.shape[0] else 64
    slots, block_experts = route_to_blocks(expert_ids, w13.shape[0], block_m)
    gate_up = _grouped_matmul(x, w13, slots, block_experts, num_slots, top_k, None, block_m)
    hidden = silu_and_mul(gate_up)
    scale = weights.flatten().contiguous()
    out = _grouped_matmul(hidden, w2, slots, block_experts, num_slots, 1, scale, block_m)
    return out.view(num_tokens, top_k, -1).sum(dim=1)


def fused_moe(
    x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Top-k mixture-of-experts feed-forward (see the module docstring)."""
    impl = fused_moe_triton if use_triton(x) else fused_moe_reference
    return impl(x, weights, expert_ids, w13, w2)
