"""The CPU path: fastgen (an in-process `AsyncEngine` on the CPU, float32) against HF ``generate``
on padded batches, same model, same prompts, greedy, at several batch sizes.

    python benchmarks/cpu_generate.py                      # the default model (SmolLM2-135M-Instruct)
    python benchmarks/cpu_generate.py --model PATH         # a Hugging Face directory or a .gguf file
    python benchmarks/cpu_generate.py --toy                # a tiny random model built on the fly
    PYTHONPATH=/tmp/base python benchmarks/cpu_generate.py # another fastgen: a baseline worktree
                                                           # (with fastgen/kernels linked to its kernels)

At each batch size B, both generate ``--new-tokens`` tokens (no early EOS: every request makes
exactly that many) for each of ``--prompts`` chat prompts (the chat template applied when the
tokenizer has one):

- HF: ``model.generate`` on padded batches of B prompts (left padding, attention mask), one wave
  after the other;
- fastgen: the same waves, B requests at once into the engine (continuous batching), prompts as
  token ids from the same tokenizer; prefix caching off, since every round repeats the prompts
  (HF recomputes them each time).

Both run in this process with the same number of torch threads (``--threads``, a list: each count
is measured in turn; HF's set with ``torch.set_num_threads``, fastgen's with
``EngineConfig.cpu_threads`` on its runner thread, an engine per count), after an untimed warm-up
each; the figure is output tokens / wall time for all prompts. The machine may be shared, so the
two are measured interleaved: each of ``--repeats`` rounds runs every (threads, batch size) point,
where HF and fastgen take turns a wave of B prompts at a time (who goes first alternates), and the
table reports each side's median over the rounds, the median of the rounds' ratios, CPU seconds
(less sensitive to load than wall time) and the 1-minute load average seen before each wave.
``agreement`` is the share of generated positions where fastgen's greedy token equals HF's (1.0
unless float32 rounding flips a near-tie; left padding may change HF's numerics at B > 1). Writes
a table to stdout and JSON + markdown + PNG (tokens/s against batch size) to ``--out``, with the
command, machine, date and the fastgen measured (its checkout and commit: run the same script with
another fastgen first on ``PYTHONPATH`` for a before/after; the ratio to HF, measured alongside in
each run, is what compares across runs on a loaded machine).

Ceilings, measured in the same run at each thread count, at its start and its end: the memory read
bandwidth (the best of a few sums over a 512 MiB tensor) and the float32 matmul rate (the best of
a few 1024^3 products).
A step of B decodes reads every weight once and does 2 FLOPs per weight and token, so B / max(weight
bytes / bandwidth, B * 2 * parameters / matmul rate) bounds tokens/s (KV reads, attention and
prefill left out: at these lengths they are small). ``--cli`` also times ``fastgen generate`` (a
fresh process: start-up, then one answer; threads through ``OMP_NUM_THREADS``, which every fastgen
honours). ``--reference-attention`` adds a third side taking its turn: the same engine with the
per-sequence reference attention (``FASTGEN_KERNELS=reference``), the attention's before/after in
one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines work?",
    "Suggest a name for a friendly robot.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "What are prime numbers? Give examples.",
    "Describe a healthy breakfast.",
    "How does a bicycle stay upright?",
    "Write a short thank-you note to a teacher.",
    "What causes the seasons on Earth?",
    "List four planets of the solar system.",
]


# -- the model and the prompts ---------------------------------------------------------------------


def build_toy(folder: Path) -> Path:
    """A tiny Llama with seeded random weights saved as safetensors, with a byte-level tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from workloads import write_model_dir

    write_model_dir(folder, "tiny")
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
        model.save_pretrained(folder)
    return folder


def load_hf_model(path: str) -> Any:
    """HF's model of ``path`` (a directory, or a GGUF file that HF dequantizes as fastgen does)."""
    import torch
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        gguf = Path(path)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # every request runs to its max_new_tokens
    return model


def chat_prompts(tokenizer: Any, count: int) -> tuple[list[list[int]], bool]:
    """``count`` prompts as token ids (cycling through QUESTIONS), and whether a chat template made them."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    if getattr(tokenizer, "chat_template", None):
        prompts = []
        for question in questions:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
            )
            prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        return prompts, True
    return [tokenizer.encode(question, add_special_tokens=False) for question in questions], False


# -- the two engines -------------------------------------------------------------------------------


def hf_generate(model: Any, prompts: list[list[int]], batch_size: int, new_tokens: int, pad_id: int) -> list:
    """Greedy ``generate`` on left-padded batches of ``batch_size`` prompts, one after the other."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad_id,
    )
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            generated = model.generate(input_ids, attention_mask=mask, generation_config=config)
        outputs += generated[:, width:].tolist()
    return outputs


async def fastgen_generate(engine: Any, prompts: list[list[int]], clients: int, new_tokens: int) -> list:
    """``clients`` closed-loop clients over the prompts; each request's generated ids, in prompt order."""
    from fastgen import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    outputs: list[list[int]] = [[] for _ in prompts]
    queue = list(range(len(prompts)))[::-1]

    async def client() -> None:
        while queue:
            index = queue.pop()
            async for out in engine.generate(prompts[index], params):
                outputs[index] += out.token_ids

    await asyncio.gather(*(client() for _ in range(min(clients, len(prompts)))))
    return outputs


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two sets of generated ids agree."""
    pairs = [(x, y) for seq_a, seq_b in zip(a, b, strict=True) for x, y in zip(seq_a, seq_b, strict=False)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


# -- the run -----------------------------------------------------------------------------------------


async def measure(
    args: argparse.Namespace, path: str, tokenizer: Any, prompts: list[list[int]]
) -> tuple[list[dict], dict[str, Any]]:
    """The ceilings; a warm-up, then ``args.repeats`` rounds over every (threads, batch size) point;
    within a point, HF and fastgen take turns wave by wave (a wave: the next B prompts), so that a
    change of load on a shared machine lands on both."""
    import torch
    from tqdm import tqdm

    from fastgen import AsyncEngine, EngineConfig

    model = load_hf_model(path)
    ceiling = ceilings(model, args.threads, args.batch_sizes)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # every round sends the same prompts again: a prefix cache would skip their prefill from the
    # second time on, which HF cannot, so it is off
    config = EngineConfig(device="cpu", dtype="float32", seed=0, enable_prefix_caching=False)
    # an engine per thread count: its runner thread keeps the count it starts with. A fastgen
    # without EngineConfig.cpu_threads takes the process's count, which its new runner thread reads
    # at its first parallel op.
    engines = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        options = {"cpu_threads": threads} if "cpu_threads" in EngineConfig.__struct_fields__ else {}
        engines[threads] = await AsyncEngine.start(path, config.replace(**options))
    points = [(threads, batch_size) for threads in args.threads for batch_size in args.batch_sizes]
    sides = ("hf", "fastgen") + (("fastgen-reference",) if args.reference_attention else ())
    # per (threads, batch size, side): wall and CPU seconds of each round; the last round's outputs
    wall: dict[tuple[int, int, str], list[float]] = {}
    cpu: dict[tuple[int, int, str], list[float]] = {}
    loads: dict[tuple[int, int], list[float]] = {}
    outputs: dict[tuple[int, int, str], list[list[int]]] = {}

    async def run(side: str, wave: list[list[int]], threads: int) -> list[list[int]]:
        if side == "hf":
            return hf_generate(model, wave, len(wave), args.new_tokens, pad_id)
        if side == "fastgen":
            return await fastgen_generate(engines[threads], wave, len(wave), args.new_tokens)
        # the same engine with the per-sequence reference attention (FASTGEN_KERNELS=reference); the
        # kernels choose their path at each call, and the engine is idle between waves
        from fastgen.kernels import _dispatch

        chosen = _dispatch._forced_reference
        _dispatch._forced_reference = lambda: True
        try:
            return await fastgen_generate(engines[threads], wave, len(wave), args.new_tokens)
        finally:
            _dispatch._forced_reference = chosen

    try:
        warm = prompts[: max(args.batch_sizes)]
        hf_generate(model, warm, len(warm), 4, pad_id)
        for engine in engines.values():
            await fastgen_generate(engine, warm, len(warm), 4)
        progress = tqdm(total=args.repeats * len(points), desc="runs", unit="point")
        for round_index in range(args.repeats):
            for threads, batch_size in points:
                torch.set_num_threads(threads)  # HF's, in this thread; fastgen's engine has its own
                point = (threads, batch_size)
                spent = {side: [0.0, 0.0] for side in sides}  # wall s, CPU s
                generated: dict[str, list[list[int]]] = {side: [] for side in sides}
                for wave_index, start in enumerate(range(0, len(prompts), batch_size)):
                    wave = prompts[start : start + batch_size]
                    loads.setdefault(point, []).append(os.getloadavg()[0])
                    turn = (round_index + wave_index) % len(sides)  # who goes first rotates
                    for side in sides[turn:] + sides[:turn]:
                        wall_start, cpu_start = time.perf_counter(), time.process_time()
                        out = await run(side, wave, threads)
                        spent[side][0] += time.perf_counter() - wall_start
                        spent[side][1] += time.process_time() - cpu_start
                        stopped_early = any(len(ids) != args.new_tokens for ids in out)
                        assert not stopped_early, f"a {side} request stopped early"
                        generated[side] += out
                for side in sides:
                    wall.setdefault((*point, side), []).append(spent[side][0])
                    cpu.setdefault((*point, side), []).append(spent[side][1])
                    outputs[(*point, side)] = generated[side]
                progress.write(
                    f"round {round_index + 1}, {threads} thread(s), batch {batch_size}: "
                    + ", ".join(
                        f"{side} {spent[side][0]:.2f} s ({spent[side][1]:.2f} CPU s)" for side in sides
                    )
                    + f" (load {loads[point][-1]:.1f})"
                )
                progress.update()
        progress.close()
    finally:
        for engine in engines.values():
            await engine.stop()
    ceiling = ceilings(model, args.threads, args.batch_sizes, earlier=ceiling)
    rows = []
    tokens = len(prompts) * args.new_tokens
    for threads, batch_size in points:
        point = (threads, batch_size)
        fastgen_all, hf_all = wall[(*point, "fastgen")], wall[(*point, "hf")]
        fastgen_s, hf_s = statistics.median(fastgen_all), statistics.median(hf_all)
        rows.append(
            {
                "threads": threads,
                "batch_size": batch_size,
                "output_tokens": tokens,
                "fastgen_s": fastgen_s,
                "fastgen_tokens_per_s": tokens / fastgen_s,
                "hf_s": hf_s,
                "hf_tokens_per_s": tokens / hf_s,
                # the median of each round's ratio: a round's two sides saw the same load
                "fastgen_over_hf": statistics.median(h / f for h, f in zip(hf_all, fastgen_all, strict=True)),
                "fastgen_s_all": fastgen_all,
                "hf_s_all": hf_all,
                "fastgen_cpu_s": statistics.median(cpu[(*point, "fastgen")]),
                "hf_cpu_s": statistics.median(cpu[(*point, "hf")]),
                "load_avg_1min": statistics.median(loads[point]),
                "load_avg_1min_range": [min(loads[point]), max(loads[point])],
                "agreement": agreement(outputs[(*point, "fastgen")], outputs[(*point, "hf")]),
                "ceiling_tokens_per_s": ceiling["threads"][threads]["tokens_per_s"][batch_size],
            }
        )
        if args.reference_attention:
            reference_all = wall[(*point, "fastgen-reference")]
            rows[-1] |= {
                "fastgen_reference_s": statistics.median(reference_all),
                "fastgen_reference_s_all": reference_all,
                "fastgen_reference_cpu_s": statistics.median(cpu[(*point, "fastgen-reference")]),
                "reference_over_fastgen": statistics.median(
                    r / f for r, f in zip(reference_all, fastgen_all, strict=True)
                ),
                "reference_agreement": agreement(
                    outputs[(*point, "fastgen-reference")], outputs[(*point, "fastgen")]
                ),
            }
    return rows, ceiling


def ceilings(
    model: Any, thread_counts: list[int], batch_sizes: list[int], earlier: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Measured read bandwidth and matmul rate at each thread count, the best of this measurement
    and ``earlier`` (other processes lower both: a run measures at its start and its end), and the
    decode tokens/s they allow at each batch size (see the module docstring)."""
    import torch

    params = sum(p.numel() for p in model.parameters())  # a tied embedding counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    big = torch.ones(128 * 2**20)  # 512 MiB, far past any cache
    left, right = torch.randn(1024, 1024), torch.randn(1024, 1024)
    by_threads = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        read_s, matmul_s = [], []
        for _ in range(5):
            started = time.perf_counter()
            big.sum()
            read_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            torch.mm(left, right)
            matmul_s.append(time.perf_counter() - started)
        bandwidth = big.numel() * 4 / min(read_s)
        flops = 2 * 1024**3 / min(matmul_s)
        if earlier is not None:
            bandwidth = max(bandwidth, earlier["threads"][threads]["read_gb_per_s"] * 1e9)
            flops = max(flops, earlier["threads"][threads]["matmul_gflop_per_s"] * 1e9)
        by_threads[threads] = {
            "read_gb_per_s": bandwidth / 1e9,
            "matmul_gflop_per_s": flops / 1e9,
            "tokens_per_s": {
                batch: batch / max(weight_bytes / bandwidth, batch * 2 * params / flops)
                for batch in batch_sizes
            },
        }
    return {"parameters": params, "weight_bytes": weight_bytes, "threads": by_threads}


def cli_runs(thread_counts: list[int], new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """``fastgen generate`` (the default model, a chat prompt, greedy, exactly ``new_tokens``) in a
    fresh process per run: wall seconds from launch to exit, and the generation's own tokens/s."""
    runs = []
    for threads in thread_counts:
        for _ in range(repeats):
            program = "import sys; from fastgen.cli import main; sys.exit(main())"
            command = [sys.executable, "-c", program, "generate", "--max-new-tokens", str(new_tokens)]
            command += ["--ignore-eos", "Write a haiku about paged attention"]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            wall_s = time.perf_counter() - started
            found = re.search(r"(\d+) generated in ([\d.]+) s \(([\d.]+) tokens/s", done.stdout + done.stderr)
            assert found, done.stdout[-500:] + done.stderr[-500:]
            runs.append({
                "threads": threads,
                "wall_s": wall_s,
                "generated": int(found[1]),
                "generate_s": float(found[2]),
                "tokens_per_s": float(found[3]),
                "load_avg_1min": os.getloadavg()[0],
            })  # fmt: skip
    return runs


def fastgen_source() -> str:
    """Which fastgen this process measures: its checkout, commit, and whether it has changes."""
    import fastgen

    folder = Path(fastgen.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "fastgen", "kernels"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return str(folder)
    return f"{folder} at {commit}" + (" with uncommitted changes" if changes else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, python {platform.python_version()}"


def markdown(data: dict[str, Any], plot_name: str | None, method: bool = True) -> str:
    lines = [
        "# CPU generation: fastgen vs HF `generate` (padded batches)",
        "",
        f"- command: `{data['command']}`",
        f"- date: {data['date']}",
        f"- machine: {data['machine']}; torch threads {', '.join(map(str, data['threads']))} "
        f"(the same for both); 1-minute load average {data['load_avg_1min']:.1f} "
        f"(median over the runs; {data['load_avg_1min_range'][0]:.1f}-{data['load_avg_1min_range'][1]:.1f})",
        f"- fastgen: {data['fastgen']}",
        f"- versions: {data['versions']}",
        f"- model: `{data['model']}`, float32; {data['prompts']} "
        f"{'chat' if data['chat_template'] else 'plain'} prompts ({data['prompt_tokens_mean']:.0f} tokens "
        f"on average) x {data['new_tokens']} new tokens, greedy",
        f"- medians of {data['repeats']} rounds; in each, HF and fastgen take turns wave by wave (B prompts "
        "at a time) at every point. Seconds: wall time for all prompts (CPU: this process's CPU time, "
        "all threads); tok/s from the median; fastgen / HF: the median of the rounds' ratios",
        "",
        "- ceiling: decode tokens/s that the measured read bandwidth and matmul rate allow "
        f"({data['ceilings']['parameters'] / 1e6:.1f} M parameters, "
        f"{data['ceilings']['weight_bytes'] / 2**20:.0f} MiB of weights read per step); "
        + "; ".join(
            f"{threads} thread(s): {c['read_gb_per_s']:.1f} GB/s, {c['matmul_gflop_per_s']:.0f} GFLOP/s"
            for threads, c in data["ceilings"]["threads"].items()
        ),
        "",
        "| threads | batch size | fastgen s | fastgen tok/s | HF s | HF tok/s | fastgen / HF "
        "| fastgen CPU s | HF CPU s | load | agreement | ceiling tok/s | fastgen / ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['threads']} | {row['batch_size']} | {row['fastgen_s']:.2f} | "
            f"{row['fastgen_tokens_per_s']:.1f} | {row['hf_s']:.2f} | {row['hf_tokens_per_s']:.1f} | "
            f"{row['fastgen_over_hf']:.2f}x | {row['fastgen_cpu_s']:.2f} | {row['hf_cpu_s']:.2f} | "
            f"{row['load_avg_1min']:.1f} | {row['agreement']:.0%} | {row['ceiling_tokens_per_s']:.1f} | "
            f"{row['fastgen_tokens_per_s'] / row['ceiling_tokens_per_s']:.0%} |"
        )
    slower = [
        f"{row['batch_size']} ({row['threads']} threads)"
        for row in data["rows"]
        if row["fastgen_over_hf"] < 1.0
    ]
    lines += [
        "",
        "fastgen is at least as fast as HF at every batch size (medians)."
        if not slower
        else f"fastgen is slower than HF at batch sizes {', '.join(slower)} (medians).",
    ]
    if "reference_over_fastgen" in data["rows"][0]:
        lines += [
            "",
            "fastgen with the per-sequence reference attention (the CPU attention before "
            "`paged_attention_cpu`), in turn with the others:",
            "",
            "| threads | batch size | reference s | reference CPU s | fastgen CPU s | reference / fastgen "
            "| same tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['threads']} | {row['batch_size']} | {row['fastgen_reference_s']:.2f} | "
            f"{row['fastgen_reference_cpu_s']:.2f} | {row['fastgen_cpu_s']:.2f} | "
            f"{row['reference_over_fastgen']:.2f}x | {row['reference_agreement']:.0%} |"
            for row in data["rows"]
        ]
    if data["cli"]:
        lines += [
            "",
            "`fastgen generate` (a fresh process each run; launch to exit, and its own tokens/s):",
            "",
            "| threads | wall s | generated | generate s | tok/s | load |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {run['threads']} | {run['wall_s']:.2f} | {run['generated']} | {run['generate_s']:.2f} | "
            f"{run['tokens_per_s']:.1f} | {run['load_avg_1min']:.1f} |"
            for run in data["cli"]
        ]
    if plot_name:
        lines += ["", f"![tokens/s against batch size]({plot_name})"]
    if method:
        lines += ["", "## Method", "", __doc__ or ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, threads in enumerate(sorted({row["threads"] for row in rows})):
        mine = [row for row in rows if row["threads"] == threads]
        sizes = [row["batch_size"] for row in mine]
        color = f"C{index}"
        for key, style, name in (
            ("fastgen", "-o", "fastgen (continuous batching)"),
            ("hf", "--s", "HF generate (padded batches)"),
        ):
            tokens = [row["output_tokens"] for row in mine]
            fastest = [t / min(row[f"{key}_s_all"]) for t, row in zip(tokens, mine, strict=True)]
            slowest = [t / max(row[f"{key}_s_all"]) for t, row in zip(tokens, mine, strict=True)]
            median = [row[f"{key}_tokens_per_s"] for row in mine]
            ax.errorbar(
                sizes,
                median,
                yerr=[
                    [m - s for m, s in zip(median, slowest, strict=True)],
                    [f - m for m, f in zip(median, fastest, strict=True)],
                ],
                fmt=style,
                color=color,
                capsize=3,
                alpha=1.0 if key == "fastgen" else 0.6,
                label=f"{name}, {threads} thread{'s' if threads > 1 else ''}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("output tokens/s (median, bars: range)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a HF directory or .gguf file (default: the engine's)")
    parser.add_argument(
        "--toy", action="store_true", help="a tiny random model built on the fly (smoke runs)"
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--batch-sizes", type=lambda text: [int(x) for x in text.split(",")], default=[1, 2, 4, 8, 16]
    )
    parser.add_argument(
        "--threads",
        type=lambda text: [int(x) for x in text.split(",")],
        default=None,
        help="torch thread counts to measure, e.g. 1,2 (default: fastgen's, fastgen.runner.cpu_threads)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians reported")
    parser.add_argument(
        "--reference-attention",
        action="store_true",
        help="also run fastgen with the per-sequence reference attention, in turn with the others",
    )
    parser.add_argument("--cli", action="store_true", help="also time `fastgen generate` (the default model)")
    parser.add_argument("--cli-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    from fastgen.models.checkpoint import load_tokenizer, resolve_model

    if not args.threads:
        from fastgen import EngineConfig, runner

        if hasattr(runner, "cpu_threads"):
            args.threads = [runner.cpu_threads(EngineConfig())]
        else:  # a fastgen before EngineConfig.cpu_threads: torch's own count
            import torch

            args.threads = [torch.get_num_threads()]
    command = "python benchmarks/cpu_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.toy:
        path = str(build_toy(Path(tempfile.gettempdir()) / "fastgen-cpu-generate-toy"))
    else:
        path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    prompts, chat = chat_prompts(tokenizer, args.prompts)
    rows, ceiling = asyncio.run(measure(args, path, tokenizer, prompts))
    cli = cli_runs(args.threads, args.cli_new_tokens, args.repeats) if args.cli else []

    from serving import _versions

    stamp = datetime.datetime.now(datetime.UTC)
    data = {
        "command": command,
        "date": stamp.isoformat(timespec="seconds"),
        "machine": machine(),
        "fastgen": fastgen_source(),
        "threads": args.threads,
        "repeats": args.repeats,
        "load_avg_1min": statistics.median(row["load_avg_1min"] for row in rows),
        "load_avg_1min_range": [
            min(row["load_avg_1min_range"][0] for row in rows),
            max(row["load_avg_1min_range"][1] for row in rows),
        ],
        "versions": _versions(),
        "model": path,
        "chat_template": chat,
        "prompts": len(prompts),
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "new_tokens": args.new_tokens,
        "rows": rows,
        "ceilings": ceiling,
        "cli": cli,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    model_name = re.sub(r"[^a-z0-9]+", "-", Path(path).name.lower()).strip("-")
    stem = args.out / f"cpu_generate-{model_name}-{os.cpu_count()}cores-{stamp:%Y%m%d-%H%M}"
    plot_name = None
    try:
        title = (
            f"{Path(path).name}, {len(prompts)} prompts x {args.new_tokens} tokens, {os.cpu_count()} cores"
        )
        plot_name = plot(rows, stem.with_suffix(".png"), title).name
    except Exception as exc:  # the figures are in the table either way
        print(f"no plot: {exc!r}", file=sys.stderr)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    stem.with_suffix(".md").write_text(markdown(data, plot_name))
    print(markdown(data, plot_name, method=False))
    print(f"\nwrote {stem}.json, .md{', .png' if plot_name else ''}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
