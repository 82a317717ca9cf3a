"""Start-up work that compiles every kernel variant a step can need.

Graph capture compiles the kernels of the captured steps, but attention in steps with prompt
chunks runs eagerly, and which variant it launches depends on the step: decodes alone or with
chunks, a prefill-heavy or decode-heavy tile config, split keys or not and the merge kernel's split
count (see ``fastgen.kernels.attention_triton``). A variant first met while serving would stall
that step for the seconds Triton takes to compile it. So the runner launches each of them once,
on a few blocks of the real cache, before it serves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgen.kernels.attention_triton import MAX_SPLITS, paged_attention_triton
from fastgen.layers.attention import PagedAttention
from fastgen.plan import PENDING_TOKEN, SamplingOptions, SequenceChunk, SequenceStart, StepPlan

_CONTEXT_BLOCKS = 4  # keys visited by each warm-up launch: a few blocks, enough for every split


def split_counts() -> list[int]:
    """1 (no split) and every power of two up to ``MAX_SPLITS``: the merge kernel is compiled per
    power of two at or above the split count."""
    counts, count = [1], 2
    while count <= MAX_SPLITS:
        counts.append(count)
        count *= 2
    return counts


def _batch_shapes() -> list[tuple[int, int]]:
    """(sequences, query tokens of each) of launches that pick each tile config: decodes alone,
    one prefill-heavy chunk, one short chunk (a decode-heavy launch)."""
    return [(4, 1), (1, 32), (1, 2)]


def warm_up_attention(layers: list[PagedAttention], dtype: torch.dtype) -> int:
    """Launch every attention variant once per distinct layer signature (queries in ``dtype``, the
    model's); returns the number of launches."""
    launches = 0
    seen: set[tuple] = set()
    for layer in layers:
        cache = layer.key_cache
        signature = (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.softcap, cache.dtype)
        if signature in seen or cache.numel() == 0:
            continue
        seen.add(signature)
        for num_seqs, query_len in _batch_shapes():
            for num_splits in split_counts():
                _launch(layer, dtype, num_seqs, query_len, num_splits)
                launches += 1
    if launches and layers[0].key_cache.is_cuda:
        torch.cuda.synchronize(layers[0].key_cache.device)
    return launches


def _launch(
    layer: PagedAttention, dtype: torch.dtype, num_seqs: int, query_len: int, num_splits: int
) -> None:
    cache = layer.key_cache
    device = cache.device
    block_size = cache.shape[1]
    context = max(query_len, _CONTEXT_BLOCKS * block_size)
    blocks_per_seq = -(-context // block_size)
    num_tokens = num_seqs * query_len
    # the query is a view of a fused QKV projection, as in the model (same strides); zeros, not
    # random values: the engine draws nothing from its host's generators
    width = (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim
    fused = torch.zeros(num_tokens, width, device=device, dtype=dtype)
    query = fused[:, : layer.num_heads * layer.head_dim].view(num_tokens, layer.num_heads, layer.head_dim)
    query_start = torch.arange(0, num_tokens + 1, query_len, dtype=torch.int32, device=device)
    context_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
    # any blocks will do (attention only reads them); a small cache repeats its first blocks
    table = torch.arange(blocks_per_seq, dtype=torch.int32, device=device) % cache.shape[0]
    paged_attention_triton(
        query,
        cache,
        layer.value_cache,
        query_start,
        context_lens,
        table.repeat(num_seqs, 1),
        scale=layer.scale,
        sliding_window=layer.sliding_window,
        softcap=layer.softcap,
        max_query_len=query_len,
        max_context_len=context,
        num_decodes=num_seqs if query_len == 1 else 0,
        num_splits=num_splits,
    )


def warm_up_steps(execute: Callable[[StepPlan], object], block_size: int) -> None:
    """One prompt step and one decode step of a greedy and a sampled sequence (with
    log-probabilities), then a decode step of the greedy one alone, through ``execute``, the
    runner's real path: the LM head, the sampler, the greedy argmax and the decode graphs' kernels
    all run once. Sequences 0 and 1 use the first blocks of the cache and are released at the end;
    the KV they leave is overwritten before any later sequence reads it."""
    greedy = SamplingOptions(0.0, 0, 1.0, None, 0, [])
    sampled = SamplingOptions(0.8, 20, 0.9, 1, 0, [], logprobs=2)
    starts = [SequenceStart(0, greedy, 0), SequenceStart(1, sampled, 0)]
    prompt_len = max(2, min(8, block_size - 2))
    per_seq = -(-(prompt_len + 2) // block_size)
    blocks = [list(range(seq_id * per_seq, (seq_id + 1) * per_seq)) for seq_id in (0, 1)]
    prompt = [SequenceChunk(seq_id, [1] * prompt_len, 0, blocks[seq_id], sample=True) for seq_id in (0, 1)]
    execute(StepPlan(0, [], starts, prompt))
    decode = [SequenceChunk(seq_id, [PENDING_TOKEN], prompt_len, [], sample=True) for seq_id in (0, 1)]
    execute(StepPlan(1, [], [], decode))
    # the greedy sequence alone: a batch of plain greedy rows takes the argmax kernel, not the sampler
    execute(StepPlan(2, [], [], [SequenceChunk(0, [PENDING_TOKEN], prompt_len + 1, [], sample=True)]))
    execute(StepPlan(3, [0, 1], [], []))
