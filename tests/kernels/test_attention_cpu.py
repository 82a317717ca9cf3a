"""The CPU backend of paged attention (`paged_attention_cpu`) against the plain reference.

Batches come from `make_batch` (tests/kernels/test_attention.py): shuffled block tables, entries
past a sequence's last block pointing at a NaN-filled block. Here the unused tail of each
sequence's last block is NaN-filled too, so a read past a context that reaches the output shows.
"""

from __future__ import annotations

import pytest
import torch
from fastgen.kernels import _dispatch, attention
from fastgen.kernels.attention import (
    CpuAttentionPlan,
    CpuAttentionWorkspace,
    paged_attention_cpu,
    paged_attention_reference,
)

from .test_attention import make_batch

CPU = torch.device("cpu")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (num_heads, num_kv_heads, head_dim, block_size)
SHAPES = [
    (4, 4, 64, 16),  # MHA
    (9, 3, 64, 16),  # SmolLM2-135M: GQA 3
    (7, 1, 80, 32),  # MQA
]


def poisoned_batch(
    specs: list[tuple[int, int]],
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
) -> dict:
    """`make_batch`, with NaN in every slot of a sequence's last block past its context."""
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = make_batch(
        specs,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        CPU,
        strided_query=True,
        cache_dtype=cache_dtype,
    )
    for seq, (_, context_len) in enumerate(specs):
        if context_len % block_size:
            last = int(batch["block_tables"][seq, (context_len - 1) // block_size])
            batch["key_cache"][last, context_len % block_size :] = float("nan")
            batch["value_cache"][last, context_len % block_size :] = float("nan")
    return batch


def compare(
    specs: list[tuple[int, int]],
    shape: tuple[int, int, int, int],
    dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype | None = None,
    **options,
) -> None:
    batch = poisoned_batch(specs, shape, dtype, cache_dtype)
    scale = shape[2] ** -0.5 if cache_dtype is None else shape[2] ** -0.5 / 20
    out = torch.full_like(batch["query"], float("nan"))
    result = paged_attention_cpu(**batch, scale=scale, out=out, **options)
    assert result is out
    expected = paged_attention_reference(**batch, scale=scale, **options)
    assert not out.isnan().any(), "a read past a context reached the output, or a row was left unwritten"
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decodes(shape, seed) -> None:
    """Padded batches: contexts of one token, of a block exactly, and across many blocks."""
    compare([(1, c) for c in (1, 17, 100, 64, 203, 16)], shape)
    compare([(1, 37)], shape)
    # groups of 8 and more decodes (their queries of a kv head as rows, with GQA): masked, unmasked
    compare([(1, c) for c in range(40, 60, 2)], shape)
    compare([(1, 33)] * 8, shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mixed_steps(shape, seed) -> None:
    """Decodes first, then prompt chunks with and without earlier context, and decodes between the
    chunks (batched with the leading ones)."""
    compare([(1, 50), (1, 7), (37, 37), (12, 160), (1, 1), (70, 85), (1, 33)], shape)


def test_decode_groups_bound_the_padding(seed) -> None:
    """A long context among short ones: decodes are grouped so that no group pads a context to more
    than twice its length, and every query token is in one group."""
    specs = [(1, 1000), (1, 10), (5, 40), (1, 12), (1, 600), (1, 300), (1, 499), (1, 1), (1, 2)]
    compare(specs, (9, 3, 64, 16))
    batch = poisoned_batch(specs, (9, 3, 64, 16), torch.float32)
    tensors = batch["query_start"], batch["context_lens"], batch["block_tables"]
    plan = CpuAttentionPlan.from_tensors(*tensors).groups(16, None)
    lens = batch["context_lens"].tolist()
    rows = [row for group in plan for row in group.rows.tolist()]
    assert sorted(rows) == list(range(int(batch["query_start"][-1])))
    for group in plan:
        seqs = [batch["query_start"].tolist().index(row) for row in group.rows[:: group.query_len].tolist()]
        assert group.width == max(lens[seq] for seq in seqs)
        assert all(group.width <= 2 * lens[seq] for seq in seqs), (group.width, seqs)
    assert len(plan) == 5  # decodes {1000, 600}, {499, 300}, {12, 10}, {2, 1}; the chunk


def test_plan_follows_the_block_tables(seed) -> None:
    """The next step with the same lengths but other blocks (the tables changed in place) reads the
    new blocks: a call without a plan makes its own from the tensors it is given."""
    batch = poisoned_batch([(1, 40), (1, 20), (6, 30)], (4, 2, 64, 16), torch.float32)
    first = paged_attention_cpu(**batch, scale=0.125)
    permutation = torch.randperm(batch["key_cache"].shape[0])  # block b moves to permutation[b]
    for cache in (batch["key_cache"], batch["value_cache"]):
        cache[permutation] = cache.clone()
    batch["block_tables"].copy_(permutation[batch["block_tables"].long()])
    torch.testing.assert_close(paged_attention_cpu(**batch, scale=0.125), first, atol=0, rtol=0)


def test_a_plan_serves_every_layer_of_its_step(seed) -> None:
    """A plan given by the caller gives what the call would plan for itself; its groups are made
    once per (block size, sliding window) and reused by the next layer with the same ones."""
    specs = [(1, 40), (1, 90), (1, 12), (9, 30), (1, 65)]
    batch = poisoned_batch(specs, (8, 2, 64, 16), torch.float32)
    host = (batch["query_start"].tolist(), batch["context_lens"].tolist(), batch["block_tables"].tolist())
    plan = CpuAttentionPlan(*host)
    for window in (None, 20, None):
        expected = paged_attention_cpu(**batch, scale=0.125, sliding_window=window)
        given = paged_attention_cpu(**batch, scale=0.125, sliding_window=window, plan=plan)
        torch.testing.assert_close(given, expected, atol=0, rtol=0)
    assert plan.groups(16, None) is plan.groups(16, None)
    assert plan.groups(16, 20) is not plan.groups(16, None)
    assert len(plan.groups(16, None)) == 4  # decodes {90, 65}, {40}, {12}; the chunk


def test_layers_of_a_step_share_the_gather_buffers(seed) -> None:
    """The keys and values of every layer of a step are gathered into the same two tensors (a
    fresh allocation per layer can cost more than the copy): each layer, with its own cache, still
    gives the reference's output, and no layer after the first allocates."""
    specs = [(1, 40), (1, 33), (1, 12), (5, 30)]
    shape = (9, 3, 64, 16)
    first = poisoned_batch(specs, shape, torch.float32)
    # one step: the same lengths and block tables, each layer its own query and cache
    layers = [first] + [
        {
            **first,
            "query": first["query"] * -scale,
            "key_cache": first["key_cache"] * scale,
            "value_cache": first["value_cache"] + scale,
        }
        for scale in (0.5, 2.0)
    ]
    plan = CpuAttentionPlan(
        first["query_start"].tolist(), first["context_lens"].tolist(), first["block_tables"].tolist()
    )
    made = []
    gather_buffers = plan.workspace.gather_buffers

    def recording(num_slots: int, key_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = gather_buffers(num_slots, key_cache)
        assert all(buffer.shape[0] == num_slots and buffer.is_contiguous() for buffer in buffers)
        made.append(tuple(buffer.untyped_storage().data_ptr() for buffer in buffers))
        return buffers

    plan.workspace.gather_buffers = recording
    outputs = [paged_attention_cpu(**layer, scale=0.125, plan=plan) for layer in layers]
    for layer, output in zip(layers, outputs, strict=True):
        expected = paged_attention_reference(**layer, scale=0.125)
        tolerance = TOLERANCE[torch.float32]
        torch.testing.assert_close(output, expected, atol=tolerance, rtol=tolerance)
    groups = plan.groups(16, None)
    assert len(made) == len(layers) * len(groups)
    # groups: decodes {40, 33} (80 slots, the most), {12}, the chunk (30): one pair for all
    assert len(set(made)) == 1


def test_the_workspace_serves_later_steps(seed) -> None:
    """A workspace kept from step to step: each step gives the reference's output while the
    contexts grow past its capacity, when the batch shrinks (its tensors then hold more than a
    step gathers, stale past the step's slots), and for a chunk longer than everything before;
    the capacity grows geometrically, so a growing context reallocates in few of its steps."""
    shape = (9, 3, 64, 16)
    workspace = CpuAttentionWorkspace()
    steps = [[(1, 20 + step + 3 * seq) for seq in range(4)] for step in range(40)]
    steps += [[(1, 61), (1, 50)], [(1, 62)], [(1, 63), (30, 500)], [(1, 2), (1, 3)]]
    capacities = []
    for specs in steps:
        batch = poisoned_batch(specs, shape, torch.float32)
        host = (batch["query_start"].tolist(), batch["context_lens"].tolist(), batch["block_tables"].tolist())
        plan = CpuAttentionPlan(*host, workspace=workspace)
        output = paged_attention_cpu(**batch, scale=0.125, plan=plan)
        expected = paged_attention_reference(**batch, scale=0.125)
        tolerance = TOLERANCE[torch.float32]
        torch.testing.assert_close(output, expected, atol=tolerance, rtol=tolerance)
        key_cache = batch["key_cache"]
        kept = workspace.gather_buffers(1, key_cache)[0]
        capacities.append(kept.untyped_storage().nbytes() // (3 * 64 * 4))
    # 4 decodes from 4 x 29 to 4 x 68 slots: 116, then 232 (doubled), then 464; the chunk's 500: 928
    assert sorted(set(capacities)) == [116, 232, 464, 928]
    assert capacities[40:] == [464, 464, 928, 928]  # the batch shrinks: kept; then the chunk
    # another head count or dtype has its own tensors
    other = torch.empty(1, 16, 2, 64)
    assert workspace.gather_buffers(8, other)[0].shape == (8, 2, 64)
    assert workspace.gather_buffers(8, key_cache)[0].shape == (8, 3, 64)
    half = workspace.gather_buffers(8, key_cache.half())[0]
    assert half.dtype == torch.float16


def test_decode_rows_in_step_order(seed) -> None:
    """Decodes are grouped by length but keep the step's order within a group: decodes that lead
    the step in one group read and write their rows as one span; a group whose rows are not one
    range (a chunk between its decodes) has none, and both give the reference's output."""
    specs = [(1, 30), (1, 50), (1, 40), (7, 20), (1, 45)]
    compare(specs, (9, 3, 64, 16))
    batch = poisoned_batch(specs, (9, 3, 64, 16), torch.float32)
    groups = CpuAttentionPlan.from_tensors(batch["query_start"], batch["context_lens"], batch["block_tables"])
    first, chunk = groups.groups(16, None)
    assert first.rows.tolist() == [0, 1, 2, 10] and first.span is None
    assert chunk.span == (3, 10)
    leading = [(1, 30), (1, 50), (1, 40), (7, 20)]
    compare(leading, (9, 3, 64, 16))
    batch = poisoned_batch(leading, (9, 3, 64, 16), torch.float32)
    plan = CpuAttentionPlan.from_tensors(batch["query_start"], batch["context_lens"], batch["block_tables"])
    assert plan.groups(16, None)[0].span == (0, 3)


def test_the_runner_plans_once_a_step(toy_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the engine on the CPU, each step with tokens makes one plan, where it flattens the
    step, and each group's tensors are made once, however many layers attend; every step gathers
    into the runner's workspace."""
    from fastgen.runner import ModelRunner
    from tests.helpers import engine_greedy

    plans: list[CpuAttentionPlan] = []
    groups_made = []
    steps = []
    make_plan, make_group, launch = CpuAttentionPlan.__init__, attention._group, ModelRunner.launch

    def planning(self, *args, **kwargs) -> None:
        plans.append(self)
        make_plan(self, *args, **kwargs)

    def grouping(*args, **kwargs):
        groups_made.append(args[0])
        return make_group(*args, **kwargs)

    def launching(self, plan, *args, **kwargs):
        steps.append(len(plan.chunks))
        return launch(self, plan, *args, **kwargs)

    monkeypatch.setattr(CpuAttentionPlan, "__init__", planning)
    monkeypatch.setattr(attention, "_group", grouping)
    monkeypatch.setattr(ModelRunner, "launch", launching)
    path = toy_checkpoint("llama", num_hidden_layers=3)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    engine_greedy(path, prompts, 6, device="cpu", executor="inprocess", token_budget=8)
    assert len(plans) == sum(1 for chunks in steps if chunks) > 6
    assert len(groups_made) == sum(len(plan.members) for plan in plans)
    assert len({id(plan.workspace) for plan in plans}) == 1  # the runner's, kept from step to step


def test_prefill_only(seed) -> None:
    compare([(150, 150), (3, 3), (40, 300)], (8, 2, 64, 16))


@pytest.mark.parametrize("window", [1, 8, 20])
def test_sliding_window(window, seed) -> None:
    compare([(1, 100), (1, 5), (30, 30), (16, 140), (1, 3)], (8, 2, 64, 16), sliding_window=window)


def test_softcap(seed) -> None:
    specs = [(1, 70), (1, 9), (24, 60), (5, 5)]
    compare(specs, (4, 2, 64, 16), softcap=1.0)
    compare(specs, (4, 2, 64, 16), softcap=1.0, sliding_window=20)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(dtype, seed) -> None:
    """Scores in float32 as in the reference; the output rounded to the query's dtype."""
    compare([(1, 40), (1, 90), (9, 30)], (9, 3, 64, 16), dtype)


def test_fp8_cache(seed) -> None:
    compare([(1, 40), (1, 7), (9, 30), (1, 65)], (8, 2, 64, 16), cache_dtype=torch.float8_e4m3fn)


def test_empty_sequences_and_trailing_rows(seed) -> None:
    """Sequences without query tokens are skipped; rows past the last sequence's are left alone."""
    batch = poisoned_batch([(1, 40), (1, 12), (0, 0), (3, 30), (0, 0)], (4, 2, 64, 16), torch.float32)
    batch["query"] = torch.cat([batch["query"], torch.randn_like(batch["query"][:2])])
    out = torch.full_like(batch["query"], 7.0)
    paged_attention_cpu(**batch, scale=0.125, out=out)
    expected = paged_attention_reference(**batch, scale=0.125, out=torch.full_like(batch["query"], 7.0))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert (out[-2:] == 7.0).all()


def test_dispatch(seed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path on the CPU; the reference where ``FASTGEN_KERNELS=reference`` forces it."""
    batch = make_batch([(1, 20), (4, 9)], 4, 2, 64, 16, torch.float32, CPU)
    calls = []

    def counting(name: str):
        function = getattr(attention, name)

        def counted(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return counted

    for name in ("paged_attention_cpu", "paged_attention_reference"):
        monkeypatch.setattr(attention, name, counting(name))
    attention.paged_attention(**batch, scale=0.125)
    monkeypatch.setattr(_dispatch, "_forced_reference", lambda: True)
    attention.paged_attention(**batch, scale=0.125)
    assert calls == ["paged_attention_cpu", "paged_attention_reference"]
