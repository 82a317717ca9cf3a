"""The CPU path: fastgen (an in-process `AsyncEngine` on the CPU, float32) against HF ``generate``
on padded batches, same model, same prompts, greedy, at several batch sizes.

    python benchmarks/cpu_generate.py                      # the default model (SmolLM2-135M-Instruct)
    python benchmarks/cpu_generate.py --model PATH         # a Hugging Face directory or a .gguf file
    python benchmarks/cpu_generate.py --toy                # a tiny random model built on the fly

At each batch size B, both generate ``--new-tokens`` tokens (no early EOS: every request makes
exactly that many) for each of ``--prompts`` chat prompts (the chat template applied when the
tokenizer has one):

- HF: ``model.generate`` on padded batches of B prompts (left padding, attention mask), one batch
  after the other;
- fastgen: B clients, each sending its next prompt when the last one is done (at most B requests
  in the engine, continuous batching), prompts as token ids from the same tokenizer.

Both run in this process with the same torch threads, after an untimed warm-up each; the figure is
output tokens / wall time for all prompts. ``agreement`` is the share of generated positions where
fastgen's greedy token equals HF's (1.0 unless float32 rounding flips a near-tie; left padding may
change HF's numerics at B > 1). Writes a table to stdout and JSON + markdown + PNG (tokens/s against
batch size) to ``--out``, with the command, machine and date.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
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
) -> list[dict]:
    """Warm-up, then each batch size: HF's padded batches, then fastgen's clients."""
    from tqdm import tqdm

    from fastgen import AsyncEngine, EngineConfig

    model = load_hf_model(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    engine = await AsyncEngine.start(path, EngineConfig(device="cpu", dtype="float32", seed=0))
    rows = []
    try:
        warm = prompts[: max(args.batch_sizes)]
        hf_generate(model, warm, len(warm), 4, pad_id)
        await fastgen_generate(engine, warm, len(warm), 4)
        for batch_size in tqdm(args.batch_sizes, desc="batch sizes", unit="batch size"):
            started = time.perf_counter()
            hf_out = hf_generate(model, prompts, batch_size, args.new_tokens, pad_id)
            hf_s = time.perf_counter() - started
            started = time.perf_counter()
            fastgen_out = await fastgen_generate(engine, prompts, batch_size, args.new_tokens)
            fastgen_s = time.perf_counter() - started
            tokens = len(prompts) * args.new_tokens
            assert all(len(out) == args.new_tokens for out in fastgen_out + hf_out), "a request stopped early"
            row = {
                "batch_size": batch_size,
                "output_tokens": tokens,
                "fastgen_s": fastgen_s,
                "fastgen_tokens_per_s": tokens / fastgen_s,
                "hf_s": hf_s,
                "hf_tokens_per_s": tokens / hf_s,
                "fastgen_over_hf": hf_s / fastgen_s,
                "agreement": agreement(fastgen_out, hf_out),
            }
            tqdm.write(
                f"batch {batch_size}: fastgen {fastgen_s:.2f} s ({row['fastgen_tokens_per_s']:.1f} tok/s), "
                f"HF {hf_s:.2f} s ({row['hf_tokens_per_s']:.1f} tok/s), "
                f"fastgen/HF {row['fastgen_over_hf']:.2f}x"
            )
            rows.append(row)
    finally:
        await engine.stop()
    return rows


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
        f"- machine: {data['machine']}; torch threads {data['torch_threads']}",
        f"- versions: {data['versions']}",
        f"- model: `{data['model']}`, float32; {data['prompts']} "
        f"{'chat' if data['chat_template'] else 'plain'} prompts ({data['prompt_tokens_mean']:.0f} tokens "
        f"on average) x {data['new_tokens']} new tokens, greedy",
        "",
        "| batch size | fastgen s | fastgen tok/s | HF s | HF tok/s | fastgen / HF | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['batch_size']} | {row['fastgen_s']:.2f} | {row['fastgen_tokens_per_s']:.1f} | "
            f"{row['hf_s']:.2f} | {row['hf_tokens_per_s']:.1f} | {row['fastgen_over_hf']:.2f}x | "
            f"{row['agreement']:.0%} |"
        )
    slower = [row["batch_size"] for row in data["rows"] if row["fastgen_over_hf"] < 1.0]
    lines += [
        "",
        "fastgen is at least as fast as HF at every batch size."
        if not slower
        else f"fastgen is slower than HF at batch sizes {', '.join(map(str, slower))}.",
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
    sizes = [row["batch_size"] for row in rows]
    ax.plot(sizes, [row["fastgen_tokens_per_s"] for row in rows], "-o", label="fastgen (continuous batching)")
    ax.plot(sizes, [row["hf_tokens_per_s"] for row in rows], "--s", label="HF generate (padded batches)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    from fastgen.models.checkpoint import load_tokenizer, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/cpu_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.toy:
        path = str(build_toy(Path(tempfile.gettempdir()) / "fastgen-cpu-generate-toy"))
    else:
        path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    prompts, chat = chat_prompts(tokenizer, args.prompts)
    rows = asyncio.run(measure(args, path, tokenizer, prompts))

    from serving import _versions

    stamp = datetime.datetime.now(datetime.UTC)
    data = {
        "command": command,
        "date": stamp.isoformat(timespec="seconds"),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "model": path,
        "chat_template": chat,
        "prompts": len(prompts),
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "new_tokens": args.new_tokens,
        "rows": rows,
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
