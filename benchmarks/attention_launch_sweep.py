"""Paged attention launch parameters, swept per shape on the GPU, next to what the engine's rule picks.

Two launches, as a Dynamic SplitFuse step issues them (``paged_attention_triton`` gives each its own
tiles and split-KV choice):

- ``decode``: decode-only launches. Each decode reads its whole context of keys and values once, so
  the launch is bound by memory: the figure is the KV bytes read per second against the device's
  measured copy bandwidth. Swept: key tile (``BLOCK_N_DECODE``), warps, pipeline stages.
- ``chunk``: the prompt-chunk launch of a mixed step (one or two chunks after their cached
  context; the chunks of the default 768-token budget and of 2048). Figures: attention TFLOP/s
  (causal, the keys each query sees) and the KV read rate.
  Swept: query tile (``BLOCK_M``), key tile (``BLOCK_N``), warps and stages of the prefill branch.

With ``--cache-dtype fp8`` each config also runs with ``fp8_f16_dot`` (keys and values widened to
float16 for the dots instead of bfloat16). Each config is timed at every split-KV count (the launch
config is swapped in as ``attention_triton.launch_config``, the split count passed as ``num_splits``).
Times are device times: the sum of the launch's kernel durations (the attention and, when split,
its merge), from the torch profiler over 10 calls. Events around a call would also count the host's
launch latency while the device idles (tens of microseconds a launch, more with a merge), which
the engine hides by launching a step ahead: session 11's sweep, timed so, overstated what no split
saves. Run it without ``FASTGEN_PDL=1``: a kernel launched with PDL starts while the one before
it runs and waits there, so kernel durations overlap and their sum overstates the launch.

    python -m benchmarks.attention_launch_sweep [--launch chunk] [--cache-dtype fp8] [--out DIR]
        [--shapes LABEL_PART] [--rule-config-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from fastgen.kernels import attention_triton

from benchmarks.decode_step import copy_bandwidth_bytes_per_s
from benchmarks.step_profile import kernel_breakdown, warn_if_pdl

HEAD_DIM, BLOCK_SIZE = 128, 16
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class Shape:
    """``seqs`` sequences of ``query_len`` new tokens each, at ``context`` tokens (theirs included)."""

    label: str
    seqs: int
    query_len: int
    context: int
    heads: int = 32
    kv_heads: int = 8
    splits: tuple[int, ...] = ()  # split counts to time; empty: the launch's

    @property
    def kv_elements(self) -> int:
        return self.seqs * self.context * self.kv_heads * HEAD_DIM * 2

    @property
    def flops(self) -> float:
        """QK^T and PV over the keys each query sees (causal within the chunk)."""
        seen = self.query_len * (self.context - self.query_len) + self.query_len * (self.query_len + 1) / 2
        return 4.0 * self.seqs * self.heads * HEAD_DIM * seen


@dataclass(frozen=True)
class Launch:
    shapes: tuple[Shape, ...]
    keys: tuple[str, ...]  # the launch_config entries a config sets, in its tuple's order
    configs: dict[int, tuple[tuple[int, ...], ...]]  # cache bytes -> configs
    splits: tuple[int, ...]


_DECODE_16 = ((64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 4, 2), (32, 4, 4), (64, 8, 3), (128, 8, 3),
              (128, 4, 2))
_DECODE_8 = ((128, 4, 3), (128, 4, 2), (64, 4, 3), (64, 4, 2), (128, 8, 3), (256, 8, 2), (256, 4, 2))
_CHUNK = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3),
          (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 3))
LAUNCHES = {
    "decode": Launch(
        shapes=(
            # batch 1 as its decode graph runs it: the graph is captured at the longest context, so
            # its launch splits as for that (up to 32 ways) whatever the context is
            Shape("llama3-8b b1 at 384", 1, 1, 384, splits=(1, 2, 4, 8, 16, 32)),
            Shape("llama3-8b b1 at 4096", 1, 1, 4096, splits=(1, 4, 8, 16, 32)),
            *(Shape(f"llama3-8b b{n}", n, 1, 1300) for n in (32, 64, 128, 256)),
            # programs a little past a round of resident ones (4 an SM on 132 SMs): the last round
            # runs nearly empty unless the keys are split
            *(Shape(f"llama3-8b b{n}", n, 1, 1300) for n in (75, 200)),
            *(Shape(f"llama2-7b b{n}", n, 1, 1300, kv_heads=32) for n in (20, 50)),
        ),
        keys=("BLOCK_N_DECODE", "num_warps_decode", "num_stages_decode", "fp8_f16_dot"),
        configs={
            # the rule's and those with fewer registers (more programs resident an SM: 114
            # registers at two stages, 96 with 32-key tiles; ptxas sm_90, Triton 3.6) or larger tiles
            2: tuple((*c, False) for c in _DECODE_16),
            # a one-byte cache: the rule's 128-key tiles (the bytes of bf16's 64) and its neighbours,
            # each widened to bfloat16 (the rule) and to float16
            1: tuple((*c, f16) for f16 in (False, True) for c in _DECODE_8),
        },
        splits=(1, 2, 3, 4, 6),
    ),
    "chunk": Launch(
        shapes=(
            Shape("llama3-8b chunk 704 after 600", 1, 704, 1304),  # step_profile's mixed step
            Shape("llama3-8b chunk 512 after 1536", 1, 512, 2048),
            Shape("llama3-8b 2 prompts of 384", 2, 384, 384),
            Shape("llama2-7b chunk 704 after 600", 1, 704, 1304, kv_heads=32),
            # what a 2048-token budget (pipelines, offline) launches
            Shape("llama3-8b prompt of 2048", 1, 2048, 2048),
            Shape("llama3-8b chunk 1024 after 1024", 1, 1024, 2048),
        ),
        keys=("BLOCK_M", "BLOCK_N", "num_warps_prefill", "num_stages", "fp8_f16_dot"),
        # the rule's (128 x 128, 8 warps, 3 stages: 255 registers, one program an SM) and smaller
        configs={
            2: tuple((*c, False) for c in _CHUNK),
            1: tuple((*c, f16) for f16 in (False, True) for c in _CHUNK),
        },
        splits=(1, 2, 3, 4),
    ),
}


def attention_args(shape: Shape, cache_dtype: torch.dtype) -> dict:
    """Arguments of one launch over a shuffled paged cache."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    per_seq = -(-shape.context // BLOCK_SIZE)
    blocks = shape.seqs * per_seq
    cache_shape = (blocks, BLOCK_SIZE, shape.kv_heads, HEAD_DIM)
    tokens = shape.seqs * shape.query_len
    return dict(
        query=torch.randn(tokens, shape.heads, HEAD_DIM, device=device, dtype=dtype),
        key_cache=torch.randn(cache_shape, device=device, dtype=dtype).to(cache_dtype),
        value_cache=torch.randn(cache_shape, device=device, dtype=dtype).to(cache_dtype),
        query_start=torch.arange(0, tokens + 1, shape.query_len, dtype=torch.int32, device=device),
        context_lens=torch.full((shape.seqs,), shape.context, dtype=torch.int32, device=device),
        block_tables=torch.randperm(blocks, device=device, dtype=torch.int32).view(shape.seqs, per_seq),
        scale=HEAD_DIM**-0.5, max_query_len=shape.query_len, max_context_len=shape.context,
    )


def rule_splits(shape: Shape, config: dict) -> int:
    """The split count `attention_triton._launch` chooses for this shape."""
    has_prefill = shape.query_len > 1
    per_tile = config["BLOCK_M"] // (shape.heads // shape.kv_heads)
    slots = attention_triton.launch_slots(shape.seqs * shape.query_len, shape.seqs, per_tile, has_prefill)
    return attention_triton.launch_num_splits(
        config, slots * shape.kv_heads, shape.context, torch.device("cuda"), has_prefill
    )


def describe(keys: tuple[str, ...], values: tuple[int, ...], splits: int) -> str:
    short = {"BLOCK_N_DECODE": "n", "BLOCK_M": "m", "BLOCK_N": "n", "num_warps_decode": "w",
             "num_warps_prefill": "w", "num_stages_decode": "s", "num_stages": "s"}  # fmt: skip
    words = [f"{short[k]}{v}" for k, v in zip(keys, values, strict=True) if k in short]
    if dict(zip(keys, values, strict=True)).get("fp8_f16_dot"):
        words.append("f16-dots")
    return " ".join(words) + f" split {splits}"


def device_seconds(fn) -> float:
    """Seconds of kernel time a call of ``fn`` takes on the device (profiler, 10 calls)."""
    return kernel_breakdown(fn, repeats=10)["kernel_us"] / 1e6


def _figures(seconds: float, kv_bytes: float, flops: float, bandwidth: float) -> dict:
    return dict(us=seconds * 1e6, of_copy=kv_bytes / seconds / bandwidth, tflops=flops / seconds / 1e12)


def sweep(
    launch: Launch,
    cache_dtype: torch.dtype,
    bandwidth: float,
    shape_filter: str = "",
    rule_config_only: bool = False,
) -> list[dict]:
    """Device time of each config x split count per shape (only shapes whose label contains
    ``shape_filter``; only the rule's config with ``rule_config_only``)."""
    default_config = attention_triton.launch_config

    def label(config: dict, splits: int) -> str:
        # the float16 dots apply to a one-byte cache only: a bf16 config does not show them
        shown = dict(config, fp8_f16_dot=config["fp8_f16_dot"] and cache_dtype.itemsize == 1)
        return describe(launch.keys, tuple(shown[k] for k in launch.keys), splits)

    rows = []
    try:
        for shape in (shape for shape in launch.shapes if shape_filter in shape.label):
            args = attention_args(shape, cache_dtype)
            kv_bytes = shape.kv_elements * cache_dtype.itemsize
            base = default_config(HEAD_DIM, shape.heads // shape.kv_heads, torch.bfloat16,
                                  prefill_heavy=shape.query_len > 1, cache_bytes=cache_dtype.itemsize)
            attention_triton.launch_config = default_config
            rule_s = device_seconds(partial(attention_triton.paged_attention_triton, **args))
            timed = []
            split_counts = shape.splits or launch.splits
            configs = launch.configs[cache_dtype.itemsize]
            if rule_config_only:
                configs = (tuple(base[key] for key in launch.keys),)
            for values, splits in itertools.product(configs, split_counts):
                config = dict(base, **dict(zip(launch.keys, values, strict=True)))
                attention_triton.launch_config = lambda *_, config=config, **__: config
                launch_once = partial(attention_triton.paged_attention_triton, **args, num_splits=splits)
                timed.append((device_seconds(launch_once), label(config, splits)))
            timed.sort()
            figures = partial(_figures, kv_bytes=kv_bytes, flops=shape.flops, bandwidth=bandwidth)
            rule = label(base, rule_splits(shape, base))
            row = dict(shape=shape.label, kv_gb=kv_bytes / 1e9, rule=rule, rule_figures=figures(rule_s),
                       top=[dict(config=name, **figures(t)) for t, name in timed[:8]])
            rows.append(row)
            print(f"{shape.label}: rule {rule} {rule_s * 1e6:.0f} us; best {row['top'][0]}", flush=True)
    finally:
        attention_triton.launch_config = default_config
    return rows


def report(rows: list[dict], launch: str, cache: str, bandwidth: float, seconds: float, command: str) -> str:
    lines = [
        f"# Paged attention, {launch} launch: parameters per shape",
        "",
        f"- command: `{command}`; "
        f"device: {torch.cuda.get_device_name()}; "
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {seconds:.0f} s",
        f"- ceiling: copy {bandwidth / 1e12:.2f} TB/s (read + write, measured in this run); {cache} cache, "
        f"head dim {HEAD_DIM}, block {BLOCK_SIZE}; device time (kernel durations, profiler) of 10 launches; "
        "TFLOP/s counts causal attention",
        "",
        "| shape | KV GB | rule | rule us | of copy | TFLOP/s | best us | of copy | TFLOP/s | best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rule, top = row["rule_figures"], row["top"][0]
        lines.append(
            f"| {row['shape']} | {row['kv_gb']:.2f} | {row['rule']} | {rule['us']:.0f} | "
            f"{rule['of_copy']:.0%} | {rule['tflops']:.0f} | {top['us']:.0f} | {top['of_copy']:.0%} | "
            f"{top['tflops']:.0f} | {top['config']} |"
        )
    lines += ["", "## Eight fastest per shape", ""]
    for row in rows:
        lines.append(f"- {row['shape']}: " + "; ".join(
            f"{t['config']} {t['us']:.0f} us ({t['of_copy']:.0%}, {t['tflops']:.0f} TFLOP/s)"
            for t in row["top"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", choices=sorted(LAUNCHES), default="decode")
    parser.add_argument("--cache-dtype", choices=sorted(CACHE_DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--shapes", default="", help="only the shapes whose label contains this")
    parser.add_argument("--rule-config-only", action="store_true", help="time only the rule's config")
    args = parser.parse_args()
    warn_if_pdl()
    began = time.perf_counter()
    bandwidth = copy_bandwidth_bytes_per_s()
    rows = sweep(LAUNCHES[args.launch], CACHE_DTYPES[args.cache_dtype], bandwidth, args.shapes,
                 args.rule_config_only)
    command = "python -m benchmarks.attention_launch_sweep " + " ".join(sys.argv[1:])
    text = report(rows, args.launch, args.cache_dtype, bandwidth, time.perf_counter() - began, command)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name().replace(" ", "_")
    stem = f"attention_{args.launch}_sweep-{args.cache_dtype}-{device}-{time.strftime('%Y%m%d-%H%M')}"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
