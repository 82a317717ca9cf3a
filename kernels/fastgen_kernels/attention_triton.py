"""Triton paged attention for ragged batches: decodes and prompt chunks in one launch, or two.

Layout and semantics are ``fastgen.kernels.attention``'s (read its module docstring).

Work decomposition. The grid is ``(query-tile slots, num_kv_heads, num_splits)``. A program owns one
KV head and one tile of one sequence's query tokens; its rows are (token, query head of the KV
head's group) pairs, so a GQA/MQA group shares every K/V tile it loads and the tile feeds ``tl.dot``.

- Prompt chunks use ``BLOCK_M`` rows (``BLOCK_M // group`` tokens of every head of the group).
- Decodes (one query token) take a separate branch with ``BLOCK_M_DECODE = max(16, group)`` rows,
  the query heads of the group packed together: K/V are read once per KV head.
- Sequence lookup: a launch serves the sequences of its ``query_start`` (the whole batch, or a
  suffix view ``query_start[d:]`` whose offsets stay absolute rows of ``query``/``out``). With
  ``T`` tokens and ``S`` sequences there are ``T // tokens_per_tile + S`` slots; sequence ``s``
  owns the slots from ``(query_start[s] - query_start[0]) // tokens_per_tile + s`` on, enough for
  all its tiles (surplus slots exit at once). A program finds its sequence by binary search over
  ``query_start``, so the launch needs only tensor shapes: no host sync, CUDA-graph capturable.
  Decode-only launches (``max_query_len == 1``) use one slot per sequence and skip the search.
- Two launches: given ``num_decodes`` (the batch's leading one-token sequences), a mixed step runs
  the decodes as a decode-only launch and the rest as a second launch, so each gets its own
  config (a mixed launch compiles both branches into one kernel: the decode programs would carry
  the chunk branch's registers and warps). On a GPU the two run at once, the chunks on a side
  stream of high priority: the decodes are bound by memory and the chunks by the tensor cores, and
  each fills the other's partly empty last round of programs (``FASTGEN_ATTENTION_STREAMS=0``: one
  after the other; measured in benchmarks/NOTES-kernels.md, session 15).
- Keys are visited in ``BLOCK_N`` tiles aligned to multiples of ``BLOCK_N``; tiles that every row
  sees whole (inside the causal limit and the sliding window) run without masks, the few at the
  diagonal and at the window's start with them.
- Split-KV (flash-decoding): with ``num_splits > 1`` each program covers one contiguous part of
  the keys its tile needs and writes an fp32 partial output and its log-sum-exp; a second kernel
  merges them. The host picks ``num_splits`` from the launch's shape and ``max_context_len``. The
  scratch is not initialised: for every token of the launch, every (head, split) entry is written
  (its tile's program exists for every KV head and split and stores all valid rows, a split that
  sees no key stores lse ``-inf`` and a zero output), and the merge skips rows past the launch's
  last token.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from . import pdl

NO_WINDOW = 1 << 30  # sliding window "none": larger than any position
MAX_SPLITS = 64


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, positions, window, kv_lo, kv_hi, start, stop,
    key_cache_ptr, value_cache_ptr, block_table_ptr, kv_head,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online-softmax accumulation over key tiles ``[start, stop)`` (tile-aligned)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for tile_start in range(start, stop, BLOCK_N):
        keys = tile_start + offs_n
        in_range = (keys >= kv_lo) & (keys < kv_hi)
        if BLOCK_N <= BLOCK_SIZE:
            # an aligned tile lies inside one cache block
            block = tl.load(block_table_ptr + tile_start // BLOCK_SIZE).to(tl.int64)
            k_rows = block * stride_kb + (keys % BLOCK_SIZE) * stride_kt
            v_rows = block * stride_vb + (keys % BLOCK_SIZE) * stride_vt
        else:
            if MASKED:
                blocks = tl.load(block_table_ptr + keys // BLOCK_SIZE, mask=in_range, other=0)
            else:
                blocks = tl.load(block_table_ptr + keys // BLOCK_SIZE)
            blocks = blocks.to(tl.int64)
            k_rows = blocks * stride_kb + (keys % BLOCK_SIZE) * stride_kt
            v_rows = blocks * stride_vb + (keys % BLOCK_SIZE) * stride_vt
        k_ptrs = key_cache_ptr + kv_head * stride_kh + k_rows[:, None] + offs_d[None, :]
        v_ptrs = value_cache_ptr + kv_head * stride_vh + v_rows[:, None] + offs_d[None, :]
        if MASKED:
            load_mask = in_range[:, None] & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=load_mask, other=0.0)
            v = tl.load(v_ptrs, mask=load_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        k = k.to(q.dtype)  # widens an FP8 cache (exact); a no-op otherwise
        v = v.to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP > 0:  # cap * tanh(s / cap) on the log2-scaled scores: tanh(x) = 2 sigmoid(2x) - 1
            cap = SOFTCAP * 1.4426950408889634
            scores = cap * (2.0 * tl.sigmoid(2.0 * scores / cap) - 1.0)
        if MASKED:
            visible = (keys[None, :] <= positions[:, None]) & (keys[None, :] > positions[:, None] - window)
            visible = visible & in_range[None, :]
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_query_tile(
    query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
    block_table_ptr, q_start, q_len, local_tile, context_len, kv_head, split, num_splits, window,
    first_token, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    GROUP: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, F16_DOT: tl.constexpr,
):
    """Attention of ``TOKENS`` query tokens x ``GROUP`` heads of one sequence (or one split of it).

    ``q_start`` is absolute (a row of ``query``/``out``); partial rows count from ``first_token``.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    token_in_tile = offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    q_index = local_tile * TOKENS + token_in_tile
    row_valid = (token_in_tile < TOKENS) & (q_index < q_len)
    tokens = (q_start + q_index).to(tl.int64)
    positions = context_len - q_len + q_index
    q_mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(query_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    if F16_DOT:  # keys and values then widen to float16 (exact for e4m3), and P goes to float16
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    first_pos = context_len - q_len + local_tile * TOKENS
    last_pos = tl.minimum(first_pos + TOKENS - 1, context_len - 1)
    kv_lo = tl.maximum(first_pos - window + 1, 0)  # the earliest key any row sees
    kv_hi = last_pos + 1
    # keys every row sees: [last_pos - window + 1, first_pos]; whole tiles inside need no mask
    full_lo = tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N
    full_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    span_lo = (kv_lo // BLOCK_N) * BLOCK_N
    part = tl.cdiv(tl.cdiv(kv_hi - span_lo, num_splits), BLOCK_N) * BLOCK_N
    start = span_lo + split * part
    stop = tl.minimum(start + part, kv_hi)
    full_start = tl.minimum(tl.maximum(full_lo, start), stop)
    full_stop = tl.minimum(tl.maximum(full_hi, full_start), stop)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, positions, window, kv_lo, kv_hi, start, full_start,
        key_cache_ptr, value_cache_ptr, block_table_ptr, kv_head,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, qk_scale,
        True, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, SOFTCAP,
    )
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, positions, window, kv_lo, kv_hi, full_start, full_stop,
        key_cache_ptr, value_cache_ptr, block_table_ptr, kv_head,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, qk_scale,
        False, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, SOFTCAP,
    )
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, positions, window, kv_lo, kv_hi, full_stop, stop,
        key_cache_ptr, value_cache_ptr, block_table_ptr, kv_head,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, qk_scale,
        True, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, SOFTCAP,
    )

    if SPLIT:
        seen = l_i > 0  # False where this split saw no key: weight exp2(-inf) = 0 in the merge
        result = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        rows = tokens - first_token
        base = rows * stride_pt + heads * stride_ph + split * stride_ps
        tl.store(partial_out_ptr + base[:, None] + offs_d[None, :], result, mask=q_mask)
        tl.store(partial_lse_ptr + rows * stride_lt + heads * stride_lh + split, lse, mask=row_valid)
    else:
        result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only on padding rows
        tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=q_mask)


# Arguments that change from step to step are not specialized on (Triton would compile a variant
# per alignment or divisibility class of theirs, in the middle of serving): the sequence tables are
# views at any offset (suffix launches), the block-table width is the step's longest context, and
# the split scratch's strides follow num_splits.
@triton.jit(do_not_specialize=["query_start_ptr", "context_lens_ptr", "block_tables_ptr",
                               "num_seqs", "num_splits", "window", "stride_bt",
                               "stride_pt", "stride_ph", "stride_lt", "stride_lh"])
def _paged_attention_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
    query_start_ptr, context_lens_ptr, block_tables_ptr,
    num_seqs, num_splits, window, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_bt, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M_DECODE: tl.constexpr, BLOCK_N_DECODE: tl.constexpr,
    HAS_PREFILL: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    F16_DOT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Grid ``(slots, num_kv_heads, num_splits)``; see the module docstring."""
    pdl.enter(USE_PDL)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # the launch's tokens start at query_start[0] (> 0 when it serves a suffix of the batch)
    first_token = tl.load(query_start_ptr).to(tl.int32)
    if HAS_PREFILL:
        # heaviest (last) tiles first: reverse the slot order
        slot = tl.num_programs(0) - 1 - tl.program_id(0)
        lo = num_seqs * 0
        hi = num_seqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            mid_first_slot = (tl.load(query_start_ptr + mid).to(tl.int32) - first_token) // TOKENS + mid
            lo = tl.where(mid_first_slot <= slot, mid, lo)
            hi = tl.where(mid_first_slot <= slot, hi, mid - 1)
        seq = lo
        q_start = tl.load(query_start_ptr + seq).to(tl.int32)
        local_tile = slot - ((q_start - first_token) // TOKENS + seq)
    else:
        seq = tl.program_id(0)
        q_start = tl.load(query_start_ptr + seq).to(tl.int32)
        local_tile = 0
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    if local_tile * TOKENS >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if HAS_PREFILL:
        if q_len > 1:
            _attend_query_tile(
                query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
                block_table_ptr, q_start, q_len, local_tile, context_len, kv_head, split, num_splits,
                window, first_token, qk_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                GROUP, TOKENS, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_SIZE, SPLIT, DOT_PRECISION,
                SOFTCAP, F16_DOT,
            )
        else:
            _attend_query_tile(
                query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
                block_table_ptr, q_start, q_len, local_tile, context_len, kv_head, split, num_splits,
                window, first_token, qk_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                GROUP, 1, BLOCK_M_DECODE, BLOCK_N_DECODE, HEAD_DIM, BLOCK_D, BLOCK_SIZE, SPLIT,
                DOT_PRECISION, SOFTCAP, F16_DOT,
            )
    else:
        _attend_query_tile(
            query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
            block_table_ptr, q_start, q_len, local_tile, context_len, kv_head, split, num_splits,
            window, first_token, qk_scale, stride_qt, stride_qh, stride_ot, stride_oh,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
            GROUP, 1, BLOCK_M_DECODE, BLOCK_N_DECODE, HEAD_DIM, BLOCK_D, BLOCK_SIZE, SPLIT,
            DOT_PRECISION, SOFTCAP, F16_DOT,
        )


@triton.jit(do_not_specialize=["query_start_ptr", "num_seqs", "num_splits", "stride_pt", "stride_ph",
                               "stride_lt", "stride_lh"])
def _merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, query_start_ptr, num_seqs, num_splits,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Combine the splits of one (token, head) of the launch's tokens ``[query_start[0],
    query_start[num_seqs])``; partial row ``r`` is token ``query_start[0] + r``. Rows past the
    launch's last token (padding, or an upper bound on its tokens) were never written: they exit.
    """
    pdl.enter(USE_PDL)
    first_token = tl.load(query_start_ptr).to(tl.int64)
    end_token = tl.load(query_start_ptr + num_seqs).to(tl.int64)
    row = tl.program_id(0).to(tl.int64)
    if first_token + row >= end_token:
        return
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(partial_lse_ptr + row * stride_lt + head * stride_lh + splits, mask=splits < num_splits,
                  other=float("-inf"))
    # every split of a covered token wrote its entry, and one saw a key (the token's own); were all
    # -inf (context_len < query_len, bad input) the result is 0, as in the unsplit path
    lse_max = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(lse_max > float("-inf"), lse_max, 0.0))
    weights = weights / tl.maximum(tl.sum(weights, axis=0), 1e-30)
    mask = (splits[:, None] < num_splits) & (offs_d[None, :] < HEAD_DIM)
    partial = tl.load(partial_out_ptr + row * stride_pt + head * stride_ph + splits[:, None] * stride_ps
                      + offs_d[None, :], mask=mask, other=0.0)
    result = tl.sum(weights[:, None] * partial, axis=0)
    tl.store(out_ptr + (first_token + row) * stride_ot + head * stride_oh + offs_d,
             result.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number exercises the same logic
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(
    head_dim: int, group: int, dtype: torch.dtype, prefill_heavy: bool = True, cache_bytes: int = 2
) -> dict[str, int]:
    """Tile sizes and warps of a launch. Tests and benchmarks may monkeypatch this.

    A launch with prompt chunks compiles both branches into one kernel, so the decode branch
    inherits the chunk branch's registers and warps. Steps that are mostly decodes (a Dynamic
    SplitFuse step with hundreds of running sequences) therefore use 64-row chunk tiles and 4 warps,
    which leaves four decode programs per multiprocessor; prefill-heavy steps use 128 x 128 tiles
    with 8 warps. A one-byte (FP8) cache takes 128-key decode tiles, the same bytes a tile as
    bf16's 64. A decode-only launch pipelines two key tiles, not three: the registers that frees
    puts a fourth program on each multiprocessor, which reads the cache faster than the deeper
    pipeline does. The measurements behind these choices: benchmarks/NOTES-runner.md and
    NOTES-kernels.md.
    """
    big_head = head_dim > 128
    half = dtype.itemsize == 2  # float32 tiles take twice the shared memory: keep them smaller
    wide = prefill_heavy and half and not big_head and head_dim > 64
    block_m = 64 if big_head or not prefill_heavy else 128
    return {
        "BLOCK_M": max(block_m, triton.next_power_of_2(group)),
        "BLOCK_N": 32 if big_head else 128 if wide else 64,
        "BLOCK_M_DECODE": max(16, triton.next_power_of_2(group)),
        "BLOCK_N_DECODE": 32 if big_head else 128 if cache_bytes == 1 else 64,
        "num_warps_prefill": 8 if block_m == 128 and head_dim > 64 else 4,
        "num_warps_decode": 4,
        "num_stages": 2 if big_head else 3,
        "num_stages_decode": 2,  # decode-only launches
        # a one-byte cache under bfloat16 queries: widen keys and values to float16 (one conversion
        # instruction a pair on sm_90, bfloat16 takes three) and take the dots in float16
        # (benchmarks/NOTES-kernels.md, "FP8 KV cache")
        "fp8_f16_dot": True,
    }


DECODE_PROGRAMS_PER_SM = 4  # 114 registers x 4 warps at two stages (ptxas, sm_90, Triton 3.6): four fit


def programs_per_sm(config: dict[str, int], has_prefill: bool) -> int:
    """Programs of a launch resident on a multiprocessor: decode-only launches four; with prompt
    chunks, 128 x 128 tiles with 8 warps take 255 registers a thread (ptxas, sm_90, Triton 3.6), so
    one, and 64-row tiles with 4 warps three."""
    if not has_prefill:
        return DECODE_PROGRAMS_PER_SM
    return 1 if config["num_warps_prefill"] == 8 else 3


def launch_slots(num_tokens: int, num_seqs: int, tokens_per_tile: int, has_prefill: bool) -> int:
    """Programs a launch runs per KV head and split: one per sequence for decodes; with prompt
    chunks, an upper bound on the query tiles (each sequence's last tile may be partial)."""
    return num_tokens // tokens_per_tile + num_seqs if has_prefill else num_seqs


# A decode-only launch of more than a quarter round splits the keys to fill its last round of
# resident programs (`balanced_splits`): the model's constants, fitted to the decode sweep of
# benchmarks/NOTES-kernels.md ("Balanced splits"), where its choice is within 1% of the best
PARTIAL_ROUND_COST = 0.65  # a partly filled last round takes at least this much of a full one
SPLIT_COST = 0.05  # the merge pass and the repeated query loads of a split launch
MAX_BALANCED_SPLITS = 4
KEYS_PER_BALANCED_SPLIT = 256


def round_cost(num_programs: int, splits: int, resident: int) -> float:
    """Time of a decode-only launch of ``num_programs`` programs a split in ``splits`` splits, in
    rounds of ``resident`` programs over whole contexts: each split program reads ``1 / splits`` of
    the keys, a partly filled last round costs at least `PARTIAL_ROUND_COST` of a full one, and a
    split launch pays `SPLIT_COST` for its merge and repeated query loads."""
    full, rest = divmod(num_programs * splits, resident)
    rounds = full + (max(PARTIAL_ROUND_COST, rest / resident) if rest else 0.0)
    return rounds / splits * (1.0 + SPLIT_COST * (splits > 1))


def balanced_splits(num_programs: int, resident: int, max_splits: int) -> int:
    """The split count, up to ``max_splits``, of least `round_cost`."""
    return min(range(1, max(1, max_splits) + 1),
               key=lambda splits: (round_cost(num_programs, splits, resident), splits))


def splits_for(num_programs: int, max_context_len: int, resident: int, decode_only: bool = True) -> int:
    """`choose_num_splits` for ``resident`` programs a round (a device's multiprocessors times the
    programs each holds)."""
    if decode_only:
        if 4 * num_programs > resident:
            return balanced_splits(num_programs, resident, min(
                MAX_BALANCED_SPLITS, max_context_len // KEYS_PER_BALANCED_SPLIT))
        keys_per_split = 64
    elif max_context_len <= 512:
        return 1
    else:
        keys_per_split = 256
    wanted = resident // num_programs
    return max(1, min(wanted, triton.cdiv(max_context_len, keys_per_split), MAX_SPLITS))


def choose_num_splits(
    num_programs: int,
    max_context_len: int,
    device: torch.device,
    decode_only: bool = True,
    programs_per_sm: int = DECODE_PROGRAMS_PER_SM,
) -> int:
    """Splits per sequence so that a launch of few programs still fills the GPU.

    Decode-only launches, light and bound by memory: at most a quarter of a round of resident
    programs (``programs_per_sm`` on each multiprocessor) split to fill up to one round, down to
    one 64-key tile a split (one sequence at 384 tokens: 12.5 us unsplit, 5.8 us in 16 splits);
    larger ones split up to four ways, at least 256 keys a split, where that fills their last
    round (`balanced_splits`: 75 sequences of GQA 32/8 at 1300 tokens, 600 programs, 1.14 rounds
    on an H100: 167 us unsplit, 150 us in 4 splits).
    Launches with prompt chunks split only to fill up to one round, with at least 256 keys a split
    and none up to 512: a launch that fills a round or more does not split, as its partly filled
    last round costs less than the merge's extra pass and the split programs' repeated query loads
    (measured per launch and shape in benchmarks/NOTES-kernels.md, "Attention launch sweeps").
    """
    return splits_for(num_programs, max_context_len, programs_per_sm * _multiprocessor_count(device),
                      decode_only)


def launch_num_splits(
    config: dict[str, int], num_programs: int, max_context_len: int, device: torch.device, has_prefill: bool
) -> int:
    """`choose_num_splits` for a launch of ``config`` with ``num_programs`` programs a split."""
    return choose_num_splits(num_programs, max_context_len, device, decode_only=not has_prefill,
                             programs_per_sm=programs_per_sm(config, has_prefill))


def _empty_partials(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """fp32 split-KV scratch; left unfilled (every entry the merge reads is written first).
    Tests monkeypatch this to hand out NaN-filled buffers."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def paged_attention_triton(
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
    num_splits: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton paged attention: one launch (plus a merge launch when the keys are split), or two.

    ``num_decodes``: the caller guarantees that the first ``num_decodes`` sequences have exactly one
    query token each (not checked: that would sync). When ``0 < num_decodes < num_seqs`` and
    ``max_query_len > 1``, the decodes and the rest get a launch each, into the same ``out``, each
    with its own tile config, warps and split-KV choice; a mixed launch would give the decode
    programs the chunk branch's registers and warps. Otherwise the whole batch is one launch.

    ``query_start`` may be a suffix view ``query_start[d:]`` (with ``context_lens[d:]`` and
    ``block_tables[d:]``): offsets stay absolute rows of ``query``/``out``, and only the tokens
    ``[query_start[0], query_start[-1])`` are read and written.

    ``num_splits`` overrides the host's split-KV choice (tests force the split path with it).
    ``softcap`` caps the scaled scores at ``softcap * tanh(score / softcap)`` (Gemma 2).
    With ``max_query_len`` and ``max_context_len`` given, nothing here syncs with the device.
    """
    num_tokens, num_heads = query.shape[0], query.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    num_seqs = context_lens.shape[0]
    if not 0 <= num_decodes <= min(num_seqs, num_tokens):
        raise ValueError(f"num_decodes must be in [0, {min(num_seqs, num_tokens)}], got {num_decodes}")
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache), ("out", out),
                         ("block_tables", block_tables)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"paged_attention needs a contiguous last dim in {name}")
    if max_query_len is None:
        max_query_len = int((query_start[1:] - query_start[:-1]).max())
    if max_context_len is None:
        max_context_len = int(context_lens.max())

    tensors = (query, key_cache, value_cache, out)
    shared = {"scale": scale, "sliding_window": sliding_window, "softcap": softcap,
              "max_context_len": max_context_len, "num_splits": num_splits}
    if 0 < num_decodes < num_seqs and max_query_len > 1:
        decodes, rest = slice(None, num_decodes), slice(num_decodes, None)
        with _side_by_side(query.device) as beside:
            _launch(*tensors, query_start[: num_decodes + 1], context_lens[decodes], block_tables[decodes],
                    num_tokens=num_decodes, max_query_len=1, **shared)
            with beside:
                _launch(*tensors, query_start[rest], context_lens[rest], block_tables[rest],
                        num_tokens=num_tokens - num_decodes, max_query_len=max_query_len, **shared)
    else:
        _launch(*tensors, query_start, context_lens, block_tables,
                num_tokens=num_tokens, max_query_len=max_query_len, **shared)
    return out


@functools.cache
def _streams_turned_off() -> bool:
    return os.environ.get("FASTGEN_ATTENTION_STREAMS", "").strip().lower() in ("0", "false", "off", "no")


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    # high priority: the chunk programs, one a multiprocessor, are dispatched as soon as one frees
    return torch.cuda.Stream(device, priority=-1)


def _concurrent(device: torch.device) -> bool:
    return device.type == "cuda" and not _streams_turned_off()


@contextlib.contextmanager
def _side_by_side(device: torch.device) -> Iterator[contextlib.AbstractContextManager]:
    """Two independent launches: the first runs on the current stream, the second inside the
    yielded context, on a side stream that starts after everything queued before; on leaving, the
    current stream waits for both. On a CPU, or with concurrent launches off, one after the other."""
    if not _concurrent(device):
        yield contextlib.nullcontext()
        return
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(main)
    try:
        yield torch.cuda.stream(side)
    finally:  # a launch that raised may have queued work on the side stream all the same
        main.wait_stream(side)


def _launch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    num_tokens: int,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    max_context_len: int,
    num_splits: int | None,
) -> None:
    """One attention launch (and its merge) over the sequences of ``context_lens``; ``num_tokens``
    bounds their tokens (rows ``query_start[0]`` on) and sizes the grid and the split scratch."""
    if num_tokens == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = context_lens.shape[0]
    config = launch_config(head_dim, group, query.dtype, prefill_heavy=num_tokens >= 8 * num_seqs,
                           cache_bytes=key_cache.element_size())
    has_prefill = max_query_len > 1
    tokens_per_tile = config["BLOCK_M"] // group
    num_slots = launch_slots(num_tokens, num_seqs, tokens_per_tile, has_prefill)
    if num_splits is None:
        num_splits = launch_num_splits(config, num_slots * num_kv_heads, max_context_len, query.device,
                                       has_prefill)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    split = num_splits > 1
    if split:  # rows relative to query_start[0]
        partial_out = _empty_partials((num_tokens, num_heads, num_splits, head_dim), query.device)
        partial_lse = _empty_partials((num_tokens, num_heads, num_splits), query.device)
    else:
        partial_out = partial_lse = out  # unused placeholders
    block_d = max(16, triton.next_power_of_2(head_dim))
    window = NO_WINDOW if sliding_window is None else int(sliding_window)
    grid = (num_slots, num_kv_heads, num_splits)
    options = pdl.launch_options(query.device)
    _paged_attention_kernel[grid](
        query, key_cache, value_cache, out, partial_out, partial_lse,
        query_start, context_lens, block_tables,
        num_seqs, num_splits, window, scale * math.log2(math.e),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        *(partial_out.stride()[:3] if split else (0, 0, 0)),
        *(partial_lse.stride()[:2] if split else (0, 0)),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        TOKENS=tokens_per_tile, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_M_DECODE=config["BLOCK_M_DECODE"], BLOCK_N_DECODE=config["BLOCK_N_DECODE"],
        HAS_PREFILL=has_prefill, SPLIT=split,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", SOFTCAP=float(softcap or 0.0),
        F16_DOT=config["fp8_f16_dot"] and key_cache.element_size() == 1 and query.dtype == torch.bfloat16,
        num_warps=config["num_warps_prefill" if has_prefill else "num_warps_decode"],
        num_stages=config["num_stages" if has_prefill else "num_stages_decode"], **options,
    )
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            partial_out, partial_lse, out, query_start, num_seqs, num_splits,
            *partial_out.stride()[:3], *partial_lse.stride()[:2], out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4, **options,
        )
