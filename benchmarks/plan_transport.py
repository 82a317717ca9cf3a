"""Per-step cost of fanning a step plan out to tensor-parallel workers (issue 6, item 5).

A round trip is what `ZmqExecutor.execute` costs on top of the model: encode the `StepPlan`, push
it to every rank over ipc sockets, decode it in each worker, encode every rank's answer, and
receive and decode them in the engine. The workers run `EchoRunner` (no model), so the figure is
the transport alone. Also printed: encode/decode time and size of the plans, and the size a plan
would have if it repeated every sequence's block table instead of sending only new blocks.
Goal: a 256-sequence decode plan well under 1 ms.

    python benchmarks/plan_transport.py [--iterations 2000] [--tp 1 2 4]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import msgspec

from fastgen.config import EngineConfig
from fastgen.executor.wire import PlanCodec
from fastgen.executor.zmq import ZmqExecutor
from fastgen.models.config import ModelConfig
from fastgen.plan import SamplingOptions, SequenceChunk, SequenceStart, StepPlan

RESULTS = Path(__file__).parent / "results"
BLOCK_SIZE = 16
GREEDY = SamplingOptions(0.0, 0, 1.0, None, 0, [])
SAMPLED = SamplingOptions(0.8, 50, 0.95, 1234, 4, [2])


def decode_plan(num_seqs: int, rng: random.Random) -> StepPlan:
    """A steady-state decode step: one token per sequence, a new block every 16th position."""
    chunks = []
    for seq_id in range(num_seqs):
        position = rng.randrange(64, 2048)
        new_blocks = [rng.randrange(100_000)] if position % BLOCK_SIZE == 0 else []
        chunks.append(SequenceChunk(seq_id, [rng.randrange(32_000)], position, new_blocks, True))
    return StepPlan(10_000, released=[num_seqs + 1, num_seqs + 2], started=[], chunks=chunks)


def mixed_plan(num_decodes: int, rng: random.Random) -> StepPlan:
    """Decodes plus two prompt chunks filling a 768-token budget; both prompts start this step."""
    plan = decode_plan(num_decodes, rng)
    prompt_tokens = 768 - num_decodes
    long_len, short_len = prompt_tokens - 64, 64
    for seq_id, length, sample in ((9000, long_len, False), (9001, short_len, True)):
        plan.started.append(SequenceStart(seq_id, SAMPLED if sample else GREEDY, 0))
        blocks = [rng.randrange(100_000) for _ in range(-(-length // BLOCK_SIZE))]
        tokens = [rng.randrange(32_000) for _ in range(length)]
        plan.chunks.append(SequenceChunk(seq_id, tokens, 0, blocks, sample))
    return plan


class FullChunk(msgspec.Struct, array_like=True):
    """What a chunk would carry without worker-side state: the whole block table and sampling."""

    seq_id: int
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    sampling: SamplingOptions
    num_generated: int


def full_state_plan(plan: StepPlan) -> list[FullChunk]:
    return [
        FullChunk(
            c.seq_id,
            c.token_ids,
            c.start_position,
            list(range(-(-(c.start_position + len(c.token_ids)) // BLOCK_SIZE))),
            GREEDY,
            100,
        )
        for c in plan.chunks
    ]


def time_us(fn, iterations: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(iterations):
        fn()
    return (time.perf_counter_ns() - started) / 1000 / iterations


def codec_rows(plans: dict[str, StepPlan], iterations: int) -> list[dict]:
    codec = PlanCodec()
    rows = []
    for name, plan in plans.items():
        frame = codec.encode(plan)
        fresh_decode = lambda frame=frame: msgspec.msgpack.decode(frame, type=StepPlan)
        rows.append(
            {
                "plan": name,
                "bytes": len(frame),
                "encode_us": time_us(lambda plan=plan: codec.encode(plan), iterations),
                "decode_us": time_us(lambda frame=frame: codec.decode(frame), iterations),
                "decode_fresh_decoder_us": time_us(fresh_decode, iterations),
                "full_state_bytes": len(msgspec.msgpack.encode(full_state_plan(plan))),
            }
        )
    return rows


async def round_trip_rows(plans: dict[str, StepPlan], tp: int, iterations: int) -> list[dict]:
    config = EngineConfig(tensor_parallel=tp, executor="zmq")
    model_config = ModelConfig.from_dict(
        dict(model_type="llama", vocab_size=32000, hidden_size=64, intermediate_size=64,
             num_hidden_layers=1, num_attention_heads=4)
    )  # fmt: skip
    executor = await ZmqExecutor.create(
        "unused", config, model_config, 4096, runner_factory="fastgen.worker:EchoRunner"
    )
    rows = []
    try:
        await executor.execute(StepPlan(0, [], [SequenceStart(i, GREEDY, 0) for i in range(256)], []))
        for name, plan in plans.items():
            for _ in range(max(50, iterations // 10)):  # warm-up
                await executor.execute(plan)
            samples_us = []
            for _ in range(iterations):
                started = time.perf_counter_ns()
                await executor.execute(plan)
                samples_us.append((time.perf_counter_ns() - started) / 1000)
            samples_us.sort()
            rows.append(
                {
                    "tp": tp,
                    "plan": name,
                    "median_us": statistics.median(samples_us),
                    "p90_us": samples_us[int(0.90 * len(samples_us)) - 1],
                    "p99_us": samples_us[int(0.99 * len(samples_us)) - 1],
                }
            )
    finally:
        await executor.shutdown()
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import zmq

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores (load average {load} at start), {platform.system()}, "
        f"python {sys.version.split()[0]}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), "
        f"msgspec {msgspec.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    machine_line = machine()
    rng = random.Random(0)
    plans = {
        "empty (0 chunks)": StepPlan(1, [], [], []),
        "decode-256": decode_plan(256, rng),
        "mixed (192 decodes + 576-token prompts)": mixed_plan(192, rng),
    }
    codec = codec_rows(plans, args.iterations)
    trips = []
    for tp in args.tp:
        trips += asyncio.run(round_trip_rows(plans, tp, args.iterations))

    stamp = datetime.datetime.now(datetime.UTC)
    command = "python benchmarks/plan_transport.py " + " ".join(sys.argv[1:])
    header = (
        f"# Step-plan transport (ZmqExecutor fan-out)\n\n- command: `{command}`\n"
        f"- date: {stamp:%Y-%m-%d %H:%M} UTC\n- machine: {machine_line}\n"
        "- goal: a 256-sequence decode plan sent to every rank and answered in well under 1000 us\n"
        "- round trip: encode, push to each rank (ipc), decode in the worker, echo runner (no model), "
        "every rank answers, engine receives and decodes; `await executor.execute(plan)` timed\n\n"
    )
    codec_table = (
        "| plan | bytes | encode us | decode us | decode us (new decoder each time) "
        "| bytes if block tables were resent |\n|---|---|---|---|---|---|\n"
    )
    for row in codec:
        codec_table += (
            f"| {row['plan']} | {row['bytes']} | {row['encode_us']:.1f} | {row['decode_us']:.1f} | "
            f"{row['decode_fresh_decoder_us']:.1f} | {row['full_state_bytes']} |\n"
        )
    trip_table = "| tp | plan | median us | p90 us | p99 us |\n|---|---|---|---|---|\n"
    for row in trips:
        trip_table += (
            f"| {row['tp']} | {row['plan']} | {row['median_us']:.0f} | {row['p90_us']:.0f} | "
            f"{row['p99_us']:.0f} |\n"
        )
    report = header + "## Encoding\n\n" + codec_table + "\n## Round trip\n\n" + trip_table
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"plan_transport-{stamp:%Y-%m-%d}"
    (RESULTS / f"{name}.md").write_text(report)
    meta = {"command": command, "date": stamp.isoformat(), "machine": machine_line}
    (RESULTS / f"{name}.json").write_text(
        json.dumps({**meta, "encoding": codec, "round_trip": trips}, indent=2)
    )


if __name__ == "__main__":
    main()
