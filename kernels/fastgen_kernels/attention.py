"""Paged attention over a ragged batch that mixes decodes and prompt chunks.

Layout shared by the reference and the Triton kernel:

- ``query``: ``[num_tokens, num_heads, head_dim]``, the step's tokens of all sequences, flattened
  in sequence order.
- ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``; the step's
  own keys and values are already written (see ``fastgen.kernels.cache``).
- ``query_start``: int32 ``[num_seqs + 1]``, offsets of each sequence's tokens in ``query``.
- ``context_lens``: int32 ``[num_seqs]``, tokens in the cache for each sequence *including* this
  step's tokens, so query token ``i`` of a sequence with ``q`` query tokens sits at position
  ``context_len - q + i`` and attends to positions ``<=`` its own (causal).
- ``block_tables``: int32 ``[num_seqs, max_blocks_per_seq]``; entries past a sequence's last block
  are ignored.
- ``sliding_window``: when set, a query at position ``p`` sees keys at positions ``> p - window``.

- ``num_decodes``: the caller guarantees that the first ``num_decodes`` sequences have exactly one
  query token each (a Dynamic SplitFuse step puts its decodes first). Not checked (that would sync
  with the device); a wrong value gives wrong outputs. The Triton path then runs a mixed step as a
  decode-only launch plus a launch for the rest, each with its own tile config; ``0`` (the default)
  keeps the whole batch in one launch. Results are the same either way; the reference ignores it.

The Triton path (``paged_attention_triton``, kernels in ``attention_triton.py``) serves the ragged
batch with one launch, or two with ``num_decodes``; see that module for the work decomposition.
On the CPU, ``paged_attention_cpu`` computes what the reference computes with a few large torch
ops per step instead of a dozen small ones per sequence (tests compare the two).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import reference_forced, use_triton
from .attention_triton import paged_attention_triton


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
    num_decodes: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch paged attention, one sequence at a time (what the other paths are tested against)."""
    del max_query_len, max_context_len, num_decodes  # shape the Triton launches; not needed here
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    starts = query_start.tolist()
    lens = context_lens.tolist()
    for seq, context_len in enumerate(lens):
        q_begin, q_end = starts[seq], starts[seq + 1]
        query_len = q_end - q_begin
        if query_len == 0:
            continue
        num_blocks = -(-context_len // block_size)
        blocks = block_tables[seq, :num_blocks].long()
        keys = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
        values = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        q = query[q_begin:q_end].transpose(0, 1).float()  # [heads, q, d]
        scores = torch.matmul(q, keys.permute(1, 2, 0).float()) * scale  # [heads, q, ctx]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        query_pos = torch.arange(context_len - query_len, context_len, device=query.device)
        key_pos = torch.arange(context_len, device=query.device)
        allowed = key_pos[None, :] <= query_pos[:, None]
        if sliding_window is not None:
            allowed &= key_pos[None, :] > query_pos[:, None] - sliding_window
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        result = torch.matmul(probs, values.transpose(0, 1).float())  # [heads, q, d]
        out[q_begin:q_end] = result.transpose(0, 1).to(out.dtype)
    return out


def paged_attention_cpu(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
    num_decodes: int = 0,
    softcap: float | None = None,
    plan: CpuAttentionPlan | None = None,
) -> torch.Tensor:
    """The reference's attention (float32 scores, the same masks), batched for the CPU backend.

    The sequences with one query token (decodes, wherever they sit: ``num_decodes`` is not needed)
    attend as a few padded batches, their keys and values gathered with one copy per cache and
    batch; every other sequence attends on its own, as in the reference. The reference runs a dozen
    small ops per sequence and layer, and a 2-core CPU spends more time dispatching those than
    computing them. Scores in float32 as in the reference; torch's fused attention sums in another
    order, so outputs agree to float32 rounding, not bit for bit.

    ``plan``: the step's `CpuAttentionPlan` (the runner makes one per step and every layer shares
    it); without one, this call makes its own from the batch tensors.
    """
    del max_query_len, max_context_len, num_decodes  # shape the Triton launches; not needed here
    if out is None:
        out = torch.empty_like(query)
    if plan is None:
        plan = CpuAttentionPlan.from_tensors(query_start, context_lens, block_tables)
    num_heads, head_dim = query.shape[1:]
    for group in plan.groups(key_cache.shape[1], sliding_window):
        num_seqs = group.slots.shape[0] // group.width
        # [seqs, query_len, heads, d]: a token per decode, or the tokens of one chunk
        if group.span is None:
            grouped = query.index_select(0, group.rows)
        else:
            grouped = query[group.span[0] : group.span[1]]
        grouped = grouped.view(num_seqs, group.query_len, num_heads, head_dim)
        gathered = plan.workspace.gather_buffers(group.slots.shape[0], key_cache)
        result = _attend(grouped.transpose(1, 2), key_cache, value_cache, group, scale, softcap, gathered)
        result = result.transpose(1, 2).reshape(-1, num_heads, head_dim)
        if group.span is None:
            out.index_copy_(0, group.rows, result.to(out.dtype))
        else:
            out[group.span[0] : group.span[1]].copy_(result)
    return out


class _Group(NamedTuple):
    """Sequences that attend as one padded batch, with all their query tokens: ``rows`` (int64) in
    the step's tokens, sequence by sequence; ``query_len`` tokens each; ``slots`` (int64
    ``[seqs * width]``) the cache slots each reads, ``width`` of them per sequence; ``mask``
    (float32 ``[seqs, 1, query_len, width]``) 0 where each query may look and -inf elsewhere (what
    torch's fused attention would make of a bool mask at every call), or None where it may look
    everywhere; ``span``: ``(begin, end)`` when ``rows`` is that range, which a slice then reads
    and writes without an index op."""

    rows: torch.Tensor
    query_len: int
    width: int
    slots: torch.Tensor
    mask: torch.Tensor | None
    span: tuple[int, int] | None


class CpuAttentionPlan:
    """How `paged_attention_cpu` batches one step: which sequences attend together, and for each
    such group the query rows, cache slots and masks. It belongs to the step, not to a layer: the
    runner makes it where it flattens the step (from the host's lists, so nothing is read back
    from tensors), and every layer passes it in. A group's tensors depend on the cache's block
    size and the layer's sliding window, so they are made by the first layer that asks for a
    (block size, window) and kept for the step's other layers.

    Decodes are grouped by context length, longest first, a group taking sequences while the
    longest context is at most twice theirs: padding then at most doubles the keys gathered, where
    one batch could gather a thousand times too many (a long context among many short ones). Every
    other sequence is a group of its own. Within a group the sequences keep the step's order, so
    that the usual step (decodes first, all in one group) reads and writes its rows as one slice.

    ``block_tables``: one list per sequence, all of one width (past a sequence's last block the
    entries are never read). ``workspace``: where the keys and values are gathered, kept by the
    caller from step to step (the runner's); without one, the plan has its own."""

    def __init__(
        self,
        query_start: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        device: torch.device | str = "cpu",
        workspace: CpuAttentionWorkspace | None = None,
    ):
        self.query_start = query_start
        self.context_lens = context_lens
        self.block_tables = block_tables
        self.device = torch.device(device)
        query_lens = [end - begin for begin, end in itertools.pairwise(query_start)]
        decodes = sorted(
            (seq for seq, length in enumerate(query_lens) if length == 1), key=lambda s: -context_lens[s]
        )
        members: list[list[int]] = []
        for seq in decodes:
            if members and context_lens[members[-1][0]] <= 2 * context_lens[seq]:
                members[-1].append(seq)
            else:
                members.append([seq])
        members = [sorted(seqs) for seqs in members]
        members += [[seq] for seq, length in enumerate(query_lens) if length > 1]
        self.members = members  # the sequences of each group
        self.query_lens = query_lens
        self.workspace = workspace if workspace is not None else CpuAttentionWorkspace()
        self._groups: dict[tuple[int, int | None], list[_Group]] = {}

    @classmethod
    def from_tensors(
        cls, query_start: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor
    ) -> CpuAttentionPlan:
        """The plan of a batch given as tensors (a caller without the host's lists)."""
        return cls(query_start.tolist(), context_lens.tolist(), block_tables.tolist(), query_start.device)

    def groups(self, block_size: int, sliding_window: int | None) -> list[_Group]:
        """The groups' tensors for a cache of ``block_size`` and a layer's ``sliding_window``."""
        key = (block_size, sliding_window)
        groups = self._groups.get(key)
        if groups is None:
            groups = self._groups[key] = [
                _group(
                    seqs,
                    self.query_start,
                    self.context_lens,
                    self.query_lens[seqs[0]],
                    self.block_tables,
                    block_size,
                    sliding_window,
                    self.device,
                )
                for seqs in self.members
            ]
        return groups


class CpuAttentionWorkspace:
    """The tensors `paged_attention_cpu` gathers keys and values into, kept from step to step.

    Every group and layer of a step, and every later step, gathers into the same two tensors per
    (kv heads, head dim, dtype, device): each group's attention is done with them before the next
    gathers, and the result does not alias them. Fresh tensors per gather cost up to ten times the
    copy: the gather grows with the context every step, glibc serves a request at or above its mmap
    threshold with a new mapping, and its pages fault in again. The capacity grows to at least twice
    the last one, so a growing context reallocates in a few steps of many; it never shrinks, so the
    workspace holds twice the largest gather at most (one layer's keys and values for the step's
    decodes, padded at most to twice their length, or one chunk's context)."""

    def __init__(self) -> None:
        # (kv heads, head dim, dtype, device) -> the kept keys' and values' tensors
        self._buffers: dict[tuple[int, int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]]
        self._buffers = {}

    def gather_buffers(self, num_slots: int, key_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two contiguous tensors ``[num_slots, kv_heads, head_dim]`` of ``key_cache``'s dtype and
        device, views of the kept ones (valid until the next call)."""
        kv_heads, head_dim = key_cache.shape[2:]
        key = (kv_heads, head_dim, key_cache.dtype, key_cache.device)
        buffers = self._buffers.get(key)
        if buffers is None or buffers[0].shape[0] < num_slots:
            capacity = num_slots if buffers is None else max(num_slots, 2 * buffers[0].shape[0])
            shape = (capacity, kv_heads, head_dim)
            buffers = self._buffers[key] = (key_cache.new_empty(shape), key_cache.new_empty(shape))
        return buffers[0][:num_slots], buffers[1][:num_slots]


def _group(
    seqs: list[int],
    starts: list[int],
    lens: list[int],
    query_len: int,
    tables: list[list[int]],
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
) -> _Group:
    """The `_Group` of sequences ``seqs``, each with ``query_len`` query tokens.

    Past a shorter context a row reads the sequence's first slot again. Those positions are masked
    out, but they must still hold finite numbers: a stale slot, or one in a table entry past the
    sequence's last block (which the reference never reads), could hold a NaN that no mask hides."""
    row_list = [starts[seq] + i for seq in seqs for i in range(query_len)]
    rows = torch.tensor(row_list, device=device)
    span = (row_list[0], row_list[-1] + 1) if row_list[-1] - row_list[0] == len(row_list) - 1 else None
    width = max(lens[seq] for seq in seqs)
    key_pos = torch.arange(width, device=device)
    group_lens = torch.tensor([lens[seq] for seq in seqs], device=device)[:, None]  # [seqs, 1]
    read = torch.where(key_pos < group_lens, key_pos, 0)  # [seqs, width]
    num_blocks = -(-width // block_size)
    blocks = torch.tensor([tables[seq][:num_blocks] for seq in seqs], dtype=torch.int64, device=device)
    slots = (blocks.gather(1, read // block_size) * block_size + read % block_size).view(-1)
    # [seqs, query_len, 1]: the positions of the queries, the last query_len of each context
    query_pos = group_lens[:, :, None] - query_len + torch.arange(query_len, device=device)[:, None]
    allowed = key_pos <= query_pos  # [seqs, query_len, width]: causal, and so within the context
    if sliding_window is not None:
        allowed &= key_pos > query_pos - sliding_window
    mask = None
    if not bool(allowed.all()):  # the same for every head
        blocked = ~allowed[:, None]
        mask = torch.zeros(blocked.shape, device=device).masked_fill_(blocked, float("-inf"))
    return _Group(rows, query_len, width, slots, mask, span)


# From this many decodes in a group, torch's fused attention is faster with the queries of a kv
# head as its rows than with enable_gqa; with fewer it is slower (1 thread)
_GQA_ROWS_MIN_SEQS = 8


def _attend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group: _Group,
    scale: float,
    softcap: float | None,
    gathered: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Attention of ``query`` ``[seqs, heads, query_len, d]`` over the keys and values of
    ``group``'s slots where its mask allows; float32 ``[seqs, heads, query_len, d]``. The keys and
    values are gathered into ``gathered`` (`CpuAttentionWorkspace.gather_buffers`), which the result
    does not alias."""
    num_seqs, num_heads, _, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    shape = (num_seqs, group.width, num_kv_heads, head_dim)
    key_rows, value_rows = gathered
    keys = torch.index_select(key_cache.view(-1, num_kv_heads, head_dim), 0, group.slots, out=key_rows)
    values = torch.index_select(value_cache.view(-1, num_kv_heads, head_dim), 0, group.slots, out=value_rows)
    keys, values = keys.view(shape), values.view(shape)
    keys = keys.transpose(1, 2).float()  # [seqs, kv_heads, width, d]
    values = values.transpose(1, 2).float()
    query = query.float()
    gqa = num_heads != num_kv_heads
    if softcap is None and gqa and group.query_len == 1 and num_seqs >= _GQA_ROWS_MIN_SEQS:
        # one query a sequence: the queries of a kv head are its rows, [seqs, kv_heads, group, d]
        # (no expansion of the keys and values to every head; the mask, one row, broadcasts)
        rows = query.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        result = F.scaled_dot_product_attention(rows, keys, values, attn_mask=group.mask, scale=scale)
        return result.reshape(num_seqs, num_heads, 1, head_dim)
    if softcap is None:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=group.mask, scale=scale, enable_gqa=gqa
        )
    group_size = num_heads // num_kv_heads
    keys, values = keys.repeat_interleave(group_size, dim=1), values.repeat_interleave(group_size, dim=1)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if group.mask is not None:
        scores = scores + group.mask  # finite scores: the same as filling -inf where masked
    return torch.matmul(torch.softmax(scores, dim=-1), values)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
    num_decodes: int = 0,
    softcap: float | None = None,
    cpu_plan: CpuAttentionPlan | None = None,
) -> torch.Tensor:
    """Attention of a ragged batch against the paged cache: Triton on CUDA, `paged_attention_cpu` on
    the CPU, the reference elsewhere and wherever ``FASTGEN_KERNELS=reference`` forces it.

    ``num_decodes``: the first ``num_decodes`` sequences have one query token each (the caller's
    promise, see the module docstring); lets the Triton path launch decodes and chunks apart.
    ``cpu_plan``: the step's `CpuAttentionPlan`, for the CPU path (made here when not given; the
    other paths need none).
    """
    impl: Callable[..., torch.Tensor]
    if use_triton(query):
        impl = paged_attention_triton
    elif query.device.type == "cpu" and not reference_forced():
        impl = functools.partial(paged_attention_cpu, plan=cpu_plan)
    else:
        impl = paged_attention_reference
    return impl(
        query,
        key_cache,
        value_cache,
        query_start,
        context_lens,
        block_tables,
        scale=scale,
        sliding_window=sliding_window,
        max_query_len=max_query_len,
        max_context_len=max_context_len,
        out=out,
        num_decodes=num_decodes,
        softcap=softcap,
    )
