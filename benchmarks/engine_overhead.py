"""The engine's host overhead per step, on any machine: a simulated device instead of a model.

The runner stand-in does the real per-step host preparation (`HostBatch`), then "launches" and
blocks for ``--device-ms`` in a GIL-free sleep, as a CUDA runner blocks in its device-to-host copy.
N streams generate through a real `AsyncEngine` (scheduler, detokenizer, output delivery) with
the in-process executor: synchronous scheduling with and without waiting for the launch in
`submit` (see `fastgen/executor/inprocess.py`), and asynchronous scheduling (the next step is
queued on the runner before the current one ends), with a runner that runs one step at a time
(`execute`) and with one that launches a step apart from collecting its result (`launch` and
`collect`, as `ModelRunner` does: a simulated device queue starts each step when the one before
ends). Overhead = step period - (preparation + device time).

    python benchmarks/engine_overhead.py [--device-ms 5] [--clients 1 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

from fastgen import EngineConfig, SamplingParams
from fastgen.batch import HostBatch
from fastgen.engine import AsyncEngine, StepProfile, _load_tokenizer
from fastgen.executor.inprocess import InProcessExecutor
from fastgen.loops import new_event_loop
from fastgen.models.config import ModelConfig
from fastgen.plan import StepPlan, StepResult
from fastgen.toy import make_toy_checkpoint

# (submit waits for the launch, asynchronous scheduling, the runner launches apart from collecting)
SETTINGS = ((False, False, False), (True, False, False), (True, True, False), (True, True, True))


class SimulatedRunner:
    """`ModelRunner`'s contract without a model: prepare the batch, launch, block for the device
    (``execute``: one step at a time, the runner before the launch/collect split)."""

    num_kv_blocks = 16384

    def __init__(self, device_s: float):
        self.device_s = device_s
        self.block_tables: dict[int, list[int]] = {}

    def prepare(self, plan: StepPlan) -> HostBatch:
        for seq_id in plan.released:
            self.block_tables.pop(seq_id, None)
        host = HostBatch()
        for chunk in plan.chunks:
            table = self.block_tables.setdefault(chunk.seq_id, [])
            table.extend(chunk.new_blocks)
            host.add(chunk, table, 16)
        return host

    def execute(self, plan: StepPlan, on_launched=None) -> StepResult:
        started = time.perf_counter()
        host = self.prepare(plan)
        prepared = time.perf_counter()
        if on_launched is not None:
            on_launched()
        if plan.chunks:
            time.sleep(self.device_s)  # releases the GIL, as a CUDA sync does
        tokens = [7] * len(host.sample_indices)
        return StepResult(plan.step_id, tokens, prepared - started, time.perf_counter() - prepared)


class QueueingRunner(SimulatedRunner):
    """`ModelRunner.launch` / `collect` with a simulated device queue: a launched step starts on
    the device when the one before it ends, and `collect` blocks until it is done."""

    def __init__(self, device_s: float):
        super().__init__(device_s)
        self.device_free_at = 0.0

    def launch(self, plan: StepPlan, on_launched=None) -> tuple[StepResult, float]:
        started = time.perf_counter()
        host = self.prepare(plan)
        prepared = time.perf_counter()
        done_at = prepared
        if plan.chunks:
            done_at = self.device_free_at = max(prepared, self.device_free_at) + self.device_s
        if on_launched is not None:
            on_launched()
        tokens = [7] * len(host.sample_indices)
        return StepResult(plan.step_id, tokens, prepared - started, done_at - prepared), done_at

    def collect(self, launched: tuple[StepResult, float]) -> StepResult:
        result, done_at = launched
        time.sleep(max(0.0, done_at - time.perf_counter()))  # GIL-free, as a CUDA event wait
        return result


async def measure(
    model_dir: str,
    device_s: float,
    clients: int,
    wait_for_launch: bool,
    async_scheduling: bool,
    queueing: bool,
    tokens: int,
) -> dict:
    runner = (QueueingRunner if queueing else SimulatedRunner)(device_s)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    executor = InProcessExecutor(runner, pool, wait_for_launch=wait_for_launch)
    model_config = ModelConfig.from_pretrained(model_dir)
    config = EngineConfig(device="cpu", async_scheduling=async_scheduling)
    engine = AsyncEngine(model_dir, config, model_config, _load_tokenizer(model_dir), executor, 4096)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)

    async def stream() -> None:
        async for _ in engine.generate(list(range(5, 133)), params):
            pass

    await asyncio.gather(*(stream() for _ in range(2)))  # warm-up
    engine.profile = StepProfile()
    started = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(clients)))
    wall = time.perf_counter() - started
    profile = engine.profile.as_dict()
    await engine.stop()
    period_ms = wall / profile["steps"] * 1e3
    busy_ms = profile["runner_prepare_ms"] + device_s * 1e3
    return dict(clients=clients, wait_for_launch=wait_for_launch, async_scheduling=async_scheduling,
                queueing=queueing, period_ms=period_ms,
                overhead_us=(period_ms - busy_ms) * 1e3, **profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-ms", type=float, default=5.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_toy_checkpoint(tmp)
        for clients in args.clients:
            for wait, ahead, queueing in SETTINGS:
                coroutine = measure(tmp, args.device_ms / 1e3, clients, wait, ahead, queueing, args.tokens)
                with asyncio.Runner(loop_factory=new_event_loop) as runner:
                    rows.append(runner.run(coroutine))
    text = (
        f"# Engine host overhead per step (simulated {args.device_ms} ms device step)\n\n"
        f"- command: `python benchmarks/engine_overhead.py {' '.join(sys.argv[1:])}`\n"
        f"- machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
        f"date {datetime.date.today()}\n\n"
        "| streams | submit waits for launch | async scheduling | launch apart from collect | "
        "step period ms | overhead us | runner prepare ms | engine between steps ms | "
        "engine overlapped ms |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        text += (f"| {r['clients']} | {r['wait_for_launch']} | {r['async_scheduling']} | {r['queueing']} | "
                 f"{r['period_ms']:.3f} | "
                 f"{r['overhead_us']:.0f} | {r['runner_prepare_ms']:.3f} | "
                 f"{r['engine_between_steps_ms']:.3f} | {r['engine_overlapped_ms']:.3f} |\n")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"engine_overhead-{datetime.date.today()}.md").write_text(text)


if __name__ == "__main__":
    main()
