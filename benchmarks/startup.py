"""Engine start-up, cold and warm: seconds to ready and to the first token, and the Triton kernels
compiled after start-up, each in a fresh process.

    python benchmarks/startup.py --model-shape llama3-8b --out benchmarks/results

Each run is a new Python process that imports fastgen, starts an `AsyncEngine` with dummy weights
of the shape, sends one request (``--first-prompt`` tokens, one new token), then a short warm
workload like the serving benchmark's warm-up (8 requests of each ``--workloads`` workload with
4..18 new tokens, all at once, and one batch-1 decode), and reports ``EngineStats.kernel_compiles``
(Triton kernel variants compiled since the engine became ready: the goal is none). The first run
gets a new, empty ``TRITON_CACHE_DIR`` (cold: every kernel is compiled), the second the same
directory (warm: Triton loads what the first compiled from disk). Times run from the moment the
parent spawned the process, so the interpreter's start and the imports count.

Writes a table to stdout and JSON + markdown to ``--out`` (startup-<device>-<date>.*).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# -- the child: one engine start ------------------------------------------------------------------


async def start_once(args: argparse.Namespace, spawned_at: float) -> dict[str, Any]:
    """Import, start, first token, warm workload; times in seconds since ``spawned_at`` (time.time)."""
    since = lambda: time.time() - spawned_at
    result: dict[str, Any] = {"interpreter_s": since()}
    import torch

    from fastgen import AsyncEngine, EngineConfig, SamplingParams

    result["imported_s"] = since()
    from workloads import SEED, WorkloadStream, fixed_request, parse_workload

    options: dict[str, Any] = {
        "load_format": "dummy",
        "token_budget": args.token_budget,
        "max_seqs": args.max_seqs,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "seed": SEED,
    }
    if args.num_kv_blocks is not None:
        options["num_kv_blocks"] = args.num_kv_blocks
    engine = await AsyncEngine.start(args.model_dir, EngineConfig(**options))
    result["ready_s"] = since()
    compiles = lambda: getattr(engine.stats(), "kernel_compiles", None)
    result["kernel_compiles_at_ready"] = compiles()
    try:
        vocab = engine.model_config.vocab_size
        first = fixed_request(args.first_prompt, 1, vocab, seed=SEED + 11)
        async for out in engine.generate(first.prompt_token_ids, SamplingParams(max_new_tokens=1)):
            if out.token_ids and "first_token_s" not in result:
                result["first_token_s"] = since()
        result["kernel_compiles_after_first_token"] = compiles()

        warm_started = time.perf_counter()
        requests = []
        for name in args.workloads.split(","):
            prompt, gen = parse_workload(name, args.scale)
            stream = WorkloadStream(
                prompt, gen, vocab_size=vocab, max_model_len=engine.max_model_len, seed=SEED + 1
            )
            requests += [
                (r.prompt_token_ids, min(r.max_new_tokens, 4 + 2 * i)) for i, r in enumerate(stream.take(8))
            ]

        async def one(prompt: list[int], new_tokens: int) -> None:
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            async for _ in engine.generate(prompt, params):
                pass

        await asyncio.gather(*(one(prompt, new) for prompt, new in requests))
        decode = fixed_request(min(128, args.first_prompt), args.decode_tokens, vocab, seed=SEED + 12)
        await one(decode.prompt_token_ids, decode.max_new_tokens)
        result["warm_workload_s"] = time.perf_counter() - warm_started
        result["warm_workload_requests"] = len(requests) + 1
        result["kernel_compiles_after_warm_workload"] = compiles()
        stats = engine.stats()
        result["kv_blocks"] = stats.num_kv_blocks
        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    finally:
        await engine.stop()
    return result


def child_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    result = asyncio.run(start_once(args, args.spawned_at))
    Path(args.result).write_text(json.dumps(result))


# -- the parent: cold, then warm ------------------------------------------------------------------


def cache_contents(path: Path) -> dict[str, int]:
    files = [f for f in path.rglob("*") if f.is_file()]
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def run_child(args: argparse.Namespace, label: str, model_dir: Path, cache_dir: Path, work_dir: Path) -> dict:
    """One fresh process with ``TRITON_CACHE_DIR=cache_dir``; its result, or the error."""
    result_file = work_dir / f"{label}.json"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child",
        "--model-dir", str(model_dir), "--result", str(result_file),
        "--token-budget", str(args.token_budget), "--max-seqs", str(args.max_seqs),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--first-prompt", str(args.first_prompt), "--decode-tokens", str(args.decode_tokens),
        "--workloads", args.workloads, "--scale", str(args.scale),
    ]  # fmt: skip
    if args.num_kv_blocks is not None:
        command += ["--num-kv-blocks", str(args.num_kv_blocks)]
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache_dir), "TOKENIZERS_PARALLELISM": "false"}
    spawned_at = time.time()
    command += ["--spawned-at", repr(spawned_at)]
    result: dict[str, Any] = {"run": label, "triton_cache_before": cache_contents(cache_dir)}
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=args.run_timeout_s, check=False
        )
        result["process_s"] = time.time() - spawned_at
        if done.returncode != 0:
            result["error"] = f"exited with {done.returncode}: {done.stderr[-2000:]}"
        elif result_file.is_file():
            result.update(json.loads(result_file.read_text()))
        else:
            result["error"] = "no result written"
    except subprocess.TimeoutExpired:
        result["error"] = f"killed after {args.run_timeout_s:.0f} s"
    result["triton_cache_after"] = cache_contents(cache_dir)
    return result


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Engine start-up, cold and warm Triton cache",
        "",
        f"- command: `{data['command']}`",
        f"- date: {data['date']}",
        f"- device: {data['device']}; machine: {data['machine']}",
        f"- versions: {data['versions']}",
        f"- model: {data['model_shape']} shape, dummy weights; token budget {data['args']['token_budget']}",
        "- times in seconds from the spawn of a fresh process (interpreter and imports included); "
        "kernels compiled = `EngineStats.kernel_compiles` (Triton variants compiled since ready)",
        "",
        "| run | imports done s | ready s | first token s | warm workload s | kernels compiled: "
        "first token / after warm workload | Triton cache files before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        if "error" in run:
            lines.append(f"| {run['run']} | error: {run['error'][:200]} | | | | | |")
            continue
        compiled = " / ".join(
            "?" if run.get(key) is None else str(run[key])
            for key in ("kernel_compiles_after_first_token", "kernel_compiles_after_warm_workload")
        )
        lines.append(
            f"| {run['run']} | {run['imported_s']:.1f} | {run['ready_s']:.1f} | {run['first_token_s']:.2f} | "
            f"{run['warm_workload_s']:.2f} | {compiled} | "
            f"{run['triton_cache_before']['files']} -> {run['triton_cache_after']['files']} |"
        )
    lines += ["", data["verdict"]]
    return "\n".join(lines)


def verdict(runs: list[dict[str, Any]]) -> str:
    """One line: cold and warm time to ready, and whether anything compiled after start-up."""
    by_label = {run["run"]: run for run in runs if "error" not in run}
    if set(by_label) != {"cold", "warm"}:
        return "Not measured: " + "; ".join(
            f"{run['run']}: {run['error'][:300]}" for run in runs if "error" in run
        )
    cold, warm = by_label["cold"], by_label["warm"]
    compiled = [
        f"{run['run']} {run['kernel_compiles_after_warm_workload']}"
        for run in (cold, warm)
        if run.get("kernel_compiles_after_warm_workload")
    ]
    unknown = any(run.get("kernel_compiles_after_warm_workload") is None for run in (cold, warm))
    after = (
        "unknown (the engine does not count kernel compiles)"
        if unknown
        else ("none" if not compiled else "**" + ", ".join(compiled) + "**")
    )
    return (
        f"Ready after {cold['ready_s']:.1f} s cold, {warm['ready_s']:.1f} s warm "
        f"({cold['ready_s'] / warm['ready_s']:.1f}x); first token {cold['first_token_s']:.1f} / "
        f"{warm['first_token_s']:.1f} s; kernels compiled after start-up: {after}."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", default="llama3-8b")
    parser.add_argument("--model-dir", default=None, help="config and tokenizer (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--token-budget", type=int, default=768)
    parser.add_argument("--max-seqs", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--first-prompt", type=int, default=128, help="prompt tokens of the first request")
    parser.add_argument("--decode-tokens", type=int, default=32, help="new tokens of the warm batch-1 decode")
    parser.add_argument("--workloads", default="1200-128,2600-60", help="the warm workload's shapes")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the workloads' lengths (smoke runs)"
    )
    parser.add_argument("--triton-cache-dir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--run-timeout-s", type=float, default=300.0)
    # the child's own arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    from tqdm import tqdm

    sys.path.insert(0, str(HERE))
    from serving import _versions
    from workloads import write_model_dir

    command = "python benchmarks/startup.py " + " ".join(sys.argv[1:] if argv is None else argv)
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / f"fastgen-bench-{args.model_shape}")
    write_model_dir(model_dir, args.model_shape)
    cache_dir = args.triton_cache_dir or Path(tempfile.mkdtemp(prefix="fastgen-triton-cache-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    if any(cache_dir.iterdir()):
        print(f"warning: {cache_dir} is not empty: the cold run is not cold", file=sys.stderr)
    work_dir = Path(tempfile.mkdtemp(prefix="fastgen-startup-"))
    runs = []
    for label in tqdm(("cold", "warm"), desc="engine starts", unit="start"):
        run = run_child(args, label, model_dir, cache_dir, work_dir)
        if "error" in run:
            tqdm.write(f"{label}: {run['error'][-500:]}")
        else:
            tqdm.write(
                f"{label}: ready {run['ready_s']:.1f} s, first token {run['first_token_s']:.2f} s, kernels "
                f"compiled after the warm workload: {run['kernel_compiles_after_warm_workload']}"
            )
        runs.append(run)
    stamp = datetime.datetime.now(datetime.UTC)
    device = next((run["device"] for run in runs if "device" in run), "unknown")
    data = {
        "command": command,
        "date": stamp.isoformat(timespec="seconds"),
        "device": device,
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "versions": _versions(),
        "model_shape": args.model_shape,
        "triton_cache_dir": str(cache_dir),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "verdict": verdict(runs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-").removeprefix("nvidia-") or "cpu"
    base = args.out / f"startup-{name}-{stamp:%Y%m%d-%H%M}"
    base.with_suffix(".json").write_text(json.dumps(data, indent=1))
    report = markdown(data)
    base.with_suffix(".md").write_text(report)
    print(report)
    print(f"\nfull results: {base.with_suffix('.json')}")
    return 0 if all("error" not in run for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
