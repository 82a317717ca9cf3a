"""Sampling from a batch of logits with per-row parameters.

Per row ``r``: ``temperature[r] == 0`` means greedy (argmax of the raw logits). Otherwise the
logits are divided by the temperature, restricted to the ``top_k[r]`` largest (0 = no limit),
then to the smallest set whose probability reaches ``top_p[r]`` (1.0 = no limit), and one token is
drawn by the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``: the same distribution as a
multinomial draw, in one pass. ``E`` is a deterministic function of ``seeds[r]`` alone, so a row's
draw never depends on what else is in the batch.

The Triton sampler keeps these semantics without sorting. One program per row reads the row a few
times: pass 0 finds the maximum (greedy rows stop there; rows without top-k/top-p also run the race
in it). Filtered rows then search for the cutoff logit (every token at or above it is kept). Top-k's
cutoff is the largest ``t`` with ``count(logit >= t) >= k``; top-p's is the largest ``t`` with
``mass(logit >= t) >= top_p * mass(kept by top-k)``: the same search with weights ``exp(logit/T)``
instead of 1. Each pass splits the current interval of candidate cutoffs, as order-preserving int32
keys of the float logits, into ``NUM_BUCKETS`` parts (evenly spaced in value, or in key space
after a pass that made no progress), sums the weights at or above each part's start and records
the nearest actual keys on both sides of each start; the next interval is the part holding the
cutoff, shrunk to the keys really in it. It ends when the interval holds a single key: that key is
the exact cutoff, ties included (usually 3-6 passes per search on real logits; key-space parts
alone would bound it by ``ceil(32 / log2(NUM_BUCKETS))``). A last pass runs the race over the kept
tokens. Only the per-row seeds decide the draw: it never depends on the batch.

Its noise is Triton's Philox (``tl.rand(seeds[r], token_id)``), so it draws other numbers than the
reference for the same seed, from the same distribution; the tests compare the two statistically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton


def _exponential_noise(seeds: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    noise = torch.empty(len(seeds), vocab_size, device=device)
    generator = torch.Generator(device=device)
    for row, seed in enumerate(seeds):
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        noise[row].exponential_(generator=generator)
    return noise


def filter_logits_reference(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Float32 logits after temperature, top-k and top-p (removed entries are ``-inf``)."""
    scaled = logits.float() / temperature.float().clamp_min(1e-6)[:, None]
    vocab_size = scaled.shape[-1]
    sorted_logits, _ = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.long().clamp(max=vocab_size), vocab_size)
    kth_value = sorted_logits.gather(1, (k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth_value, float("-inf"))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # top_p >= 1 keeps everything (float32 cumsum rounding would otherwise drop a far tail)
    keep = (mass_before < top_p.float()[:, None]) | (top_p >= 1.0)[:, None]
    keep[:, 0] = True
    # the smallest kept logit is the threshold: everything at or above it stays
    cutoff = sorted_logits.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
    return scaled.masked_fill(scaled < cutoff, float("-inf"))


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Sampled token ids (int64 ``[batch]``) for ``logits`` ``[batch, vocab]``."""
    tokens = logits.argmax(dim=-1)
    sampled_rows = (temperature > 0).nonzero().flatten()
    if sampled_rows.numel() == 0:
        return tokens
    rows = sampled_rows
    filtered = filter_logits_reference(logits[rows], temperature[rows], top_k[rows], top_p[rows])
    probs = torch.softmax(filtered, dim=-1)
    noise = _exponential_noise(seeds[rows].tolist(), logits.shape[-1], logits.device)
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens


NUM_BUCKETS = 8
BLOCK_VOCAB = 4096  # pass 0 and the race
BLOCK_SEARCH = 512  # search passes: [BLOCK_SEARCH, NUM_BUCKETS] accumulators live in registers
SEARCH_UNROLL = 8  # search blocks loaded per loop iteration
NUM_WARPS = 16  # one program per row: many warps keep enough loads in flight
MAX_SEARCH_PASSES = 48  # a guard: key-space passes alone finish within 2 x ceil(32 / log2(8)) + slack


@triton.jit
def _race_update(x, cols, mask, inv_temperature, seed, lane_best, lane_index, keep_from):
    """Per-lane exponential race ``argmax(logit/T - log(E))`` over tokens with key >= keep_from."""
    noise = -tl.log(-tl.log(tl.rand(seed, cols)))  # Gumbel(0, 1) = -log(Exp(1))
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    keep = mask & (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) >= keep_from)
    score = tl.where(keep, x * inv_temperature + noise, float("-inf"))
    better = score > lane_best  # strict: each lane keeps its first best token
    return tl.where(better, score, lane_best), tl.where(better, cols, lane_index)


@triton.jit(do_not_specialize=["vocab_size", "stride_row"])
def _sample_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, seeds_ptr, out_ptr, cutoff_ptr,
    vocab_size, stride_row,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, UNROLL: tl.constexpr, NUM_BUCKETS: tl.constexpr,
    MAX_PASSES: tl.constexpr, WRITE_CUTOFF: tl.constexpr,
):
    """One row per program: greedy, or temperature + top-k + top-p + exponential race.

    Loops keep per-lane partial results and reduce once at the end of each pass (a cross-warp
    reduction per block would cost more than the block's arithmetic).
    """
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row).to(tl.float32)
    top_k = tl.load(top_k_ptr + row).to(tl.int32)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    seed = tl.load(seeds_ptr + row).to(tl.int64)
    sampled = temperature > 0.0  # NaN or <= 0: greedy, as in the reference
    use_top_k = (top_k > 0) & (top_k < vocab_size)
    use_top_p = top_p < 1.0
    filtered = sampled & (use_top_k | use_top_p)
    race_in_first_pass = sampled & (filtered == 0)
    inv_temperature = 1.0 / tl.maximum(temperature, 1e-6)
    int_max = 2147483647
    int_min = -2147483648

    # pass 0: maximum and its first index, smallest key, and the race when nothing is filtered
    offs = tl.arange(0, BLOCK_V)
    lane_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    lane_max_index = tl.zeros([BLOCK_V], dtype=tl.int32)
    lane_min_key = tl.full([BLOCK_V], int_max, dtype=tl.int32)
    lane_race = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    lane_race_index = tl.zeros([BLOCK_V], dtype=tl.int32)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + offs
        mask = cols < vocab_size
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        better = x > lane_max
        lane_max_index = tl.where(better, cols, lane_max_index)
        lane_max = tl.where(better, x, lane_max)
        bits = (x + 0.0).to(tl.int32, bitcast=True)  # order key: int32 with the floats' order
        lane_min_key = tl.minimum(lane_min_key, tl.where(mask, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF),
                                                         int_max))
        if race_in_first_pass:
            lane_race, lane_race_index = _race_update(x, cols, mask, inv_temperature, seed, lane_race,
                                                      lane_race_index, int_min)
    max_logit = tl.max(lane_max, axis=0)
    max_index = tl.min(tl.where(lane_max == max_logit, lane_max_index, int_max), axis=0)
    min_key = tl.min(lane_min_key, axis=0)

    # cutoff search: first top-k (weights 1), then top-p (weights exp((x - max) / T))
    buckets = tl.arange(0, NUM_BUCKETS)
    offs_s = tl.arange(0, BLOCK_S)
    max_bits = (max_logit + 0.0).to(tl.int32, bitcast=True)
    max_key = tl.where(max_bits >= 0, max_bits, max_bits ^ 0x7FFFFFFF)
    lo = tl.where(filtered, min_key, max_key)
    hi = max_key
    mass_phase = use_top_k == 0
    first_mass_pass = mass_phase
    stalled = lo != lo  # False
    target = top_k.to(tl.float32)
    exp_scale = inv_temperature * 1.4426950408889634
    passes = 0
    while (lo < hi) & (passes < MAX_PASSES):
        # thresholds: evenly spaced in value (fast on real logits); evenly spaced in key space
        # (always shrinks the interval) after a pass that made no progress or on overflow
        lo_bits = tl.where(lo >= 0, lo, lo ^ 0x7FFFFFFF)
        hi_bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
        lo_value = lo_bits.to(tl.float32, bitcast=True)
        span = hi_bits.to(tl.float32, bitcast=True) - lo_value
        use_keys = stalled | (span == float("inf"))
        span = tl.where(span == float("inf"), 0.0, span)
        value_bits = (lo_value + span * (buckets.to(tl.float32) / NUM_BUCKETS) + 0.0).to(tl.int32,
                                                                                         bitcast=True)
        value_keys = tl.minimum(tl.maximum(tl.where(value_bits >= 0, value_bits, value_bits ^ 0x7FFFFFFF),
                                           lo), hi)
        width = hi.to(tl.int64) - lo.to(tl.int64) + 1
        even_keys = (lo.to(tl.int64) + (buckets.to(tl.int64) * width) // NUM_BUCKETS).to(tl.int32)
        thresholds = tl.where(use_keys | (buckets == 0), even_keys, value_keys)

        lane_weight = tl.zeros([BLOCK_S, NUM_BUCKETS], dtype=tl.float32)
        lane_key_above = tl.full([BLOCK_S, NUM_BUCKETS], int_max, dtype=tl.int32)
        lane_key_below = tl.full([BLOCK_S, NUM_BUCKETS], int_min, dtype=tl.int32)
        # UNROLL blocks per iteration, one basic block: their loads can all be in flight together
        for start in range(0, vocab_size, BLOCK_S * UNROLL):
            for part in tl.static_range(UNROLL):
                cols = start + part * BLOCK_S + offs_s
                mask = cols < vocab_size
                x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                bits = (x + 0.0).to(tl.int32, bitcast=True)
                key = tl.where(mask, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF), int_min)
                weight = tl.where(mass_phase, tl.exp2((x - max_logit) * exp_scale), tl.where(mask, 1.0, 0.0))
                at_or_above = key[:, None] >= thresholds[None, :]
                lane_weight += tl.where(at_or_above, weight[:, None], 0.0)
                lane_key_above = tl.minimum(lane_key_above, tl.where(at_or_above, key[:, None], int_max))
                lane_key_below = tl.maximum(lane_key_below, tl.where(at_or_above, int_min, key[:, None]))
        weight_at_or_above = tl.sum(lane_weight, axis=0)
        key_at_or_above = tl.min(lane_key_above, axis=0)
        key_below = tl.max(lane_key_below, axis=0)
        if first_mass_pass:
            # top_p x the mass kept by top-k
            target = top_p * tl.sum(tl.where(buckets == 0, weight_at_or_above, 0.0), axis=0)
        # the part holding the cutoff: the last start with enough weight at or above it
        chosen = tl.maximum(tl.sum((weight_at_or_above >= target).to(tl.int32), axis=0) - 1, 0)
        new_lo = tl.sum(tl.where(buckets == chosen, key_at_or_above, 0), axis=0)
        next_below = tl.sum(tl.where(buckets == chosen + 1, key_below, 0), axis=0)
        new_hi = tl.where(chosen < NUM_BUCKETS - 1, next_below, hi)
        stalled = (new_lo == lo) & (new_hi == hi)
        lo = new_lo
        hi = new_hi
        to_top_p = (lo >= hi) & (mass_phase == 0) & use_top_p
        hi = tl.where(to_top_p, max_key, hi)
        stalled = stalled & (to_top_p == 0)
        mass_phase = mass_phase | to_top_p
        first_mass_pass = to_top_p
        passes += 1
    cutoff = tl.where(filtered, lo, int_min)  # int_min: nothing filtered

    if WRITE_CUTOFF:
        tl.store(cutoff_ptr + row, cutoff)
    if sampled == 0:
        tl.store(out_ptr + row, max_index.to(tl.int64))
    else:
        if filtered:
            for start in range(0, vocab_size, BLOCK_V):
                cols = start + offs
                mask = cols < vocab_size
                x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                lane_race, lane_race_index = _race_update(x, cols, mask, inv_temperature, seed, lane_race,
                                                          lane_race_index, cutoff)
        race_best = tl.max(lane_race, axis=0)
        race_index = tl.min(tl.where(lane_race == race_best, lane_race_index, int_max), axis=0)
        tl.store(out_ptr + row, race_index.to(tl.int64))


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """The kernel's int32 order keys of float logits (tests use them to read ``cutoffs``)."""
    bits = (x.float() + 0.0).view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    *,
    cutoffs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton sampler, one program per row. ``cutoffs`` (int32 ``[batch]``, optional) receives each
    row's cutoff key (see ``order_keys``): kept tokens have ``order_keys(logits) >= cutoff``."""
    batch, vocab_size = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return tokens
    block_search = min(BLOCK_SEARCH, triton.next_power_of_2(vocab_size))
    _sample_kernel[(batch,)](
        logits, temperature, top_k, top_p, seeds, tokens, tokens if cutoffs is None else cutoffs,
        vocab_size, logits.stride(0),
        BLOCK_V=min(BLOCK_VOCAB, triton.next_power_of_2(vocab_size)), BLOCK_S=block_search,
        UNROLL=min(SEARCH_UNROLL, triton.cdiv(vocab_size, block_search)), NUM_BUCKETS=NUM_BUCKETS,
        MAX_PASSES=MAX_SEARCH_PASSES, WRITE_CUTOFF=cutoffs is not None, num_warps=NUM_WARPS,
    )
    return tokens


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Sample one token per row (Triton on CUDA, reference elsewhere)."""
    impl = sample_triton if use_triton(logits) else sample_reference
    return impl(logits, temperature, top_k, top_p, seeds)
