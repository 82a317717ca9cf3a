"""Where a step's GPU time goes, kernel by kernel, next to the step's wall time. GPU only.

Steps of a model shape (``--shape``, Llama-2-7B by default) with dummy weights:
- a batch-1 decode replayed from its CUDA graph (the batch-1 benchmark's step);
- an offline-like mixed step: ``--decodes`` running decodes at context 1300 plus one prompt chunk
  that fills the token budget (the steady state of the offline 1200/128 run);
- prefill-only steps of 768 and 2048 tokens (GEMM efficiency against the measured matmul rate).
The mixed step is also timed launched ahead as the engine runs it (step N+1 queued before N's
sampled ids are collected): against its kernel time, that says how long the device waits on the
host a step. Then the attention of the mixed step alone: one launch for the whole ragged batch
against two launches (the decodes, then the chunk), and those two one after the other against
both at once on two streams.

    python -m benchmarks.step_profile [--shape llama3-8b] [--decodes 80] [--budget 768] [--attention-only]
    python -m benchmarks.step_profile --decode-only --quantization fp8   # the batch-1 step, FP8 weights
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fastgen.kernels import attention_triton
from fastgen.kernels.pdl import pdl_enabled

from benchmarks.decode_step import GREEDY, SHAPES, copy_bandwidth_bytes_per_s, write_config
from fastgen import kernels
from fastgen.config import EngineConfig
from fastgen.models.config import ModelConfig
from fastgen.plan import SequenceChunk, SequenceStart, StepPlan
from fastgen.runner import ModelRunner

CATEGORIES = (
    ("attention merge", ("merge_splits",)),
    ("attention", ("paged_attention",)),
    ("matmul", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "sm90", "splitk")),
    ("norm", ("norm",)),
    ("rotary", ("rotary",)),
    ("kv write", ("write_kv", "kv_cache")),
    ("activation", ("silu", "gelu")),
    ("sampling/argmax", ("argmax", "sample", "reduce")),
    ("embedding", ("embedding", "index")),
    ("copy", ("copy", "memcpy", "fill")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(needle in lowered for needle in needles):
            return label
    return "other"


def cuda_time(fn, reps: int = 20) -> float:
    """Median seconds of ``fn`` on the device (CUDA events)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def kernel_breakdown(fn, repeats: int = 3) -> dict:
    """Device time per kernel name and per category, averaged over ``repeats`` calls of ``fn``."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        per_name[event.name] += event.time_range.elapsed_us() / repeats
        counts[event.name] += 1
    per_category: dict[str, float] = collections.defaultdict(float)
    for name, us in per_name.items():
        per_category[category(name)] += us
    top = sorted(per_name.items(), key=lambda item: -item[1])[:12]
    return {
        "kernel_us": sum(per_name.values()),
        "launches": sum(counts.values()) / repeats,
        "categories": dict(sorted(per_category.items(), key=lambda item: -item[1])),
        "top": [(name[:90], us, counts[name] / repeats) for name, us in top],
    }


def show(title: str, wall_s: float, breakdown: dict, extra: str = "") -> None:
    print(f"\n## {title}: wall {wall_s * 1e3:.2f} ms, kernels {breakdown['kernel_us'] / 1e3:.2f} ms "
          f"({breakdown['launches']:.0f} launches) {extra}")
    for label, us in breakdown["categories"].items():
        print(f"  {label:18s} {us / 1e3:8.3f} ms  {us / 1e3 / (wall_s * 1e3):6.1%}")
    print("  top kernels:")
    for name, us, count in breakdown["top"]:
        print(f"    {us:9.1f} us  x{count:5.0f}  {name}")


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192**3 / cuda_time(lambda: a @ b)


def run_plan(runner: ModelRunner, plan_for_step):
    counter = [0]

    def step() -> None:
        counter[0] += 1
        runner.execute(plan_for_step(counter[0]))

    return step


def pipelined_step_s(runner: ModelRunner, plan_for_step, steps: int = 20) -> float:
    """Mean seconds a step when each step is launched before the one before it is collected."""
    counter = [0]

    def plan() -> StepPlan:
        counter[0] += 1
        return plan_for_step(counter[0])

    for _ in range(3):
        runner.execute(plan())
    torch.cuda.synchronize()
    began = time.perf_counter()
    previous = runner.launch(plan())
    for _ in range(steps - 1):
        launched = runner.launch(plan())
        runner.collect(previous)
        previous = launched
    runner.collect(previous)
    return (time.perf_counter() - began) / steps


CHUNK_PREFIX = 600  # tokens of its prompt the mixed step's chunk follows


def profile_runner(runner: ModelRunner, args, matmul_flops_per_s: float, results: dict) -> None:
    params = sum(p.numel() for p in runner.model.parameters())
    embed = runner.model.model.embed_tokens.weight.numel()
    dense_params = params - embed  # the LM head runs only on sampled rows
    blocks_per_seq = 84
    # (a) batch-1 decode from the CUDA graph, context ~300 (the batch-1 benchmark's p128/g256)
    runner.execute(StepPlan(0, [], [SequenceStart(0, GREEDY, 1)],
                            [SequenceChunk(0, [7], 299, list(range(blocks_per_seq)), True)]))
    step = run_plan(runner, lambda n: StepPlan(n, [], [], [SequenceChunk(0, [7], 300 + n % 400, [], True)]))
    wall = cuda_time(step, reps=50)
    results["decode_b1"] = dict(wall_ms=wall * 1e3, **kernel_breakdown(step, repeats=5))
    show("batch-1 decode (CUDA graph)", wall, results["decode_b1"])
    runner.execute(StepPlan(1 << 20, [0], [], []))
    if args.decode_only:
        return

    # (b) offline-like mixed step
    decodes, budget = args.decodes, args.budget
    chunk_len = budget - decodes
    starts = [SequenceStart(i, GREEDY, 1) for i in range(decodes + 1)]
    first = [SequenceChunk(i, [7], 1299, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), True)
             for i in range(decodes)]
    chunk_blocks = -(-(CHUNK_PREFIX + chunk_len) // runner.block_size)  # the chunk's sequence may outgrow 84
    prompt_blocks = list(range(decodes * blocks_per_seq, decodes * blocks_per_seq + chunk_blocks))
    first.append(SequenceChunk(decodes, [5], 0, prompt_blocks, False))
    runner.execute(StepPlan(0, [], starts, first))

    def mixed(n: int) -> StepPlan:
        chunks = [SequenceChunk(i, [7], 1300 + n % 20, [], True) for i in range(decodes)]
        chunks.append(SequenceChunk(decodes, [5] * chunk_len, CHUNK_PREFIX, [], False))
        return StepPlan(n, [], [], chunks)

    step = run_plan(runner, mixed)
    wall = cuda_time(step, reps=10)
    kv_bytes = decodes * 1300 * runner.kv_bytes_per_block / runner.block_size
    results["mixed"] = dict(wall_ms=wall * 1e3, decodes=decodes, chunk=chunk_len, kv_read_gb=kv_bytes / 1e9,
                            **kernel_breakdown(step))
    show(f"mixed: {decodes} decodes at 1300 + chunk {chunk_len} at {CHUNK_PREFIX}", wall, results["mixed"],
         f"(decode KV reads {kv_bytes / 1e9:.1f} GB)")
    pipelined = pipelined_step_s(runner, mixed)
    results["mixed"]["pipelined_ms"] = pipelined * 1e3
    idle = pipelined * 1e3 - results["mixed"]["kernel_us"] / 1e3
    print(f"  launched ahead: {pipelined * 1e3:.2f} ms a step; the device waits {idle:.2f} ms a step")
    runner.execute(StepPlan(1 << 20, list(range(decodes + 1)), [], []))

    # (c) prefill-only steps
    for tokens in (768, 2048):
        blocks = list(range(-(-tokens // runner.block_size) + 1))
        runner.execute(StepPlan(0, [], [SequenceStart(0, GREEDY, 1)],
                                [SequenceChunk(0, [5], 0, blocks, False)]))
        step = run_plan(
            runner, lambda n, t=tokens: StepPlan(n, [], [], [SequenceChunk(0, [5] * t, 0, [], True)])
        )
        wall = cuda_time(step, reps=10)
        breakdown = kernel_breakdown(step)
        flops = 2 * dense_params * tokens
        gemm_s = breakdown["categories"].get("matmul", 0.0) / 1e6
        results[f"prefill_{tokens}"] = dict(wall_ms=wall * 1e3, matmul_tflops=flops / gemm_s / 1e12,
                                             step_tflops=flops / wall / 1e12, **breakdown)
        show(f"prefill {tokens} tokens", wall, breakdown,
             f"(matmul {flops / gemm_s / 1e12:.0f} TFLOP/s, step {flops / wall / 1e12:.0f} TFLOP/s, "
             f"peak {matmul_flops_per_s / 1e12:.0f})")
        runner.execute(StepPlan(1 << 20, [0], [], []))


def attention_split(args, bandwidth: float, results: dict) -> None:
    """The mixed step's attention: one ragged launch vs. a decode launch plus a chunk launch (device
    time of their kernels)."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = SHAPES[args.shape]
    heads = shape["num_attention_heads"]
    kv_heads = shape.get("num_key_value_heads", heads)
    head_dim = shape["hidden_size"] // heads
    decodes, chunk_len, block = args.decodes, args.budget - args.decodes, 16
    per_seq = max(84, -(-(CHUNK_PREFIX + chunk_len) // block))  # every row as long as the chunk's
    num_blocks = (decodes + 1) * per_seq
    key_cache = torch.randn(num_blocks, block, kv_heads, head_dim, device=device, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    tables = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(decodes + 1, per_seq)
    context = torch.tensor([1300] * decodes + [CHUNK_PREFIX + chunk_len], dtype=torch.int32, device=device)
    lengths = [1] * decodes + [chunk_len]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    query_start = torch.tensor(offsets, dtype=torch.int32, device=device)
    query = torch.randn(decodes + chunk_len, heads, head_dim, device=device, dtype=dtype)
    common = dict(scale=head_dim**-0.5)

    def mixed() -> None:
        kernels.paged_attention(query, key_cache, value_cache, query_start, context, tables,
                                max_query_len=chunk_len, max_context_len=CHUNK_PREFIX + chunk_len, **common)

    decode_start = query_start[: decodes + 1].clone()
    chunk_start = (query_start[decodes:] - decodes).contiguous()

    def decode_part(num_splits: int | None = None) -> None:
        attention_triton.paged_attention_triton(
            query[:decodes], key_cache, value_cache, decode_start, context[:decodes], tables[:decodes],
            max_query_len=1, max_context_len=1300, num_splits=num_splits, **common)

    def chunk_part() -> None:
        kernels.paged_attention(query[decodes:], key_cache, value_cache, chunk_start, context[decodes:],
                                tables[decodes:], max_query_len=chunk_len,
                                max_context_len=CHUNK_PREFIX + chunk_len, **common)

    # kernel time: events around a call would add the host's launch latency, which the engine hides
    t_mixed, t_decode, t_chunk = (kernel_breakdown(fn, repeats=10)["kernel_us"] / 1e6
                                  for fn in (mixed, decode_part, chunk_part))
    kv = decodes * 1300 * 2 * kv_heads * head_dim * 2
    results["attention_split"] = dict(mixed_us=t_mixed * 1e6, decode_us=t_decode * 1e6,
                                      chunk_us=t_chunk * 1e6, decode_of_copy=kv / t_decode / bandwidth)
    print(f"\n## attention of the mixed step (one layer): one launch {t_mixed * 1e6:.0f} us; "
          f"decodes alone {t_decode * 1e6:.0f} us (KV at {kv / t_decode / bandwidth:.0%} of copy) "
          f"+ chunk alone {t_chunk * 1e6:.0f} us = {(t_decode + t_chunk) * 1e6:.0f} us")
    overlap = concurrent_launches(decode_part, chunk_part)
    results["attention_split"]["overlap_us"] = overlap
    print("  the two launches queued back to back (events over 20 pairs, a GPU sleep ahead): "
          + "; ".join(f"{name} {us:.0f} us" for name, us in overlap.items()))


def queued_us(body, iters: int = 20) -> float:
    """Microseconds a call of ``body`` takes on the device, many calls queued behind a GPU sleep so
    that the host's launch latency stays out of the events (overlapping kernels: no profiler sum)."""
    body()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)
    start.record()
    for _ in range(iters):
        body()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def concurrent_launches(decode_part, chunk_part) -> dict[str, float]:
    """The decode and chunk launches one after the other, and on two streams at once (the chunk on
    a side stream, launched after the decodes or before them, at normal and at high priority; the
    decodes split by the rule or not at all), with the rule's chunk tiles and with 64-key ones (190
    registers, not 255: a decode program fits beside a chunk program on a multiprocessor)."""
    side = torch.cuda.Stream()
    urgent = torch.cuda.Stream(priority=-1)

    def serial() -> None:
        decode_part()
        chunk_part()

    def on(stream: torch.cuda.Stream, chunk_first: bool = False, decode_splits: int | None = None):
        def both() -> None:  # as attention_triton's _side_by_side: fork, launch, join
            main = torch.cuda.current_stream()
            stream.wait_stream(main)
            if chunk_first:
                with torch.cuda.stream(stream):
                    chunk_part()
            decode_part(decode_splits)
            if not chunk_first:
                with torch.cuda.stream(stream):
                    chunk_part()
            main.wait_stream(stream)
        return both

    rule = attention_triton.launch_config

    def narrow_chunks(*args, **kwargs) -> dict:
        config = rule(*args, **kwargs)
        return dict(config, BLOCK_N=64) if kwargs.get("prefill_heavy") else config

    bodies = (("serial", serial), ("2 streams", on(side)), ("2 streams, chunk first", on(side, True)),
              ("2 streams, chunk urgent", on(urgent)),
              ("2 streams, chunk urgent, decodes unsplit", on(urgent, decode_splits=1)))
    times = {}
    try:
        for tiles, config_rule in (("rule", rule), ("n64", narrow_chunks)):
            attention_triton.launch_config = config_rule
            for name, body in bodies:
                times[f"{name}, chunk tiles {tiles}"] = queued_us(body)
    finally:
        attention_triton.launch_config = rule
    return times


def warn_if_pdl() -> None:
    """With PDL on, a kernel starts during the one before it and waits there: its profiled duration
    includes the wait, so sums of kernel durations overstate (NOTES-kernels)."""
    if pdl_enabled(torch.device("cuda")):
        print("warning: FASTGEN_PDL=1: kernel durations include PDL waits, their sums overstate", flush=True)


def main() -> None:
    warn_if_pdl()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--decodes", type=int, default=80)
    parser.add_argument("--budget", type=int, default=768)
    parser.add_argument("--out", type=Path, default=None, help="a JSON file for the figures")
    parser.add_argument("--attention-only", action="store_true", help="only the mixed step's attention")
    parser.add_argument("--decode-only", action="store_true", help="only the batch-1 decode step")
    parser.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 linear weights")
    args = parser.parse_args()
    bandwidth = copy_bandwidth_bytes_per_s()
    flops = matmul_rate()
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {bandwidth / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s")
    results: dict = {"device": name, "shape": args.shape, "copy_tb_s": bandwidth / 1e12,
                     "matmul_tflops": flops / 1e12}
    if not args.decode_only:
        attention_split(args, bandwidth, results)
    if not args.attention_only:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(Path(tmp), args.shape)
            decodes = 0 if args.decode_only else args.decodes + 1
            blocks = decodes * 84 + -(-(CHUNK_PREFIX + args.budget) // 16) + 200
            config = EngineConfig(load_format="dummy", num_kv_blocks=blocks, cuda_graphs=True, max_seqs=256,
                                  token_budget=2048, quantization=args.quantization)
            model_config = ModelConfig.from_pretrained(path)
            try:
                runner = ModelRunner(None, config, model_config, 4096)
            except torch.OutOfMemoryError as error:  # e.g. MHA Llama-2-7B: 0.5 MiB a token of KV
                raise SystemExit(
                    f"{blocks} KV blocks ({args.decodes} decodes x 84 + the chunk) do not fit next to "
                    f"the {args.shape} weights: use fewer --decodes (or --attention-only)") from error
            profile_runner(runner, args, flops, results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
