"""Decode attention launch parameters against the copy bandwidth, on the GPU.

Each decode reads its whole context of keys and values once, so a decode-only launch is bound by
memory: the figure is the KV bytes read per second against the device's measured copy bandwidth.
For each shape (sequences x context, heads / KV heads) each listed key tile (``BLOCK_N_DECODE``),
warps and pipeline stages is timed at every split-KV count (the launch config is
swapped in as ``attention_triton.launch_config``, the split count passed as ``num_splits``), next to
what the engine's rule picks today.

    python -m benchmarks.attention_decode_sweep [--cache-dtype fp8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from functools import partial
from pathlib import Path

import torch
from fastgen.kernels import attention_triton

from benchmarks.decode_step import copy_bandwidth_bytes_per_s
from benchmarks.step_profile import cuda_time

SHAPES = (  # (label, sequences, context, heads, kv heads)
    ("llama3-8b b32", 32, 1300, 32, 8),
    ("llama3-8b b64", 64, 1300, 32, 8),
    ("llama3-8b b128", 128, 1300, 32, 8),
    ("llama3-8b b256", 256, 1300, 32, 8),
)
# (key tile, warps, stages): the rule's, and those with fewer registers (more programs resident an
# SM: 114 registers at two stages, 96 with 32-key tiles; ptxas sm_90, Triton 3.6) or larger tiles
CONFIGS = ((64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 4, 2), (32, 4, 4), (64, 8, 3), (128, 8, 3), (128, 4, 2))
# a one-byte cache: the rule's 128-key tiles (the bytes of bf16's 64) at three stages, and its neighbours
FP8_CONFIGS = ((128, 4, 3), (128, 4, 2), (64, 4, 3), (64, 4, 2), (128, 8, 3), (256, 8, 2), (256, 4, 2))
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
SPLITS = (1, 2, 3, 4, 6)
HEAD_DIM, BLOCK_SIZE = 128, 16


def decode_batch(
    seqs: int, context: int, heads: int, kv_heads: int, cache_dtype: torch.dtype
) -> tuple[dict, float]:
    """Arguments of one decode-only launch over a shuffled paged cache, and its KV bytes."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    per_seq = -(-context // BLOCK_SIZE)
    blocks = seqs * per_seq
    shape = (blocks, BLOCK_SIZE, kv_heads, HEAD_DIM)
    key_cache = torch.randn(shape, device=device, dtype=dtype).to(cache_dtype)
    value_cache = torch.randn(shape, device=device, dtype=dtype).to(cache_dtype)
    tables = torch.randperm(blocks, device=device, dtype=torch.int32).view(seqs, per_seq)
    args = dict(
        query=torch.randn(seqs, heads, HEAD_DIM, device=device, dtype=dtype),
        key_cache=key_cache, value_cache=value_cache,
        query_start=torch.arange(seqs + 1, dtype=torch.int32, device=device),
        context_lens=torch.full((seqs,), context, dtype=torch.int32, device=device),
        block_tables=tables, scale=HEAD_DIM**-0.5, max_query_len=1, max_context_len=context,
    )
    return args, seqs * context * kv_heads * HEAD_DIM * 2 * cache_dtype.itemsize


def sweep(bandwidth: float, cache_dtype: torch.dtype) -> list[dict]:
    default_config = attention_triton.launch_config
    rows = []
    try:
        for label, seqs, context, heads, kv_heads in SHAPES:
            args, kv_bytes = decode_batch(seqs, context, heads, kv_heads, cache_dtype)
            base = default_config(HEAD_DIM, heads // kv_heads, torch.bfloat16, prefill_heavy=False,
                                  cache_bytes=cache_dtype.itemsize)
            attention_triton.launch_config = default_config
            rule_s = cuda_time(partial(attention_triton.paged_attention_triton, **args))
            rule_splits = attention_triton.choose_num_splits(seqs * kv_heads, context, torch.device("cuda"))
            results = []
            configs = CONFIGS if cache_dtype.itemsize == 2 else FP8_CONFIGS
            for (block_n, warps, stages), splits in itertools.product(configs, SPLITS):
                config = dict(base, BLOCK_N_DECODE=block_n, num_warps_decode=warps, num_stages_decode=stages)
                attention_triton.launch_config = lambda *_, config=config, **__: config
                launch = partial(attention_triton.paged_attention_triton, **args, num_splits=splits)
                seconds = cuda_time(launch)
                results.append((seconds, block_n, warps, stages, splits))
            results.sort()
            best = results[0]
            row = dict(
                shape=label, kv_gb=kv_bytes / 1e9, rule_us=rule_s * 1e6,
                rule_of_copy=kv_bytes / rule_s / bandwidth,
                rule=f"n{base['BLOCK_N_DECODE']} w{base['num_warps_decode']} s{base['num_stages_decode']} "
                     f"split {rule_splits}",
                best_us=best[0] * 1e6, best_of_copy=kv_bytes / best[0] / bandwidth,
                top=[dict(us=t * 1e6, of_copy=kv_bytes / t / bandwidth, block_n=n, warps=w, stages=st,
                          splits=sp) for t, n, w, st, sp in results[:8]],
            )
            rows.append(row)
            print(f"{label}: rule {row['rule']} {row['rule_us']:.0f} us ({row['rule_of_copy']:.0%} of copy); "
                  f"best {row['top'][0]} ", flush=True)
    finally:
        attention_triton.launch_config = default_config
    return rows


def report(rows: list[dict], bandwidth: float, seconds: float, cache: str) -> str:
    lines = [
        "# Decode attention: launch parameters vs copy bandwidth",
        "",
        f"- command: `python -m benchmarks.attention_decode_sweep --cache-dtype {cache}`; "
        f"device: {torch.cuda.get_device_name()}; "
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {seconds:.0f} s",
        f"- ceiling: copy {bandwidth / 1e12:.2f} TB/s (read + write, measured in this run); {cache} cache, "
        f"head dim {HEAD_DIM}, block {BLOCK_SIZE}; medians of 20 launches",
        "",
        "| shape | KV GB | rule (tile, warps, stages, splits) | rule us | of copy | best us | of copy "
        "| best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        top = row["top"][0]
        lines.append(
            f"| {row['shape']} | {row['kv_gb']:.2f} | {row['rule']} | {row['rule_us']:.0f} | "
            f"{row['rule_of_copy']:.0%} | {row['best_us']:.0f} | {row['best_of_copy']:.0%} | "
            f"n{top['block_n']} w{top['warps']} s{top['stages']} split {top['splits']} |"
        )
    lines += ["", "## Eight fastest per shape", ""]
    for row in rows:
        lines.append(f"- {row['shape']}: " + "; ".join(
            f"n{t['block_n']} w{t['warps']} s{t['stages']} split {t['splits']} {t['us']:.0f} us "
            f"({t['of_copy']:.0%})" for t in row["top"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dtype", choices=sorted(CACHE_DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    began = time.perf_counter()
    bandwidth = copy_bandwidth_bytes_per_s()
    rows = sweep(bandwidth, CACHE_DTYPES[args.cache_dtype])
    text = report(rows, bandwidth, time.perf_counter() - began, args.cache_dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name().replace(" ", "_")
    stem = f"attention_decode_sweep-{args.cache_dtype}-{device}-{time.strftime('%Y%m%d-%H%M')}"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
