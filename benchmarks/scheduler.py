"""Scheduler micro-benchmark: CPU time of one step's host bookkeeping with many live sequences.

A step here is `Scheduler.schedule()` + `Scheduler.commit()` + the token stop checks, with the
model replaced by a constant result, so the figure is the engine core's own cost per step.
Goal (issue 2): under 1 ms per step with 256 live sequences.

    python benchmarks/scheduler.py [--seqs 256] [--steps 2000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from fastgen.block_manager import BlockManager
from fastgen.plan import StepResult
from fastgen.sampling_params import SamplingParams
from fastgen.scheduler import Scheduler
from fastgen.sequence import Sequence

RESULTS = Path(__file__).parent / "results"


def build(num_seqs: int, prompt_len: int, token_budget: int) -> Scheduler:
    manager = BlockManager(num_blocks=num_seqs * 256, block_size=16)
    scheduler = Scheduler(manager, token_budget=token_budget, max_seqs=512)
    params = SamplingParams(max_new_tokens=1_000_000, ignore_eos=True)
    for seq_id in range(num_seqs):
        prompt = [(seq_id * 7 + i) % 32000 for i in range(prompt_len)]
        scheduler.add(Sequence(seq_id, prompt, params, max_total_tokens=10**9, eos_token_ids=(2,)))
    return scheduler


def one_step(scheduler: Scheduler) -> int:
    step = scheduler.schedule()
    sampled = sum(chunk.sample for chunk in step.plan.chunks)
    result = StepResult(step.plan.step_id, [5] * sampled)
    for seq, _token in scheduler.commit(step, result):
        reason = seq.token_stop_reason()
        if reason is not None:
            scheduler.finish(seq, reason)
    return step.plan.num_tokens


def measure(name: str, scheduler: Scheduler, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        one_step(scheduler)
    times_us = []
    tokens = 0
    for _ in tqdm(range(steps), desc=name, leave=False):
        start = time.perf_counter_ns()
        tokens += one_step(scheduler)
        times_us.append((time.perf_counter_ns() - start) / 1000)
    times_us.sort()
    return {
        "case": name,
        "live_sequences": scheduler.num_running,
        "tokens_per_step": tokens / steps,
        "median_us": statistics.median(times_us),
        "p99_us": times_us[int(0.99 * len(times_us)) - 1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    # decode-only: all sequences admitted and prefilled during warm-up (64-token prompts)
    rows = [measure("decode-only", build(args.seqs, 64, 768), args.steps, warmup=40)]
    # mixed: decodes plus long prompts streaming in as chunks
    mixed = build(args.seqs, 64, 768)
    for _ in range(40):
        one_step(mixed)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for seq_id in range(10_000, 10_000 + 2000):  # prefill-only requests: finish after one token
        mixed.add(Sequence(seq_id, [1] * 1200, params, max_total_tokens=1201))
    mixed.max_running = args.seqs + 1  # keep admitting one prompt at a time behind the decodes
    rows.append(measure("decode+prefill-chunks", mixed, args.steps, warmup=0))

    stamp = datetime.datetime.now(datetime.UTC)
    machine = f"{platform.machine()}, {platform.system()}, python {sys.version.split()[0]}"
    command = "python benchmarks/scheduler.py " + " ".join(sys.argv[1:])
    header = f"# Scheduler step cost\n\n- command: `{command}`\n- date: {stamp:%Y-%m-%d %H:%M} UTC\n"
    header += f"- machine: {machine}\n- goal: < 1000 us per step at 256 live sequences\n\n"
    table = "| case | live seqs | tokens/step | median us | p99 us |\n|---|---|---|---|---|\n"
    for row in rows:
        table += (
            f"| {row['case']} | {row['live_sequences']} | {row['tokens_per_step']:.0f} | "
            f"{row['median_us']:.0f} | {row['p99_us']:.0f} |\n"
        )
    print(header + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scheduler.md").write_text(header + table)
    meta = {"command": command, "date": stamp.isoformat(), "machine": machine}
    (RESULTS / "scheduler.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
