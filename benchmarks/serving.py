"""Replay-based serving benchmark (DeepSpeed-FastGen methodology): fastgen's `AsyncEngine` under
closed-loop clients, the hardware ceilings, and HF transformers as the peer, all in one run.

    python benchmarks/serving.py --model-shape llama2-7b --time-limit-s 400 --out benchmarks/results

What one run does, in order (each part is skipped, not started, once ``--time-limit-s`` is spent):
1. the peer (unless ``--skip-peer``), in a child process (`benchmarks/peer.py`): HF ``generate``
   at batch 1, eager and with a static cache (compiled by ``generate`` on a GPU, warmed first),
   and HF continuous batching on the first ``--peer-requests`` requests of the offline run, all
   submitted at once;
2. the ceilings, on the GPU: device-to-device copy bandwidth (bytes read + written) and the bf16
   8192^3 matmul rate;
3. fastgen with dummy weights at ``--token-budget``: warm-up, batch-1 decode (``--batch1
   PROMPT,GEN``) next to the HBM floor, the offline run (``--offline-requests`` of the first
   workload, all at once) next to its roofline and the peer, then per workload closed-loop runs: N
   clients each pull the next request from a shared queue until ``4 * N + 32`` requests are done.
   Runs go from most clients to fewest (the cheap runs first, so a time budget cuts the slowest);
4. the offline run again at each other ``--offline-token-budgets`` budget, each on its own engine,
   started once the previous one has stopped and handed back its GPU memory.

Every request is recorded (TTFT, every inter-token gap, end-to-end latency); `metrics.py` says how
multi-token deltas are timed and how effective throughput is judged. Every measured run also
records the engine's step times (median, max, max / median; a step over 3x the median is a stall)
and the Triton kernels the engine compiled during it (``EngineStats.kernel_compiles``): any compile
inside a measured run makes the exit status 1 (compiles during the warm-up are reported as
"compiled after start-up"). The JSON is rewritten after every run; the markdown, plots and the
summary table (the last lines on stdout) come at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from metrics import GcPauses, RequestRecord, step_stats, summarize_run
from report import compile_verdict, markdown_report, summary_table
from tqdm import tqdm
from workloads import (
    MODEL_SHAPES,
    SEED,
    BenchRequest,
    ShapeArithmetic,
    WorkloadStream,
    fixed_request,
    parse_workload,
    prefix_requests,
    roofline,
    write_model_dir,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUTPUT_RESERVE_S = 10.0  # kept back from the time limit for writing the outputs


class Budget:
    """The run's time limit: how much is left, and what was skipped for lack of it."""

    def __init__(self, limit_s: float | None, max_run_s: float | None):
        self.started = time.perf_counter()
        self.limit_s = limit_s
        self.max_run_s = max_run_s
        self.skipped: list[str] = []

    def remaining_s(self) -> float:
        if self.limit_s is None:
            return math.inf
        return self.limit_s - OUTPUT_RESERVE_S - (time.perf_counter() - self.started)

    def deadline(self, cap_s: float | None = None) -> float:
        """perf_counter time by which the next part must stop."""
        span = min(self.remaining_s(), cap_s or math.inf, self.max_run_s or math.inf)
        return time.perf_counter() + span

    def allows(self, what: str, estimate_s: float | None = None, minimum_s: float = 3.0) -> bool:
        """Whether a part estimated to take ``estimate_s`` may start; a run is cut at ``max_run_s``,
        so it needs no more than that."""
        left = self.remaining_s()
        if estimate_s is not None and self.max_run_s is not None:
            estimate_s = min(estimate_s, self.max_run_s)
        if left < minimum_s:
            self.skipped.append(f"{what}: not started, the time limit was spent")
            return False
        if estimate_s is not None and estimate_s > left:
            self.skipped.append(f"{what}: not started, needs ~{estimate_s:.0f} s, {left:.0f} s left")
            return False
        return True


class Driver:
    """Closed-loop clients over one `AsyncEngine`, timing every delta on the client side."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []
        self.step_device_seconds: list[float] = []  # 0.0 where the runner does not measure it
        self.gc_pauses = GcPauses()
        listeners = getattr(engine, "step_listeners", None)
        if listeners is not None:
            listeners.append(self._on_step)

    def _on_step(self, step: Any, result: Any, seconds: float) -> None:
        self.step_seconds.append(seconds)
        self.step_tokens.append(getattr(getattr(step, "plan", None), "num_tokens", 0))
        self.step_device_seconds.append(getattr(result, "device_us", 0) / 1e6)

    async def one_request(
        self, request: BenchRequest, params: Any, start: float, record: RequestRecord
    ) -> None:
        clock = time.perf_counter
        arrivals, counts = record.arrivals_s, record.counts
        overhead = 0.0
        record.submit_s = clock() - start
        try:
            async for out in self.engine.generate(request.prompt_token_ids, params):
                now = clock()
                if out.token_ids:
                    arrivals.append(now - start)
                    counts.append(len(out.token_ids))
                if out.finish_reason is not None:
                    record.finish_reason = out.finish_reason
                    record.end_s = now - start
                overhead += clock() - now
        except asyncio.CancelledError:
            record.error = "cancelled at the run's deadline"
            raise
        except Exception as exc:  # a failed request is recorded, the run goes on
            record.error = repr(exc)
        finally:
            if record.end_s is None:
                record.end_s = clock() - start
            record.client_overhead_s = overhead

    async def closed_loop(
        self, requests: Sequence[BenchRequest], clients: int, deadline: float
    ) -> tuple[list[RequestRecord], float, bool]:
        """``clients`` tasks pull requests from one queue until it is empty or ``deadline`` passes.

        Returns the records (in submission order), the wall time (first submission to last
        completion, or to the deadline) and whether the deadline cut the run.
        """
        from fastgen import SamplingParams

        pending = deque(
            (request, SamplingParams(max_new_tokens=request.max_new_tokens, ignore_eos=True))
            for request in requests
        )
        records: list[RequestRecord] = []
        start = time.perf_counter()

        async def client() -> None:
            while pending and time.perf_counter() < deadline:
                request, params = pending.popleft()
                record = RequestRecord(request.index, request.prompt_tokens, request.max_new_tokens, 0.0)
                records.append(record)
                await self.one_request(request, params, start, record)

        tasks = [asyncio.create_task(client()) for _ in range(max(1, min(clients, len(requests))))]
        _, unfinished = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        truncated = bool(unfinished) or bool(pending)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if truncated:
            wall_s = time.perf_counter() - start
            await self.drain()
        else:
            wall_s = max((r.end_s for r in records if r.end_s is not None), default=0.0)
        return records, wall_s, truncated

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until the engine holds no request (aborts take effect within a step)."""
        until = time.perf_counter() + timeout_s
        while time.perf_counter() < until:
            stats = self.engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                return
            await asyncio.sleep(0.01)

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until the engine holds no request and no step is in flight. A step launched ahead
        for requests that then finished is received after its run ended, stretched by whatever the
        benchmark did in between (summaries, the next run's requests): it belongs to no run."""
        await self.drain(timeout_s)
        core = getattr(self.engine, "core", None)
        until = time.perf_counter() + timeout_s
        while getattr(core, "next_result", None) is not None and time.perf_counter() < until:
            await asyncio.sleep(0.001)

    async def run(self, name: str, requests: Sequence[BenchRequest], clients: int, deadline: float) -> dict:
        """One measured run: per-request records, aggregates and the engine's own counters."""
        await self.settle()
        before = self.engine.stats()
        first_step, first_gc = len(self.step_seconds), self.gc_pauses.mark()
        records, wall_s, truncated = await self.closed_loop(requests, clients, deadline)
        after = self.engine.stats()
        summaries = [r.summary() for r in records]
        steps = self.step_seconds[first_step:]
        tokens = self.step_tokens[first_step:]
        busy_s = sum(steps)
        compiles = [kernel_compiles(stats) for stats in (before, after)]
        return {
            "name": name,
            "engine": "fastgen",
            "clients": clients,
            "requests_planned": len(requests),
            "truncated": truncated,
            "summary": summarize_run(summaries, wall_s),
            "engine_stats": {
                "steps": after.num_steps - before.num_steps,
                "preemptions": after.num_preemptions - before.num_preemptions,
                "generated_tokens": after.generated_tokens - before.generated_tokens,
                "step_time_s_sum": busy_s,
                "busy_fraction": busy_s / wall_s if wall_s > 0 else None,
                "step_ms": step_stats(steps, tokens, device_seconds=self.step_device_seconds[first_step:]),
                "tokens_per_step": sum(tokens) / len(tokens) if tokens else None,
                # Triton kernel variants compiled while this run was measured (None: the engine
                # does not say): any is a failure of the benchmark (see `compile_verdict`)
                "kernel_compiles": None if None in compiles else compiles[1] - compiles[0],
                # the garbage collector's pauses in this process (the engine's, and its runner's
                # when in-process) during the run
                "gc": self.gc_pauses.summary(first_gc),
            },
            "requests": summaries,
        }


def kernel_compiles(stats: Any) -> int | None:
    """Triton kernel variants the engine compiled since it became ready (None: it does not count them)."""
    return getattr(stats, "kernel_compiles", None)


# -- ceilings ----------------------------------------------------------------------------------


def measure_ceilings(device: str = "cuda", copy_bytes: int = 1 << 30) -> dict[str, Any]:
    """Device-to-device copy bandwidth (read + write bytes) and the bf16 8192^3 matmul rate, timed
    with CUDA events (median of repeats after warm-up)."""
    import torch

    def median_seconds(fn: Any, repeats: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000.0)
        return statistics.median(times)

    def copy_seconds() -> float:
        src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return median_seconds(lambda: dst.copy_(src), 10)

    def matmul_seconds(n: int) -> float:
        a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
        out = torch.empty(n, n, dtype=torch.bfloat16, device=device)
        return median_seconds(lambda: torch.matmul(a, b, out=out), 20)

    n = 8192
    copy_s = copy_seconds()
    matmul_s = matmul_seconds(n)
    torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": 2 * copy_bytes / copy_s,
        "copy_size_bytes": copy_bytes,
        "matmul_flops_per_s": 2 * n**3 / matmul_s,
        "matmul_shape": [n, n, n],
    }


# -- the peer ----------------------------------------------------------------------------------


def run_peer(
    args: argparse.Namespace,
    model_dir: Path,
    requests: list[BenchRequest],
    batch1: tuple[int, int],
    vocab_size: int,
    budget: Budget,
    device: str,
) -> dict[str, Any]:
    """Run `benchmarks/peer.py` in a child process with its share of the time; its JSON, or the error."""
    limit_s = min(args.peer_time_limit_s, budget.remaining_s())
    work_dir = Path(tempfile.mkdtemp(prefix="fastgen-peer-"))
    requests_file, out_file = work_dir / "requests.json", work_dir / "peer.json"
    prompt_tokens, new_tokens = batch1
    work = {
        "batch1": {
            "prompt": fixed_request(prompt_tokens, 1, vocab_size).prompt_token_ids,
            "new_tokens": new_tokens,
        },
        "requests": [
            {"index": r.index, "prompt": r.prompt_token_ids, "max_new_tokens": r.max_new_tokens}
            for r in requests
        ],
    }
    requests_file.write_text(json.dumps(work))
    command = [
        sys.executable,
        str(HERE / "peer.py"),
        "--model-dir", str(model_dir),
        "--requests", str(requests_file),
        "--out", str(out_file),
        "--device", device,
        "--dtype", "bfloat16" if device.startswith("cuda") else "float32",
        "--time-limit-s", f"{limit_s:.0f}",
    ]  # fmt: skip
    if args.peer_num_blocks is not None:
        command += ["--num-blocks", str(args.peer_num_blocks)]
    if args.peer_max_batch_tokens is not None:
        command += ["--max-batch-tokens", str(args.peer_max_batch_tokens)]
    if args.skip_peer_static:
        command.append("--skip-static")
    started = time.perf_counter()
    result: dict[str, Any] = {}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s + 15, check=False)
        if done.returncode != 0:
            result["error"] = f"peer exited with {done.returncode}: {done.stderr[-2000:]}"
        elif out_file.is_file():
            result["log_tail"] = done.stderr[-1000:]
    except subprocess.TimeoutExpired:
        result["error"] = f"peer killed after {limit_s + 15:.0f} s"
    if out_file.is_file():
        try:
            result.update(json.loads(out_file.read_text()))
        except ValueError as exc:
            result["error"] = f"{result.get('error', '')} unreadable peer JSON: {exc}".strip()
    result["wall_s"] = time.perf_counter() - started
    result["requests_submitted"] = len(requests)
    result["batch1_new_tokens"] = new_tokens
    return result


# -- fastgen -----------------------------------------------------------------------------------


def engine_config(args: argparse.Namespace, token_budget: int) -> Any:
    from fastgen import EngineConfig

    options: dict[str, Any] = {
        "load_format": "dummy",
        "token_budget": token_budget,
        "max_seqs": args.max_seqs,
        "dtype": args.dtype,
        "cuda_graphs": not args.no_cuda_graphs,
        "async_scheduling": not args.no_async_scheduling,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "seed": SEED,
        "freeze_gc": not args.no_freeze_gc,
    }
    if args.num_kv_blocks is not None:
        options["num_kv_blocks"] = args.num_kv_blocks
    if args.max_model_len is not None:
        options["max_model_len"] = args.max_model_len
    return EngineConfig(**options)


def decode_rate(run: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 figures of a one-request run: TTFT and decode tokens/s after the first token."""
    request = run["requests"][0]
    gaps_s = [g / 1000.0 for g in request["gaps_ms"]]
    decode_s = sum(gaps_s)
    return {
        "ttft_s": request["ttft_s"],
        "new_tokens": request["output_tokens"],
        "decode_tokens_per_s": len(gaps_s) / decode_s if decode_s > 0 else None,
        "token_latency_ms_p50": statistics.median(gaps_s) * 1000 if gaps_s else None,
    }


async def bench_fastgen(
    args: argparse.Namespace,
    model_dir: Path,
    report: Report,
    workloads: dict[str, tuple[int, int]],
    streams: dict[str, WorkloadStream],
    offline_requests: list[BenchRequest],
    budget: Budget,
) -> None:
    """The main engine (``--token-budget``): warm-up, batch-1, the offline run if its budget is one
    of ``--offline-token-budgets``, the prefix runs and the client sweeps; then one engine per other
    offline budget, each started after the last one stopped (budget allowing)."""
    offline_budgets = args.offline_token_budgets or [args.token_budget]
    first = next(iter(workloads))

    async def main_runs(engine: Any, driver: Driver, vocab: int) -> None:
        b1_prompt, b1_new = args.batch1
        rates = []
        for repeat in range(args.batch1_repeats):
            if not budget.allows(f"batch-1 decode #{repeat + 1}"):
                break
            # a new prompt each time: a cached prompt would flatter the TTFT of the repeats
            b1_request = fixed_request(b1_prompt, b1_new, vocab, seed=SEED + repeat)
            started = time.perf_counter()
            run = await driver.run(f"batch1 #{repeat + 1}", [b1_request], 1, budget.deadline())
            report.mark("batch-1 decode", started)
            report.check_run(run)
            rates.append(decode_rate(run))
        if rates:
            report.set_batch1(rates)

        if offline_requests and args.token_budget in offline_budgets:
            await offline_run(engine, driver, args.token_budget)

        if args.shared_prefix:
            await bench_prefix_cache(args, driver, engine, report, budget, vocab)

        for name, (prompt, gen) in workloads.items():
            previous: dict[str, Any] | None = None
            for clients in sorted(args.clients, reverse=True):
                count = 4 * clients + 32
                label = f"{name} clients={clients}"
                estimate = None
                if previous is not None and previous["summary"]["e2e_s"]["mean"]:
                    estimate = math.ceil(count / clients) * previous["summary"]["e2e_s"]["mean"]
                if not budget.allows(label, estimate):
                    continue
                requests = streams[name].take(count)
                run = await driver.run(f"{name}/c{clients}", requests, clients, budget.deadline())
                report.add_run(run, workload=name, means=(prompt, gen), offline=False)
                previous = run
                _check_alive(engine)

    async def offline_run(engine: Any, driver: Driver, token_budget: int) -> None:
        label = f"offline run at token budget {token_budget}"
        if not budget.allows(label):
            return
        tqdm.write(
            f"offline {first}: {len(offline_requests)} requests at once, token budget {token_budget} ..."
        )
        name = f"offline/{first}" + ("" if token_budget == args.token_budget else f"/budget{token_budget}")
        run = await driver.run(name, offline_requests, len(offline_requests), budget.deadline())
        run["token_budget"] = token_budget
        report.add_run(run, workload=first, means=workloads[first], offline=True)
        _check_alive(engine)

    main_has_work = (
        args.batch1_repeats > 0
        or (offline_requests and args.token_budget in offline_budgets)
        or bool(args.shared_prefix)
        or bool(args.clients and workloads)
    )
    if main_has_work:
        await with_engine(args, model_dir, report, budget, args.token_budget, workloads, main_runs)
    if offline_requests:
        for token_budget in offline_budgets:
            if token_budget == args.token_budget:
                continue
            if not budget.allows(f"engine at token budget {token_budget}", engine_estimate_s(report)):
                continue
            try:
                await with_engine(
                    args, model_dir, report, budget, token_budget, {first: workloads[first]},
                    lambda engine, driver, vocab, b=token_budget: offline_run(engine, driver, b),
                )  # fmt: skip
            except Exception as exc:  # the next budget may still run
                report.data["errors"].append(f"engine at token budget {token_budget}: {exc!r}")
                tqdm.write(f"engine at token budget {token_budget} failed: {exc!r}")


async def with_engine(
    args: argparse.Namespace,
    model_dir: Path,
    report: Report,
    budget: Budget,
    token_budget: int,
    warm_workloads: dict[str, tuple[int, int]],
    work: Callable[[Any, Driver, int], Awaitable[None]],
) -> None:
    """Start an engine at ``token_budget``, warm it up on ``warm_workloads``, run ``work`` on it,
    stop it and hand its GPU memory back (the next engine sizes its KV cache from what is free)."""
    from fastgen import AsyncEngine

    config = engine_config(args, token_budget)
    main = token_budget == args.token_budget
    started = time.perf_counter()
    engine = await AsyncEngine.start(str(model_dir), config)
    report.mark("engine start" if main else f"engine start (token budget {token_budget})", started)
    stats = engine.stats()
    info: dict[str, Any] = {
        "token_budget": token_budget,
        "config": {name: getattr(config, name) for name in config.__struct_fields__},
        "start_s": time.perf_counter() - started,
        "kv_blocks": stats.num_kv_blocks,
        "kv_tokens": stats.num_kv_blocks * config.block_size,
        "max_model_len": engine.max_model_len,
        "kernel_compiles_at_ready": kernel_compiles(stats),
        "gpu_free_bytes_before_start": report.free_gpu_bytes_before_start,
    }
    report.data["engines"].append(info)
    report.data.setdefault("engine", info)
    report.save()
    driver = Driver(engine)
    vocab = report.data["model"]["config"]["vocab_size"]
    try:
        warm_started = time.perf_counter()
        for name, (prompt, gen) in warm_workloads.items():
            warm = WorkloadStream(
                prompt, gen, vocab_size=vocab, max_model_len=engine.max_model_len, seed=SEED + 1
            )
            batch = [
                replace(r, max_new_tokens=min(r.max_new_tokens, 4 + 2 * i))
                for i, r in enumerate(warm.take(8))
            ]
            await driver.closed_loop(batch, len(batch), budget.deadline(60))
            tqdm.write(f"warm-up {name}: done")
        info["warmup_s"] = time.perf_counter() - warm_started
        # compiled after start-up, by the benchmark's own warm-up: a server's first requests would pay it
        after_warmup, at_ready = kernel_compiles(engine.stats()), info["kernel_compiles_at_ready"]
        info["kernel_compiles_warmup"] = None if None in (after_warmup, at_ready) else after_warmup - at_ready
        report.mark("warm-up", warm_started)
        report.save()
        await work(engine, driver, vocab)
    finally:
        driver.gc_pauses.close()
        await engine.stop()
        engine = driver = None
        report.free_gpu_bytes_before_start = release_gpu_memory()


def engine_estimate_s(report: Report) -> float | None:
    """Seconds another engine's offline run is likely to take: the last engine's start and warm-up
    plus the slowest offline run so far (None before any)."""
    offline = [run["summary"]["wall_s"] for run in report.data["runs"] if run.get("offline")]
    if not offline or not report.data["engines"]:
        return None
    last = report.data["engines"][-1]
    return last["start_s"] + (last.get("warmup_s") or 0.0) + max(offline)


def release_gpu_memory() -> int | None:
    """Collect what a stopped engine left (its runner, graphs, KV cache) and empty torch's cache;
    the bytes the GPU has free afterwards (None without a GPU)."""
    gc.collect()
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


async def bench_prefix_cache(
    args: argparse.Namespace, driver: Driver, engine: Any, report: Report, budget: Budget, vocab: int
) -> None:
    """The same closed loop twice: prompts that share no prefix, then prompts that share one (a
    system prompt): what the prefix cache saves in TTFT and throughput."""
    prefix, suffix, gen = args.shared_prefix
    clients = args.shared_prefix_clients
    count = 4 * clients + 32
    for shared in (False, True):
        name = f"prefix {prefix}+{suffix}-{gen} {'shared' if shared else 'distinct'}"
        if not budget.allows(name):
            return
        requests = prefix_requests(prefix, suffix, gen, count, vocab, shared=shared)
        hits = engine.stats().prefix_cache_hit_tokens
        run = await driver.run(f"{name}/c{clients}", requests, clients, budget.deadline())
        run["prefix_cache_hit_tokens"] = engine.stats().prefix_cache_hit_tokens - hits
        tqdm.write(f"{name}: {run['prefix_cache_hit_tokens']} prompt tokens from the prefix cache")
        report.add_run(run, workload=name, means=(prefix + suffix, gen), offline=False)
        _check_alive(engine)


def _check_alive(engine: Any) -> None:
    if not engine.is_healthy:
        raise RuntimeError("the engine stopped: no further runs")


class Report:
    """Everything measured, saved as JSON after every part."""

    def __init__(self, out_dir: Path, command: str):
        self.out_dir = out_dir
        stamp = datetime.datetime.now(datetime.UTC)
        self.stamp = stamp
        self.data: dict[str, Any] = {
            "command": command,
            "date": stamp.isoformat(timespec="seconds"),
            "device": "cpu",
            "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
            "runs": [],
            "engines": [],  # every engine started: its token budget, KV capacity, start-up and warm-up
            "step_checks": [],  # one row per measured run: step times, p99 TTFT, kernel compiles
            "skipped": [],
            "errors": [],
            "timeline": [],
        }
        self.started = time.perf_counter()
        self.progress = tqdm(desc="runs", unit="run", mininterval=5.0)
        self.free_gpu_bytes_before_start: int | None = None

    @property
    def basename(self) -> str:
        device = re.sub(r"[^a-z0-9]+", "-", self.data["device"].lower()).strip("-")
        device = device.removeprefix("nvidia-") or "cpu"
        return f"serving-{device}-{self.stamp:%Y%m%d-%H%M}"

    def save(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.basename}.json"
        path.write_text(json.dumps(self.data, default=str))  # compact: hundreds of thousands of gaps
        return path

    def mark(self, what: str, started: float) -> None:
        """Record that ``what`` ran from ``started`` (perf_counter) until now: where the time went."""
        now = time.perf_counter()
        self.data["timeline"].append(
            {"what": what, "at_s": round(started - self.started, 3), "seconds": round(now - started, 3)}
        )

    def set_batch1(self, rates: list[dict[str, Any]]) -> None:
        valid = [r["decode_tokens_per_s"] for r in rates if r["decode_tokens_per_s"]]
        batch1 = {"repeats": rates, "decode_tokens_per_s": statistics.median(valid) if valid else None}
        floor = self.data.get("ceilings", {}).get("hbm_floor_tokens_per_s")
        if floor and batch1["decode_tokens_per_s"]:
            batch1["fraction_of_floor"] = batch1["decode_tokens_per_s"] / floor
        self.data["batch1"] = batch1
        tqdm.write(
            f"batch-1 decode: {batch1['decode_tokens_per_s'] or 0:.1f} tokens/s (floor {floor or 0:.1f})"
        )
        self.save()

    def check_run(self, run: dict[str, Any]) -> dict[str, Any]:
        """The run's stall and compile row (`step_checks`); says so at once when one is found."""
        steps, ttft = run["engine_stats"]["step_ms"], run["summary"]["ttft_s"]
        compiles, gc_pauses = run["engine_stats"]["kernel_compiles"], run["engine_stats"]["gc"]
        row = {
            "run": run["name"],
            "token_budget": self.data["engines"][-1]["token_budget"] if self.data["engines"] else None,
            "steps": steps["count"],
            "median_ms": steps["median"],
            "max_ms": steps["max"],
            "max_over_median": steps["max_over_median"],
            "max_step_tokens": steps["max_step_tokens"],
            "slow_steps": steps["slow_steps"],
            "stall": steps["stall"],
            "max_over_size_median": steps.get("max_over_size_median"),
            "max_step_device_ms": steps.get("max_step_device_ms"),
            "ttft_p99_s": ttft["p99"],
            "kernel_compiles": compiles,
            "gc_full_collections": gc_pauses["full_collections"],
            "gc_max_pause_ms": gc_pauses["max_pause_ms"],
        }
        self.data["step_checks"].append(row)
        if steps["stall"]:
            tqdm.write(
                f"STALL in {run['name']}: max step {steps['max']:.1f} ms = {steps['max_over_median']:.1f}x "
                f"the median {steps['median']:.2f} ms ({steps['slow_steps']} steps over "
                f"{steps['stall_factor']:g}x; the slowest had {steps['max_step_tokens']} tokens and "
                f"{'unmeasured' if steps['max_step_device_ms'] is None else steps['max_step_device_ms']} ms "
                f"on the device; longest garbage-collector pause {gc_pauses['max_pause_ms']:.1f} ms)"
            )
        if compiles:
            tqdm.write(f"FAIL: {compiles} Triton kernel variants compiled during {run['name']}")
        return row

    def add_run(self, run: dict[str, Any], *, workload: str, means: tuple[int, int], offline: bool) -> None:
        self.mark(run["name"], time.perf_counter() - run["summary"]["wall_s"])
        run.update(workload=workload, mean_prompt_tokens=means[0], mean_new_tokens=means[1], offline=offline)
        self.data["runs"].append(run)
        self.check_run(run)
        if offline:
            run["roofline"] = self.offline_roofline(run, self.data["engines"][-1])
            self.data.setdefault("offline_roofline", run["roofline"])
        s = run["summary"]
        itl, ttft = s["token_latency_s"], s["ttft_s"]
        tqdm.write(
            f"{run['name']}: {s['requests_completed']}/{run['requests_planned']} requests "
            f"in {s['wall_s']:.1f} s"
            f"{' (cut at the deadline)' if run['truncated'] else ''}, {s['requests_per_s']:.2f} req/s, "
            f"{s['output_tokens_per_s']:.0f} out tok/s, TTFT p50 {_ms(ttft['p50'])} ms, "
            f"token p50/p99 {_ms(itl['p50'])}/{_ms(itl['p99'])} ms, "
            f"effective g=4 {s['effective_requests_per_s']['4']:.2f} req/s"
        )
        self.progress.update(1)
        self.save()

    def offline_roofline(self, run: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
        ceilings = self.data.get("ceilings") or {}
        if "copy_bytes_per_s" not in ceilings:
            return {"note": "no ceilings measured (no GPU)"}
        model = self.data["model"]
        arithmetic = ShapeArithmetic.from_config(
            model["config"],
            linear_bytes=model.get("linear_bytes"),
            kv_element_bytes=model.get("kv_element_bytes"),
        )
        done = [r for r in run["requests"] if r["completed"]]
        bound = roofline(
            arithmetic,
            [(r["prompt_tokens"], r["output_tokens"]) for r in done],
            matmul_flops_per_s=ceilings["matmul_flops_per_s"],
            copy_bytes_per_s=ceilings["copy_bytes_per_s"],
            kv_capacity_tokens=engine["kv_tokens"],
            max_seqs=engine["config"]["max_seqs"],
        )
        wall = run["summary"]["wall_s"]
        if bound:
            bound["measured_s"] = wall
            bound["measured_over_roofline"] = wall / bound["roofline_s"]
            bound["measured_over_roofline_with_kv"] = wall / bound["roofline_with_kv_s"]
        return bound


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]
    parser.add_argument("--model-shape", default="llama2-7b", choices=sorted(MODEL_SHAPES))
    parser.add_argument(
        "--model-dir", default=None, help="where config.json and the tokenizer go (default: a temp dir)"
    )
    parser.add_argument(
        "--workloads", default="1200-128,2600-60,512-512", help="names or PROMPT-GEN, comma-separated"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the workloads' mean lengths (smoke runs)"
    )
    parser.add_argument("--clients", type=ints, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--offline-requests", type=int, default=512, help="0 skips the offline run")
    parser.add_argument(
        "--batch1", type=ints, default=[128, 256], help="PROMPT,GEN of the batch-1 decode run"
    )
    parser.add_argument("--batch1-repeats", type=int, default=3)
    parser.add_argument(
        "--shared-prefix",
        type=ints,
        default=[],
        help="PREFIX,SUFFIX,GEN: a closed loop whose prompts share PREFIX tokens, against one whose do not",
    )
    parser.add_argument("--shared-prefix-clients", type=int, default=16)
    parser.add_argument(
        "--peer-requests", type=int, default=64, help="requests of the peer's continuous batching (0: none)"
    )
    parser.add_argument(
        "--peer-batch1-tokens", type=int, default=128, help="tokens of the peer's batch-1 run"
    )
    parser.add_argument("--peer-time-limit-s", type=float, default=150.0)
    parser.add_argument(
        "--peer-num-blocks", type=int, default=None, help="HF continuous batching cache blocks"
    )
    parser.add_argument("--peer-max-batch-tokens", type=int, default=None)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--skip-peer-static", action="store_true", help="no batch-1 peer run with a static cache (compiled)"
    )
    parser.add_argument(
        "--time-limit-s", type=float, default=None, help="no new part starts once it is spent"
    )
    parser.add_argument("--max-run-s", type=float, default=None, help="cut any one run after this long")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--token-budget", type=int, default=768, help="the engine of every run but offline")
    parser.add_argument(
        "--offline-token-budgets",
        type=ints,
        default=[],
        help="token budgets of the offline run, each on its own engine (started after the last one "
        "stopped; the --token-budget one is the main engine), e.g. 768,2048,4096 (default: --token-budget)",
    )
    parser.add_argument("--max-seqs", type=int, default=512)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-async-scheduling", action="store_true", help="plan each step after the last")
    parser.add_argument(
        "--no-freeze-gc", action="store_true", help="leave the start-up heap in the garbage collector's scans"
    )
    parser.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 (e4m3) linear weights")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: e4m3 KV")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args(argv)
    if len(args.batch1) != 2:
        parser.error("--batch1 takes PROMPT,GEN")
    return args


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    if os.environ.get("FASTGEN_COMMIT"):  # a tree copied without its .git (git archive) says what it is
        versions["fastgen_commit"] = os.environ["FASTGEN_COMMIT"]
        return versions
    try:

        def git(*command: str) -> str:
            return subprocess.run(
                ["git", *command], cwd=HERE, capture_output=True, text=True, check=True
            ).stdout.strip()

        # a copied working tree (the GPU machine's) may carry an older .git: say when files differ
        dirty = git("status", "--porcelain", "--untracked-files=no")
        versions["fastgen_commit"] = git("rev-parse", "--short", "HEAD") + ("+modified" if dirty else "")
    except Exception:
        versions["fastgen_commit"] = None
    return versions


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status: 1 when a Triton kernel was compiled during a measured run."""
    args = parse_args(argv)
    command = "python benchmarks/serving.py " + " ".join(sys.argv[1:] if argv is None else argv)
    budget = Budget(args.time_limit_s, args.max_run_s)
    report = Report(args.out, command)
    config = MODEL_SHAPES[args.model_shape]
    arithmetic = ShapeArithmetic.from_config(
        config,
        linear_bytes=1 if args.quantization == "fp8" else None,
        kv_element_bytes=1 if args.kv_cache_dtype == "fp8" else None,
    )
    report.data["model"] = {
        "shape": args.model_shape,
        "config": config,
        "params": arithmetic.total_params,
        "decode_weight_bytes": arithmetic.decode_weight_bytes,
        "linear_bytes": arithmetic.linear_bytes,
        "kv_element_bytes": arithmetic.kv_element_bytes,
        "kv_bytes_per_token": arithmetic.kv_bytes_per_token,
    }
    report.data["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / f"fastgen-bench-{args.model_shape}")
    started = time.perf_counter()
    write_model_dir(model_dir, args.model_shape)
    report.mark("model dir", started)

    max_model_len = args.max_model_len or config["max_position_embeddings"]
    workloads = {name: parse_workload(name, args.scale) for name in args.workloads.split(",") if name}
    streams = {
        name: WorkloadStream(p, g, vocab_size=config["vocab_size"], max_model_len=max_model_len)
        for name, (p, g) in workloads.items()
    }
    first = next(iter(workloads))
    offline = streams[first].take(args.offline_requests)
    peer_requests = (offline or streams[first].take(args.peer_requests))[: args.peer_requests]

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.skip_peer and budget.allows("peer"):
        tqdm.write(f"peer: HF transformers, {len(peer_requests)} requests of {first} ...")
        started = time.perf_counter()
        peer = run_peer(
            args, model_dir, peer_requests, (args.batch1[0], args.peer_batch1_tokens),
            config["vocab_size"], budget, device,
        )  # fmt: skip
        report.data["peer"] = peer
        report.mark("peer", started)
        if "error" in peer:
            report.data["errors"].append(f"peer: {peer['error'][:500]}")
        report.data["errors"] += [f"peer {error[:500]}" for error in peer.get("errors", [])]
        cb = (peer.get("continuous_batching") or {}).get("summary")
        if cb:
            tqdm.write(
                f"peer continuous batching: {cb['requests_completed']} requests in {cb['wall_s']:.1f} s, "
                f"{cb['output_tokens_per_s']:.0f} out tok/s"
            )
    if device == "cuda":
        report.data["device"] = torch.cuda.get_device_name()
        try:
            started = time.perf_counter()
            ceilings = measure_ceilings()
            report.mark("ceilings", started)
            ceilings["hbm_floor_s_per_token"] = arithmetic.decode_weight_bytes / ceilings["copy_bytes_per_s"]
            ceilings["hbm_floor_tokens_per_s"] = 1.0 / ceilings["hbm_floor_s_per_token"]
            report.data["ceilings"] = ceilings
        except Exception as exc:
            report.data["errors"].append(f"ceilings: {exc!r}")
        report.free_gpu_bytes_before_start = release_gpu_memory()
    report.data["versions"] = _versions()
    report.save()

    runner = _event_loop_runner()
    try:
        runner.run(bench_fastgen(args, model_dir, report, workloads, streams, offline, budget))
    except Exception as exc:  # keep what was measured; say what broke
        report.data["errors"].append(f"fastgen: {exc!r}")
        tqdm.write(f"fastgen failed: {exc!r}")
    finally:
        runner.close()
    report.progress.close()
    report.data["skipped"] = budget.skipped
    report.data["total_s"] = time.perf_counter() - budget.started
    verdict = compile_verdict(report.data)
    report.data["kernel_compiles"] = verdict
    json_path = report.save()
    plots: list[Path] = []
    try:
        from plots import plot_all

        plots = plot_all(report.data, args.out / report.basename)
    except Exception as exc:
        report.data["errors"].append(f"plots: {exc!r}")
        report.save()
    plot_names = [p.name for p in plots]
    (args.out / f"{report.basename}.md").write_text(markdown_report(report.data, plot_names))
    print(markdown_report(report.data, plot_names, method=False))  # the log's tail keeps the tables
    print(summary_table(report.data, json_path))
    if verdict["status"] == "FAIL":
        print(f"FAIL: {verdict['line']}")
        return 1
    return 0


def _event_loop_runner() -> asyncio.Runner:
    """An asyncio runner on uvloop when it is installed (a cheaper client loop)."""
    with contextlib.suppress(ImportError):
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
