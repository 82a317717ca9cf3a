"""Kernel benchmarks (GPU machine): achieved GB/s and TFLOP/s of each Triton kernel next to the
machine's ceilings measured in the same run and a PyTorch peer.

    python benchmarks/kernel_timings.py            # all cases
    python benchmarks/kernel_timings.py --only decode,prefill

Ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul.
Peers: torch SDPA (flash backend) for prefill; gather-then-SDPA for paged decode; torch eager
(the references) for norms, rotary, activations and the cache write; a sort-based torch sampler.
Bytes are the fewest a kernel must move (each input read once, each output written once).
Times are medians of ``triton.testing.do_bench`` (which also flushes L2 before every call), on
random inputs; inputs smaller than twice the L2 are rotated among several copies.
Writes a table to stdout and JSON + markdown to benchmarks/results/kernels-<device>-<date>.*
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from fastgen.kernels import activation, attention_triton, cache, gemv, moe, norm, quant, rotary, sampling
from fastgen.kernels.attention import paged_attention_reference
from tqdm import tqdm

DTYPE = torch.bfloat16
GOALS = {  # case -> (metric, threshold): fraction of copy bandwidth or of the peer's throughput
    "decode llama2-7b 64x2048": ("copy", 0.75),
    "prefill 4096 causal llama2-7b": ("peer", 0.60),
    "rms_norm 8192x4096": ("copy", 0.80),
    "rms_norm+residual 8192x4096": ("copy", 0.80),
    "layer_norm+residual 8192x4096": ("copy", 0.80),
    "rotary q+k 8192x32x128": ("copy", 0.80),
    "silu_and_mul 8192x4096": ("copy", 0.80),
    "gelu(tanh) 8192x4096": ("copy", 0.80),
    "gelu(erf) 8192x4096": ("copy", 0.80),
}


@dataclass
class Row:
    case: str
    impl: str
    time_us: float
    gb_per_s: float | None
    tflop_per_s: float | None
    of_copy: float | None = None
    of_matmul: float | None = None
    of_peer: float | None = None
    goal: str = ""


def median_us(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` in microseconds (warm-up and L2 flush by do_bench)."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3


def rotating(make: Callable[[], tuple], bytes_each: int) -> Callable[[], tuple]:
    """A getter cycling through enough copies of ``make()`` to exceed twice the L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    copies = max(1, min(8, math.ceil(2 * l2 / max(bytes_each, 1))))
    sets = [make() for _ in range(copies)]
    state = {"i": 0}

    def next_set() -> tuple:
        state["i"] = (state["i"] + 1) % copies
        return sets[state["i"]]

    return next_set


class Bench:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.copy_gbps = 0.0
        self.matmul_tflops = 0.0

    def add(self, case: str, impl: str, time_us: float, num_bytes: float | None, flops: float | None,
            peer_us: float | None = None) -> Row:
        gbps = num_bytes / time_us / 1e3 if num_bytes else None
        tflops = flops / time_us / 1e6 if flops else None
        row = Row(case, impl, time_us, gbps, tflops)
        if gbps and self.copy_gbps:
            row.of_copy = gbps / self.copy_gbps
        if tflops and self.matmul_tflops:
            row.of_matmul = tflops / self.matmul_tflops
        if peer_us:
            row.of_peer = peer_us / time_us
        if impl == "triton" and case in GOALS:
            metric, threshold = GOALS[case]
            value = row.of_copy if metric == "copy" else row.of_peer
            if value is not None:
                verdict = "PASS" if value >= threshold else "MISS"
                row.goal = f"{verdict} (>= {threshold:.0%} of {metric})"
        self.rows.append(row)
        return row

    def pair(self, case: str, triton_fn: Callable[[], object], peer_name: str,
             peer_fn: Callable[[], object] | None, num_bytes: float | None, flops: float | None) -> None:
        peer_us = median_us(peer_fn) if peer_fn is not None else None
        self.add(case, "triton", median_us(triton_fn), num_bytes, flops, peer_us)
        if peer_us is not None:
            self.add(case, peer_name, peer_us, num_bytes, flops)


# ---------------------------------------------------------------- ceilings


def copy_ceiling(bench: Bench) -> None:
    source = torch.randn(1 << 29, dtype=DTYPE, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    copy_us = median_us(lambda: target.copy_(source))
    bench.copy_gbps = 2 * source.numel() * 2 / copy_us / 1e3
    bench.add("ceiling: device copy 1 GiB", "torch", copy_us, 2 * source.numel() * 2, None)


def ceilings(bench: Bench) -> None:
    copy_ceiling(bench)
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    matmul_us = median_us(lambda: a @ b)
    bench.matmul_tflops = 2 * 8192**3 / matmul_us / 1e6
    bench.add("ceiling: bf16 matmul 8192^3", "torch", matmul_us, None, 2 * 8192**3)


# ---------------------------------------------------------------- attention


def paged_batch(specs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int = 16) -> dict[str, torch.Tensor]:
    """Ragged batch with shuffled block tables; ``specs`` = (query_len, context_len) per sequence."""
    blocks = [math.ceil(c / block_size) for _, c in specs]
    num_blocks = sum(blocks)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=DTYPE, device="cuda")
    value_cache = torch.randn_like(key_cache)
    order = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    block_tables = torch.zeros(len(specs), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for seq, count in enumerate(blocks):
        block_tables[seq, :count] = order[used:used + count]
        used += count
    lens = torch.tensor([q for q, _ in specs], device="cuda")
    query_start = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    return {
        "query": torch.randn(int(lens.sum()), num_heads, head_dim, dtype=DTYPE, device="cuda"),
        "key_cache": key_cache, "value_cache": value_cache, "query_start": query_start,
        "context_lens": torch.tensor([c for _, c in specs], dtype=torch.int32, device="cuda"),
        "block_tables": block_tables,
    }


def kv_bytes(specs: list[tuple[int, int]], num_kv_heads: int, head_dim: int) -> int:
    return sum(c for _, c in specs) * num_kv_heads * head_dim * 2 * 2


def attention_call(batch: dict, specs: list[tuple[int, int]], **extra) -> Callable[[], object]:
    head_dim = batch["query"].shape[-1]
    out = torch.empty_like(batch["query"])
    maxima = {"max_query_len": max(q for q, _ in specs), "max_context_len": max(c for _, c in specs)}
    return lambda: attention_triton.paged_attention_triton(
        **batch, scale=head_dim**-0.5, out=out, **maxima, **extra)


def check_attention(batch: dict, call: Callable[[], object], seqs: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """Spot-check the benchmarked launch against the reference on a few sequences (those of ``seqs``
    that exist)."""
    out = call()
    starts = batch["query_start"].tolist()
    seqs = [s for s in seqs if s < len(batch["context_lens"])]
    rows = torch.cat([torch.arange(starts[s], starts[s + 1], device="cuda") for s in seqs])
    lens = torch.tensor([0] + [starts[s + 1] - starts[s] for s in seqs], device="cuda")
    small = dict(batch, query=batch["query"][rows], query_start=lens.cumsum(0).to(torch.int32),
                 context_lens=batch["context_lens"][seqs], block_tables=batch["block_tables"][seqs])
    expected = paged_attention_reference(**small, scale=batch["query"].shape[-1] ** -0.5)
    error = (out[rows].float() - expected.float()).norm() / expected.float().norm()
    if not error < 1e-2:
        raise AssertionError(f"attention benchmark output is wrong: relative error {error:.3g}")


def gather_sdpa(batch: dict, specs: list[tuple[int, int]]) -> Callable[[], object]:
    """Peer for decode: gather each sequence's K/V out of the paged cache, then SDPA."""
    context = specs[0][1]
    num_seqs = len(specs)
    num_heads = batch["query"].shape[1]
    num_kv_heads, head_dim = batch["key_cache"].shape[2], batch["key_cache"].shape[3]
    query = batch["query"].view(num_seqs, 1, num_heads, head_dim).transpose(1, 2)

    def run() -> torch.Tensor:
        keys = batch["key_cache"][batch["block_tables"]].view(num_seqs, -1, num_kv_heads, head_dim)
        values = batch["value_cache"][batch["block_tables"]].view(num_seqs, -1, num_kv_heads, head_dim)
        keys, values = keys[:, :context].transpose(1, 2), values[:, :context].transpose(1, 2)
        return F.scaled_dot_product_attention(query, keys, values, enable_gqa=num_kv_heads != num_heads)

    return run


def decode_cases(bench: Bench) -> None:
    for name, num_heads, num_kv_heads in (("llama2-7b", 32, 32), ("llama3-8b", 32, 8)):
        specs = [(1, 2048)] * 64
        batch = paged_batch(specs, num_heads, num_kv_heads, 128)
        call = attention_call(batch, specs)
        check_attention(batch, call)
        bench.pair(f"decode {name} 64x2048", call, "gather+sdpa", gather_sdpa(batch, specs),
                   kv_bytes(specs, num_kv_heads, 128), 4 * 64 * 2048 * num_heads * 128)
        # the same with an FP8 cache (kv_cache_dtype="fp8"): half the bytes to read
        batch["key_cache"] = batch["key_cache"].to(torch.float8_e4m3fn)
        batch["value_cache"] = batch["value_cache"].to(torch.float8_e4m3fn)
        bench.add(f"decode {name} 64x2048, fp8 cache", "triton", median_us(attention_call(batch, specs)),
                  kv_bytes(specs, num_kv_heads, 128) // 2, 4 * 64 * 2048 * num_heads * 128)
        del batch
    specs = [(1, 32768)] * 4
    batch = paged_batch(specs, 32, 8, 128)
    call = attention_call(batch, specs)
    check_attention(batch, call)
    bench.pair("decode llama3-8b 4x32768 (split-KV)", call, "triton 1 split",
               attention_call(batch, specs, num_splits=1), kv_bytes(specs, 8, 128),
               4 * 4 * 32768 * 32 * 128)


def prefill_cases(bench: Bench) -> None:
    length, num_heads, head_dim = 4096, 32, 128
    specs = [(length, length)]
    batch = paged_batch(specs, num_heads, num_heads, head_dim)
    call = attention_call(batch, specs)
    check_attention(batch, call)
    q = torch.randn(1, num_heads, length, head_dim, dtype=DTYPE, device="cuda")
    k, v = torch.randn_like(q), torch.randn_like(q)

    def flash() -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    causal_flops = 2 * length * length * head_dim * num_heads  # 4 S^2 D H, halved by the mask
    bench.pair("prefill 4096 causal llama2-7b", call, "sdpa flash", flash,
               kv_bytes(specs, num_heads, head_dim), causal_flops)
    del batch
    # a Dynamic SplitFuse step: 256 decodes (context 1024) + a 512-token chunk after 1536 tokens
    specs = [(1, 1024)] * 256 + [(512, 2048)]
    batch = paged_batch(specs, 32, 8, 128)
    call = attention_call(batch, specs)
    check_attention(batch, call)
    flops = 4 * 32 * 128 * (256 * 1024 + 512 * (1536 + 256))
    bench.pair("mixed step 256 decodes + 512 chunk (llama3-8b)", call, "", None,
               kv_bytes(specs, 8, 128), flops)
    del batch
    # decodes and a chunk as two launches (num_decodes) against one mixed launch. H100, before the
    # split path: mixed 971 us vs decodes alone 662 + chunk alone 173; with it (2026-11-23): 686 vs 881
    specs = [(1, 1300)] * 80 + [(688, 1288)]
    batch = paged_batch(specs, 32, 32, 128)
    split = attention_call(batch, specs, num_decodes=80)
    mixed = attention_call(batch, specs, num_decodes=0)
    for call in (split, mixed):
        check_attention(batch, call, seqs=(0, 1, 79, 80))
    flops = 4 * 32 * 128 * (80 * 1300 + 688 * (600 + 344))
    bench.pair("mixed step llama2-7b: 80 decodes x 1300 + chunk 688", split, "triton one launch", mixed,
               kv_bytes(specs, 32, 128), flops)


# ---------------------------------------------------------------- elementwise


def elementwise_cases(bench: Bench) -> None:
    tokens, hidden = 8192, 4096
    size = tokens * hidden * 2  # bytes of one bf16 [8192, 4096] tensor
    x = torch.randn(tokens, hidden, dtype=DTYPE, device="cuda")
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, dtype=DTYPE, device="cuda")
    bias = torch.randn(hidden, dtype=DTYPE, device="cuda")
    bench.pair("rms_norm 8192x4096", lambda: norm.rms_norm_triton(x, weight, 1e-6), "torch eager",
               lambda: norm.rms_norm_reference(x, weight, 1e-6), 2 * size, None)
    bench.pair("rms_norm+residual 8192x4096", lambda: norm.rms_norm_triton(x, weight, 1e-6, residual),
               "torch eager", lambda: norm.rms_norm_reference(x, weight, 1e-6, residual), 4 * size, None)
    bench.pair("layer_norm+residual 8192x4096",
               lambda: norm.layer_norm_triton(x, weight, bias, 1e-5, residual), "torch eager",
               lambda: norm.layer_norm_reference(x, weight, bias, 1e-5, residual), 4 * size, None)

    query = torch.randn(tokens, 32, 128, dtype=DTYPE, device="cuda")
    key = torch.randn_like(query)
    angles = torch.rand(8192, 64, device="cuda") * 6.3
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    rotary_bytes = 4 * size + tokens * 128 * 4
    bench.pair("rotary q+k 8192x32x128",
               lambda: rotary.apply_rotary_triton(positions, query, key, cos_sin_cache, 128),
               "torch eager",
               lambda: rotary.apply_rotary_reference(positions, query, key, cos_sin_cache, 128),
               rotary_bytes, None)

    gate_up = torch.randn(tokens, 2 * hidden, dtype=DTYPE, device="cuda")
    bench.pair("silu_and_mul 8192x4096", lambda: activation.silu_and_mul_triton(gate_up), "torch eager",
               lambda: activation.silu_and_mul_reference(gate_up), 3 * size, None)
    for approximate, label in (("tanh", "gelu(tanh)"), ("none", "gelu(erf)")):
        bench.pair(f"{label} 8192x4096", lambda a=approximate: activation.gelu_triton(x, a), "torch eager",
                   lambda a=approximate: activation.gelu_reference(x, a), 2 * size, None)

    key_cache = torch.randn(tokens * 2 // 16, 16, 32, 128, dtype=DTYPE, device="cuda")
    value_cache = torch.randn_like(key_cache)
    slot_mapping = torch.randperm(tokens * 2, device="cuda")[:tokens]
    bench.pair("write_kv_cache 8192x32x128",
               lambda: cache.write_kv_cache_triton(query, key, key_cache, value_cache, slot_mapping),
               "torch eager",
               lambda: cache.write_kv_cache_reference(query, key, key_cache, value_cache, slot_mapping),
               4 * size, None)


# ---------------------------------------------------------------- sampling


def torch_sampler(logits, temperature, top_k, top_p, seeds) -> torch.Tensor:
    """Peer: the reference's sort-based filter, one batch-wide noise draw (no per-row seeds)."""
    probs = torch.softmax(sampling.filter_logits_reference(logits, temperature, top_k, top_p), dim=-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


def sampling_cases(bench: Bench) -> None:
    vocab_size = 128256
    cases = ((64, 50, 0.9, "top-k 50 + top-p 0.9"), (64, 0, 0.95, "top-p 0.95"),
             (64, 0, 1.0, "temperature only"), (256, 50, 0.9, "top-k 50 + top-p 0.9"))
    for batch, top_k, top_p, label in cases:
        def make(batch=batch, top_k=top_k, top_p=top_p) -> tuple:
            logits = torch.randn(batch, vocab_size, device="cuda") * 3
            return (logits, torch.full((batch,), 0.8, device="cuda"),
                    torch.full((batch,), top_k, dtype=torch.int32, device="cuda"),
                    torch.full((batch,), top_p, device="cuda"),
                    torch.randint(0, 2**62, (batch,), device="cuda"))

        inputs = rotating(make, batch * vocab_size * 4)
        bench.pair(f"sample {batch}x{vocab_size} fp32, {label}",
                   lambda i=inputs: sampling.sample_triton(*i()), "torch sort",
                   lambda i=inputs: torch_sampler(*i()), batch * vocab_size * 4, None)


# ---------------------------------------------------------------- mixture of experts


def moe_cases(bench: Bench) -> None:
    """One Mixtral-8x7B layer's experts (8 experts, top-2, hidden 4096, intermediate 14336): decode
    batches read the experts their tokens pick (bandwidth), a prefill chunk does 2 x 3 matmuls per
    token (compute). Peer: the reference's loop over experts (cuBLAS per expert)."""
    num_experts, hidden, inner, top_k = 8, 4096, 14336, 2
    w13 = torch.randn(num_experts, 2 * inner, hidden, dtype=DTYPE, device="cuda") * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inner, dtype=DTYPE, device="cuda") * inner**-0.5
    expert_bytes = 3 * inner * hidden * 2
    for tokens in (1, 8, 64, 768):
        x = torch.randn(tokens, hidden, dtype=DTYPE, device="cuda")
        probabilities = torch.softmax(torch.randn(tokens, num_experts, device="cuda"), dim=-1)
        weights, ids = probabilities.topk(top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(DTYPE)
        touched = len(ids.unique())
        flops = 2 * tokens * top_k * 3 * inner * hidden
        bench.pair(f"moe 8x(4096,14336) top-2, {tokens} tokens ({touched} experts)",
                   lambda x=x, w=weights, i=ids: moe.fused_moe_triton(x, w, i, w13, w2), "expert loop",
                   lambda x=x, w=weights, i=ids: moe.fused_moe_reference(x, w, i, w13, w2),
                   touched * expert_bytes, flops)


# ---------------------------------------------------------------- tuning variants


def quantize_case(bench: Bench, rows: int, k: int) -> None:
    get = rotating(lambda: (torch.randn(rows, k, dtype=DTYPE, device="cuda"),), rows * k * 2)
    bench.pair(f"fp8 quantize rows {rows}x{k}", lambda: quant.quantize_rows_triton(*get()), "torch",
               lambda: quant.quantize_rows_reference(*get()), rows * k * 3, None)


def fp8_cases(bench: Bench) -> None:
    """Per-row FP8 quantization of activations (Triton vs the torch spelling), and a Llama-2-7B
    gate_up product at decode (M = 1): FP8 weights in the small-batch kernel (W8A16) against bf16
    weights in it and against ``torch._scaled_mm`` (W8A8, activation quantized first). The FP8
    GEMV tile sweep is in ``--only variants``."""
    for rows, k in ((768, 4096), (768, 11008)):
        quantize_case(bench, rows, k)
    n, k = 22016, 4096
    get = rotating(lambda: fp8_weights(n, k), n * k * 3)
    x = torch.randn(1, k, dtype=DTYPE, device="cuda")
    case = f"gate_up {n}x{k} M=1"

    def fp8_rule():
        weight, scale, _ = get()
        return gemv.linear_small_batch_triton(x, weight, None, None, scale)

    bench.add(f"{case}, fp8 weights", "triton", median_us(fp8_rule), n * k, None)
    bench.add(f"{case}, bf16 weights", "triton", median_us(
        lambda: gemv.linear_small_batch_triton(x, get()[2])), n * k * 2, None)

    def scaled_mm():
        weight, scale, _ = get()
        xq, xs = quant.quantize_rows_triton(x)
        return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.t(), out_dtype=DTYPE)

    bench.add(f"{case}, fp8 weights", "_scaled_mm", median_us(scaled_mm), n * k, None)


def fp8_weights(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8 weight, its row scales, the bf16 weight it was quantized from)."""
    weight = torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.02
    q, scale = quant.quantize_rows_reference(weight)
    return q, scale, weight


def fp8_tile_cases(bench: Bench, n: int, k: int) -> None:
    """FP8-weight GEMV tiles at M = 1 and 8 against the rule (which doubles the bf16 BLOCK_K)."""
    get = rotating(lambda: fp8_weights(n, k), n * k * 3)

    def product(x: torch.Tensor, config: gemv.GemvConfig) -> torch.Tensor:
        weight, scale, _ = get()
        return gemv.linear_small_batch_with_config(x, weight, None, None, config, scale)

    tiles = {  # (use_dot, BLOCK_N, BLOCK_K, warps)
        1: ((False, 16, 512, 4), (False, 8, 1024, 4), (True, 64, 256, 4), (True, 32, 512, 4)),
        8: ((True, 64, 256, 4), (True, 64, 128, 4), (True, 128, 256, 8), (False, 4, 512, 4)),
    }
    for m, choices in tiles.items():
        x = torch.randn(m, k, dtype=DTYPE, device="cuda")
        rule = gemv.choose_config(m, n, k, weight_bytes=1)
        for use_dot, block_n, block_k, warps in choices:
            for split in sorted({rule.split_k, 1, 2}):
                config = gemv.GemvConfig(block_n=block_n, block_k=block_k, split_k=split, use_dot=use_dot,
                                         num_warps=warps)
                path = "dot" if use_dot else "fma"
                label = (f"variant: fp8 gemv {n}x{k} M={m} {path} {block_n}x{block_k} w{warps} "
                         f"split {split}{' (rule)' if config == rule else ''}")
                bench.add(label, "triton", median_us(lambda c=config, x=x: product(x, c)), n * k, None)


def with_config(change: dict[str, int], fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under attention launch configs patched with ``change``."""
    original = attention_triton.launch_config

    def patched(*args, **kwargs) -> dict[str, int]:
        return {**original(*args, **kwargs), **change}

    def run() -> object:
        attention_triton.launch_config = patched
        try:
            return fn()
        finally:
            attention_triton.launch_config = original

    return run


def variant_cases(bench: Bench) -> None:
    """Alternatives to the defaults, timed side by side (``--only variants``)."""
    specs = [(1, 2048)] * 64
    batch = paged_batch(specs, 32, 8, 128)
    for splits in (1, 2, 4):
        bench.add(f"variant: decode llama3-8b 64x2048, {splits} splits", "triton",
                  median_us(attention_call(batch, specs, num_splits=splits)), kv_bytes(specs, 8, 128), None)
    del batch
    run1 = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps_prefill": 8}  # the first version's tiles
    specs = [(1, 1024)] * 256 + [(512, 2048)]
    batch = paged_batch(specs, 32, 8, 128)
    call = attention_call(batch, specs)
    bench.add("variant: mixed step, run-1 tiles (128x64, 8 warps)", "triton",
              median_us(with_config(run1, call)), kv_bytes(specs, 8, 128), None)
    del batch
    specs = [(4096, 4096)]
    batch = paged_batch(specs, 32, 32, 128)
    call = attention_call(batch, specs)
    flops = 2 * 4096 * 4096 * 128 * 32
    bench.add("variant: prefill 4096, run-1 tiles (128x64, 8 warps)", "triton",
              median_us(with_config(run1, call)), None, flops)
    bench.add("variant: prefill 4096, 64x128 tiles, 4 warps", "triton",
              median_us(with_config({"BLOCK_M": 64, "num_warps_prefill": 4}, call)), None, flops)
    del batch
    # the chunk launch of an offline (1200, 128) step: a 688-token chunk at context 1288, alone
    # (as the two-launch path runs it); 6 tiles x 32 heads is ~1.5 programs per SM at 128 rows
    specs = [(688, 1288)]
    batch = paged_batch(specs, 32, 32, 128)
    call = attention_call(batch, specs)
    flops = 4 * 688 * (1288 - 688 / 2) * 128 * 32  # causal inside the chunk, full context before it
    small_tiles = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps_prefill": 4}
    wide_tiles = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps_prefill": 4}
    for label, change, splits in (("defaults", {}, None), ("1 split", {}, 1), ("4 splits", {}, 4),
                                  ("64x64 tiles, 4 warps", small_tiles, None),
                                  ("64x128 tiles, 4 warps", wide_tiles, None)):
        run = attention_call(batch, specs, **({} if splits is None else {"num_splits": splits}))
        bench.add(f"variant: chunk 688 at 1288 (llama2-7b), {label}", "triton",
                  median_us(with_config(change, run)), kv_bytes(specs, 32, 128), flops)
    del batch, call
    vocab_size, rows = 128256, 64
    logits = torch.randn(rows, vocab_size, device="cuda") * 3
    params = (torch.full((rows,), 0.8, device="cuda"),
              torch.full((rows,), 50, dtype=torch.int32, device="cuda"),
              torch.full((rows,), 0.9, device="cuda"), torch.randint(0, 2**62, (rows,), device="cuda"))
    knobs = ("NUM_WARPS", "BLOCK_VOCAB", "BLOCK_SEARCH", "SEARCH_UNROLL", "NUM_BUCKETS")
    defaults = {name: getattr(sampling, name) for name in knobs}
    for label, values in (("run-2 sampler (8 warps, blocks 1024/512, no unroll)", (8, 1024, 512, 1, 8)),
                          ("16 warps, blocks 4096/512, unroll 8, 4 buckets", (16, 4096, 512, 8, 4)),
                          ("16 warps, blocks 4096/1024, unroll 4", (16, 4096, 1024, 4, 8))):
        for name, value in zip(knobs, values):
            setattr(sampling, name, value)
        bench.add(f"variant: sample 64x128256 top-k+top-p, {label}", "triton",
                  median_us(lambda: sampling.sample_triton(logits, *params)), rows * vocab_size * 4, None)
    for name, value in defaults.items():
        setattr(sampling, name, value)
    for n, k in ((22016, 4096), (12288, 4096), (4096, 4096), (4096, 11008)):
        fp8_tile_cases(bench, n, k)


# ---------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    header = "| case | impl | time (us) | GB/s | TFLOP/s | % copy BW | % matmul | vs peer | goal |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.impl} | {r.time_us:.1f} | {fmt(r.gb_per_s, '.0f')} | "
            f"{fmt(r.tflop_per_s, '.1f')} | {fmt(r.of_copy and 100 * r.of_copy, '.0f')} | "
            f"{fmt(r.of_matmul and 100 * r.of_matmul, '.0f')} | {fmt(r.of_peer, '.2f')} | {r.goal} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="",
                        help="comma-separated groups: decode,prefill,elementwise,sampling,moe,fp8,variants")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_timings.py needs a CUDA GPU")
    torch.manual_seed(int(datetime.datetime.now().timestamp()))
    groups = {"decode": decode_cases, "prefill": prefill_cases, "elementwise": elementwise_cases,
              "sampling": sampling_cases, "moe": moe_cases, "fp8": fp8_cases, "variants": variant_cases}
    default_groups = ["decode", "prefill", "elementwise", "sampling", "moe", "fp8"]
    chosen = args.only.split(",") if args.only else default_groups
    bench = Bench()
    failed = []
    for name in tqdm(["ceilings", *chosen], desc="kernel benchmarks"):
        try:
            (ceilings if name == "ceilings" else groups[name])(bench)
        except Exception:  # report and go on: one broken group must not hide the others
            traceback.print_exc()
            failed.append(name)
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    command = "python " + " ".join(sys.argv)
    header = (f"device: {device}; date: {date}; torch {torch.__version__}, triton {triton.__version__}\n"
              f"command: {command}\n"
              f"ceilings: copy {bench.copy_gbps:.0f} GB/s (read + write), bf16 matmul "
              f"{bench.matmul_tflops:.0f} TFLOP/s")
    text = table(bench.rows)
    print(header)
    print(text)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernels-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}-{date}"
    stem.with_suffix(".md").write_text(f"# Kernel benchmarks\n\n```\n{header}\n```\n\n{text}\n")
    stem.with_suffix(".json").write_text(json.dumps({
        "device": device, "date": date, "command": command, "torch": torch.__version__,
        "triton": triton.__version__, "copy_gb_per_s": bench.copy_gbps,
        "matmul_tflop_per_s": bench.matmul_tflops, "rows": [asdict(r) for r in bench.rows],
    }, indent=1))
    print(f"wrote {stem}.md and {stem}.json")
    if failed:
        sys.exit(f"benchmark groups failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
