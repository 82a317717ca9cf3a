"""The steps an offline run is made of: the engine's scheduler on a workload, with a constant token
for every sample (no model, no GPU), so the kernel work can be sized before device time is spent.

Per step: the decodes, the prompt tokens and the prompt chunks it carries. Reported: the steps by
kind, decodes per step, prompt tokens per mixed step, and the decode attention launch as the kernel
splits it (decodes x KV heads programs, `attention_triton.DECODE_PROGRAMS_PER_SM` on each of
``--sms`` multiprocessors; contexts long enough for any split): its modelled efficiency is the work
of its programs over the kernel's own `attention_triton.round_cost` (a partly filled last round
costs at least `attention_triton.PARTIAL_ROUND_COST` of a full one; benchmarks/NOTES-engine.md,
sessions 14-15).

    python -m benchmarks.step_shapes [--workload 1200-128] [--requests 512] [--token-budget 2048]
"""

from __future__ import annotations

import argparse
import collections
import statistics
from dataclasses import dataclass

from fastgen.kernels import attention_triton
from tqdm import tqdm

from benchmarks.workloads import WorkloadStream, parse_workload
from fastgen.block_manager import BlockManager
from fastgen.plan import StepResult
from fastgen.sampling_params import SamplingParams
from fastgen.scheduler import Scheduler
from fastgen.sequence import Sequence

LONG_CONTEXT = 1 << 20  # decode contexts taken long enough for any split count
SAMPLE = 5  # the token every sample returns (not an end-of-sequence id)


@dataclass(frozen=True)
class StepShape:
    decodes: int
    prompt_tokens: int
    prompt_chunks: int


def simulate(
    prompts: list[int], new_tokens: list[int], token_budget: int, max_seqs: int, kv_tokens: int,
    block_size: int = 16,
) -> list[StepShape]:
    """The scheduler's steps for requests of these prompt and generation lengths, all submitted
    at once, until every one has finished."""
    scheduler = Scheduler(BlockManager(num_blocks=kv_tokens // block_size, block_size=block_size),
                          token_budget=token_budget, max_seqs=max_seqs)
    for index, (prompt, new) in enumerate(zip(prompts, new_tokens, strict=True)):
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        scheduler.add(Sequence(index, [SAMPLE] * prompt, params, max_total_tokens=prompt + new,
                               eos_token_ids=()))
    shapes = []
    with tqdm(total=len(prompts), desc="requests finished", leave=False) as progress:
        while scheduler.num_running or scheduler.num_waiting:
            step = scheduler.schedule()
            if not step.plan.chunks:
                raise RuntimeError("the scheduler planned an empty step with requests left")
            decodes = step.num_decodes
            shapes.append(StepShape(decodes, step.plan.num_tokens - decodes, len(step.plan.chunks) - decodes))
            sampled = sum(chunk.sample for chunk in step.plan.chunks)
            for seq, _token in scheduler.commit(step, StepResult(step.plan.step_id, [SAMPLE] * sampled)):
                reason = seq.token_stop_reason()
                if reason is not None:
                    scheduler.finish(seq, reason)
                    progress.update(1)
    return shapes


def decode_launch(decodes: int, kv_heads: int, sms: int) -> tuple[int, float]:
    """The split count the kernel picks for the decode attention launch of ``decodes`` sequences,
    and the launch's modelled efficiency: its programs' work in whole rounds over its
    `attention_triton.round_cost`."""
    resident = attention_triton.DECODE_PROGRAMS_PER_SM * sms
    programs = decodes * kv_heads
    splits = attention_triton.splits_for(programs, LONG_CONTEXT, resident)
    return splits, programs / resident / attention_triton.round_cost(programs, splits, resident)


def report(shapes: list[StepShape], kv_heads: int, sms: int) -> str:
    kinds = collections.Counter(
        "decode-only" if s.prompt_tokens == 0 else "prefill-only" if s.decodes == 0 else "mixed"
        for s in shapes
    )
    counts = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
    lines = [
        f"- steps: {len(shapes)} ({counts})",
        f"- prompt tokens: {sum(s.prompt_tokens for s in shapes)}; "
        f"decode tokens: {sum(s.decodes for s in shapes)}",
    ]
    mixed = [s for s in shapes if s.decodes and s.prompt_tokens]
    if mixed:
        lines.append(
            f"- mixed steps: median {statistics.median(s.decodes for s in mixed):.0f} decodes, "
            f"{statistics.median(s.prompt_tokens for s in mixed):.0f} prompt tokens in "
            f"{statistics.median(s.prompt_chunks for s in mixed):.0f} chunks"
        )
    with_decodes = [s for s in shapes if s.decodes]
    if with_decodes:
        weighted = sum(s.decodes * decode_launch(s.decodes, kv_heads, sms)[1]
                       for s in with_decodes) / sum(s.decodes for s in with_decodes)
        lines.append(f"- decode attention launches ({kv_heads} KV heads, {sms} SMs x "
                     f"{attention_triton.DECODE_PROGRAMS_PER_SM}): modelled efficiency {weighted:.0%}, "
                     "weighted by decodes")
    lines += ["", "| decodes a step | steps | rounds of resident programs unsplit | splits | "
              "modelled efficiency |", "|---|---|---|---|---|"]
    width = 32
    bins = collections.Counter(s.decodes // width for s in shapes)
    for low in sorted(bins):
        middle = low * width + width // 2
        rounds = middle * kv_heads / (attention_triton.DECODE_PROGRAMS_PER_SM * sms)
        splits, efficiency = decode_launch(middle, kv_heads, sms)
        label = f"{low * width}-{low * width + width - 1}"
        lines.append(f"| {label} | {bins[low]} | {rounds:.2f} | {splits} | {efficiency:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="1200-128", help="PROMPT-GEN means, or a named workload")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--max-seqs", type=int, default=512)
    parser.add_argument("--kv-tokens", type=int, default=421872, help="KV capacity (the 8B shape on an H100)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--max-model-len", type=int, default=8192)
    args = parser.parse_args()
    prompt_mean, gen_mean = parse_workload(args.workload)
    stream = WorkloadStream(prompt_mean, gen_mean, vocab_size=32000, max_model_len=args.max_model_len)
    requests = stream.take(args.requests)
    shapes = simulate([r.prompt_tokens for r in requests], [r.max_new_tokens for r in requests],
                      args.token_budget, args.max_seqs, args.kv_tokens)
    print(f"# Step shapes: {args.requests} x {args.workload}, token budget {args.token_budget}, "
          f"max_seqs {args.max_seqs}, KV {args.kv_tokens} tokens\n")
    print(report(shapes, args.kv_heads, args.sms))


if __name__ == "__main__":
    main()
