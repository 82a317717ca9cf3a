"""Would a prefill attention kernel with tensor-descriptor (TMA) loads close the gap to
FlashAttention-3 on Hopper? A probe, not an engine kernel. GPU only.

The engine's chunk launch gathers keys from the paged cache with ``cp.async`` and waits for every
``wgmma`` at once: the tensor cores idle during each tile's softmax (NOTES-kernels, "Why the prefill
branch is far from FA3"). A fresh prompt's keys and values are still contiguous in the fused QKV
projection's output, so its attention can read them with TMA descriptors, the only loads under which
Triton 3.6 warp-specializes a loop on sm_90 (a CPU compile for sm_90 shows producer/consumer
partitions, ``setmaxnreg``, at 4 warps; only for a kernel of one loop and no early return: a
second loop for the diagonal tiles, or the return of a tile past its prompt, fails in the
compiler, as the first GPU run of this probe found). This times such a kernel (causal, GQA,
variable-length prompts, one program per 128-query tile and head) on fresh prompts against the
engine's paged launch on the same prompts and torch's ``scaled_dot_product_attention`` (its
fastest backend), after checking its output against SDPA's.

    python -m benchmarks.tma_prefill_probe [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fastgen.kernels import attention_triton

from benchmarks.step_profile import kernel_breakdown

HEAD_DIM = 128
BLOCK_SIZE = 16
SHAPES = {"llama3-8b": (32, 8), "llama2-7b": (32, 32)}  # query heads, KV heads


@triton.jit
def _prefill_tma_kernel(
    qkv_ptr, out_ptr, seq_starts_ptr, qk_scale,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    tile, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(seq_starts_ptr + seq)
    length = tl.load(seq_starts_ptr + seq + 1) - start
    # a tile past its prompt reads zeros and its store is clipped; an early return would stop
    # Triton 3.6 from warp-specializing the kernel (an assertion in its task-id propagation)
    start_m = tile * BLOCK_M
    kv_head = head // (HEADS // KV_HEADS)
    row_stride = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    rows = qkv_ptr + start * row_stride
    q_desc = tl.make_tensor_descriptor(rows + head * HEAD_DIM, shape=[length, HEAD_DIM],
                                       strides=[row_stride, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(rows + (HEADS + kv_head) * HEAD_DIM, shape=[length, HEAD_DIM],
                                       strides=[row_stride, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(rows + (HEADS + KV_HEADS + kv_head) * HEAD_DIM,
                                       shape=[length, HEAD_DIM], strides=[row_stride, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(out_ptr + start * HEADS * HEAD_DIM + head * HEAD_DIM,
                                       shape=[length, HEAD_DIM], strides=[HEADS * HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    q = q_desc.load([start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # one loop up to the diagonal, the causal mask on every tile: with a second loop for the
    # diagonal tiles alone, Triton 3.6 cannot warp-specialize the kernel (compiler assertions)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        scores = tl.dot(q, k_desc.load([start_n, 0]).T) * qk_scale
        scores = tl.where(offs_m[:, None] >= offs_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(q.dtype), v_desc.load([start_n, 0]), acc * alpha[:, None])
        m_i = m_new
    o_desc.store([start_m, 0], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty))


def prefill_tma(qkv: torch.Tensor, seq_starts: torch.Tensor, max_len: int, heads: int, kv_heads: int,
                block_m: int, block_n: int, warps: int, stages: int, warp_specialize: bool) -> torch.Tensor:
    """Causal attention of fresh prompts laid out as the fused QKV projection writes them."""
    out = torch.empty(qkv.shape[0], heads * HEAD_DIM, device=qkv.device, dtype=qkv.dtype)
    grid = (triton.cdiv(max_len, block_m), heads, seq_starts.numel() - 1)
    _prefill_tma_kernel[grid](
        qkv, out, seq_starts, HEAD_DIM**-0.5 * 1.4426950408889634, HEADS=heads, KV_HEADS=kv_heads,
        HEAD_DIM=HEAD_DIM, BLOCK_M=block_m, BLOCK_N=block_n, WARP_SPECIALIZE=warp_specialize,
        num_warps=warps, num_stages=stages,
    )
    return out


def sdpa_inputs(qkv: torch.Tensor, lengths: list[int], heads: int, kv_heads: int) -> list[tuple]:
    """Per prompt, [1, heads, tokens, dim] queries, keys and values (GQA: keys and values repeated;
    3-D inputs sent SDPA to its math backend)."""
    inputs = []
    for piece in qkv.split(lengths):
        q, k, v = piece.view(-1, heads + 2 * kv_heads, HEAD_DIM).split([heads, kv_heads, kv_heads], dim=1)
        k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
        inputs.append(tuple(x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v)))  # 4-D: flash
    return inputs


def sdpa(inputs: list[tuple]) -> list[torch.Tensor]:
    """torch's causal attention per prompt."""
    return [F.scaled_dot_product_attention(q, k, v, is_causal=True) for q, k, v in inputs]


def sdpa_rows(outs: list[torch.Tensor]) -> torch.Tensor:
    """SDPA's outputs in the kernel's layout, [tokens, heads * dim]."""
    return torch.cat([o[0].transpose(0, 1).reshape(o.shape[2], -1) for o in outs])


def paged(qkv: torch.Tensor, lengths: list[int], heads: int, kv_heads: int) -> tuple:
    """The engine's launch on the same prompts, their keys and values written to a shuffled cache."""
    device = qkv.device
    q, k, v = qkv.view(-1, heads + 2 * kv_heads, HEAD_DIM).split([heads, kv_heads, kv_heads], dim=1)
    per_seq = [-(-n // BLOCK_SIZE) for n in lengths]
    blocks = sum(per_seq)
    order = torch.randperm(blocks, device=device)
    key_cache = torch.zeros(blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, device=device, dtype=qkv.dtype)
    value_cache = torch.zeros_like(key_cache)
    tables = torch.zeros(len(lengths), max(per_seq), dtype=torch.int32, device=device)
    first_block, first_token = 0, 0
    for i, n in enumerate(lengths):
        ids = order[first_block:first_block + per_seq[i]]
        tables[i, : per_seq[i]] = ids.to(torch.int32)
        slots = (ids[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device)).flatten()[:n]
        key_cache.view(-1, kv_heads, HEAD_DIM)[slots] = k[first_token:first_token + n]
        value_cache.view(-1, kv_heads, HEAD_DIM)[slots] = v[first_token:first_token + n]
        first_block, first_token = first_block + per_seq[i], first_token + n
    args = dict(
        query=q.contiguous(), key_cache=key_cache, value_cache=value_cache,
        query_start=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device),
        context_lens=torch.tensor(lengths, dtype=torch.int32, device=device), block_tables=tables,
        scale=HEAD_DIM**-0.5, max_query_len=max(lengths), max_context_len=max(lengths),
    )  # fmt: skip
    return args


def causal_flops(lengths: list[int], heads: int) -> float:
    return sum(4.0 * heads * HEAD_DIM * n * (n + 1) / 2 for n in lengths)


CONFIGS = ((128, 64, 4, 2, True), (128, 64, 4, 3, True), (128, 128, 4, 2, True), (128, 64, 8, 3, False),
           (128, 128, 8, 2, False))
WORKLOADS = {"1 x 2048": [2048], "1 x 4096": [4096], "3 x 600": [600, 600, 648], "4 x 1200": [1200] * 4}


def device_us(fn) -> float:
    return kernel_breakdown(fn, repeats=10)["kernel_us"]


def measure(shape: str, label: str, lengths: list[int]) -> str:
    """One table row: SDPA, the engine's paged launch and the best TMA config on these prompts."""
    heads, kv_heads = SHAPES[shape]
    width = (heads + 2 * kv_heads) * HEAD_DIM
    qkv = torch.randn(sum(lengths), width, device="cuda", dtype=torch.bfloat16)
    starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    inputs = sdpa_inputs(qkv, lengths, heads, kv_heads)
    expected = sdpa_rows(sdpa(inputs)).float()
    sdpa_us = device_us(partial(sdpa, inputs))
    paged_args = paged(qkv, lengths, heads, kv_heads)
    paged_us = device_us(partial(attention_triton.paged_attention_triton, **paged_args))
    timed, error = [], 0.0
    for config in CONFIGS:
        run = partial(prefill_tma, qkv, starts, max(lengths), heads, kv_heads, *config)
        try:
            error = max(error, (run().float() - expected).abs().max().item())
            timed.append((device_us(run), config))
        except Exception as exc:  # a config the compiler rejects is reported, not fatal
            print(f"{shape} {label} {config}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    print(f"{shape} {label}: " + "; ".join(f"{c}: {us:.0f} us" for us, c in sorted(timed)), flush=True)
    best_us, best = min(timed) if timed else (float("nan"), None)
    flops = causal_flops(lengths, heads)
    cells = [f"{us:.0f} ({flops / us / 1e6:.0f})" for us in (sdpa_us, paged_us, best_us)]
    return f"| {shape} | {label} | {' | '.join(cells)} | {best} | {error:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    torch.manual_seed(0)
    lines = [
        "# Prefill attention with TMA loads (probe) vs the engine's paged launch vs torch SDPA",
        "",
        f"- command: `python -m benchmarks.tma_prefill_probe`; device: {torch.cuda.get_device_name()}; "
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; triton {triton.__version__}, "
        f"torch {torch.__version__}",
        "- device time (profiler) of 10 launches; TFLOP/s counts causal attention; fresh prompts (no "
        "cached prefix); configs m/n/warps/stages/warp-specialize",
        "",
        "| shape | prompts | SDPA us (TFLOP/s) | engine paged us (TFLOP/s) | TMA best us (TFLOP/s) "
        "| TMA config | max err |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, (label, lengths) in itertools.product(SHAPES, WORKLOADS.items()):
        lines.append(measure(shape, label, lengths))
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"tma_prefill_probe-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.md").write_text(text)


if __name__ == "__main__":
    main()
