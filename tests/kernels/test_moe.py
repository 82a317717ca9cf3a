"""The fused mixture-of-experts feed-forward against its reference, and the routing to blocks.

CPU: Triton's interpreter in float32 and float16 at small shapes; GPU (``gpu``): bfloat16 at a
Mixtral-like width.
"""

from __future__ import annotations

import pytest
import torch
from fastgen.kernels import moe

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def routed(num_tokens: int, num_experts: int, top_k: int, dtype, device, skew: bool = False):
    logits = torch.randn(num_tokens, num_experts, device=device)
    if skew:  # most tokens pick the same experts: a run longer than a block, others empty
        logits[:, :2] += 8.0
    weights, expert_ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(dtype), expert_ids


def experts(num_experts: int, hidden: int, inner: int, dtype, device):
    w13 = torch.randn(num_experts, 2 * inner, hidden, device=device) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inner, device=device) * inner**-0.5
    return w13.to(dtype), w2.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "tokens,num_experts,top_k,hidden,inner,skew",
    [(1, 4, 2, 32, 40, False), (13, 4, 2, 48, 40, False), (70, 8, 2, 32, 24, True), (9, 3, 1, 80, 64, False)],
)
def test_fused_moe_matches_reference(tokens, num_experts, top_k, hidden, inner, skew, dtype, device, seed):
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    weights, expert_ids = routed(tokens, num_experts, top_k, dtype, device, skew)
    w13, w2 = experts(num_experts, hidden, inner, dtype, device)
    expected = moe.fused_moe_reference(x, weights, expert_ids, w13, w2)
    actual = moe.fused_moe_triton(x, weights, expert_ids, w13, w2)
    atol, rtol = TOLERANCE[dtype]
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("block_m", [4, 16])
def test_routing_puts_every_slot_once_in_a_block_of_its_expert(block_m, device, seed):
    num_tokens, num_experts, top_k = 23, 5, 2
    _, expert_ids = routed(num_tokens, num_experts, top_k, torch.float32, device, skew=True)
    slots, block_experts = moe.route_to_blocks(expert_ids, num_experts, block_m)
    num_slots = num_tokens * top_k
    assert slots.numel() == block_experts.numel() * block_m  # shapes from the token count alone
    real = slots[slots < num_slots]
    assert sorted(real.tolist()) == list(range(num_slots))
    flat = expert_ids.flatten()
    for block, expert in enumerate(block_experts.tolist()):
        members = slots[block * block_m : (block + 1) * block_m]
        members = members[members < num_slots]
        if expert == num_experts:
            assert members.numel() == 0  # unused blocks come last and hold nothing
        else:
            assert members.numel() > 0 and bool((flat[members] == expert).all())
    used = (block_experts < num_experts).sum().item()
    counts = torch.bincount(flat, minlength=num_experts)
    assert used == int(((counts + block_m - 1) // block_m).sum())
    assert bool((block_experts[:used].diff() >= 0).all())


@pytest.mark.gpu
def test_fused_moe_bfloat16_at_mixtral_width(seed):
    device = torch.device("cuda")
    x = torch.randn(200, 1024, device=device).to(torch.bfloat16)
    weights, expert_ids = routed(200, 8, 2, torch.bfloat16, device)
    w13, w2 = experts(8, 1024, 1792, torch.bfloat16, device)
    expected = moe.fused_moe_reference(x, weights, expert_ids, w13, w2)
    torch.testing.assert_close(moe.fused_moe(x, weights, expert_ids, w13, w2), expected, atol=3e-2, rtol=3e-2)
    graph, static_x = torch.cuda.CUDAGraph(), x.clone()  # capturable: no host synchronization
    moe.fused_moe(static_x, weights, expert_ids, w13, w2)
    with torch.cuda.graph(graph):
        captured = moe.fused_moe(static_x, weights, expert_ids, w13, w2)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    expected = moe.fused_moe_reference(static_x, weights, expert_ids, w13, w2)
    torch.testing.assert_close(captured, expected, atol=3e-2, rtol=3e-2)
