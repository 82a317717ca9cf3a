"""Decode step time of the model runner at several batch sizes, CUDA graphs on and off, next to
the HBM floor (weight + KV bytes / measured copy bandwidth). GPU only.

    python benchmarks/decode_step.py [--shape llama2-7b] [--context 1024] [--batches 1 8 32 64 128]

With ``--fusions-off`` it measures each fused kernel against the kernels it replaces: one fresh
process per setting (``FASTGEN_FUSIONS_OFF`` is read once a process), CUDA-graph steps at batches
1 and 8 unless ``--batches`` says otherwise, one table. A setting is a fusion's name, ``all``, or
"" (every fusion on); ``+`` joins names within a setting:

    python benchmarks/decode_step.py --fusions-off "",gated_down,norm_linear,rotary_kv,all

``--pdl 1,0`` does the same for programmatic dependent launch (``FASTGEN_PDL``, see
``fastgen/kernels/pdl.py``); the first setting of either option is the table's baseline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastgen.config import EngineConfig
from fastgen.models.config import ModelConfig
from fastgen.plan import SamplingOptions, SequenceChunk, SequenceStart, StepPlan
from fastgen.runner import ModelRunner

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}
GREEDY = SamplingOptions(0.0, 0, 1.0, None, 0, [])


def copy_bandwidth_bytes_per_s() -> float:
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def write_config(directory: Path, shape: str) -> Path:
    fields = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        torch_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    fields.update(SHAPES[shape])
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


def time_steps(runner: ModelRunner, batch: int, context: int, steps: int) -> float:
    """Median seconds of a decode step of ``batch`` sequences at ``context`` tokens."""
    blocks_per_seq = -(-(context + steps + 8) // runner.block_size)
    starts = [SequenceStart(i, GREEDY, 1) for i in range(batch)]
    chunks = [
        SequenceChunk(i, [7], context - 1, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), True)
        for i in range(batch)
    ]
    runner.execute(StepPlan(0, [], starts, chunks))  # registers the sequences (cache holds junk: fine)
    times = []
    for step in range(steps):
        chunks = [SequenceChunk(i, [7], context + step, [], True) for i in range(batch)]
        torch.cuda.synchronize()
        begin = time.perf_counter()
        runner.execute(StepPlan(step + 1, [], [], chunks))
        times.append(time.perf_counter() - begin)
    runner.execute(StepPlan(steps + 1, list(range(batch)), [], []))
    return statistics.median(times[3:])


SETTING_OPTIONS = {"fusions_off": "FASTGEN_FUSIONS_OFF", "pdl": "FASTGEN_PDL"}  # option -> variable


def parse_settings(text: str) -> list[str]:
    """``--fusions-off`` settings: comma-separated, each a ``+``-joined list of fusion names, ""
    or ``all``; returned as values of ``FASTGEN_FUSIONS_OFF`` (names joined by commas)."""
    return [setting.strip().strip("'\"").replace("+", ",") for setting in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument(
        "--batches", type=int, nargs="+", help="default: 1 8 32 64 128 (1 8 with --fusions-off)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 linear weights")
    parser.add_argument("--graphs", default="both", choices=["both", "on", "off"], help="CUDA graphs")
    parser.add_argument(
        "--fusions-off", type=parse_settings, default=None, metavar="SETTINGS",
        help='compare FASTGEN_FUSIONS_OFF settings, e.g. "",gated_down,norm_linear,rotary_kv,all',
    )  # fmt: skip
    parser.add_argument(
        "--pdl", type=parse_settings, default=None, metavar="SETTINGS",
        help="compare FASTGEN_PDL settings, e.g. 1,0 (programmatic dependent launch on, off)",
    )  # fmt: skip
    parser.add_argument("--rows-to", type=Path, help=argparse.SUPPRESS)  # a setting's process: rows as JSON
    args = parser.parse_args(argv)
    compared = [option for option in SETTING_OPTIONS if getattr(args, option) is not None]
    if len(compared) > 1:
        parser.error("compare one kind of setting a run: --fusions-off or --pdl")
    args.compared = compared[0] if compared else None
    if args.batches is None:
        args.batches = [1, 8] if args.compared else [1, 8, 32, 64, 128]
    return args


def measure(args: argparse.Namespace) -> tuple[list[dict], float]:
    """(rows, copy bandwidth in bytes/s) of the decode steps ``args`` ask for, in this process."""
    bandwidth = copy_bandwidth_bytes_per_s()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(Path(tmp), args.shape)
        model_config = ModelConfig.from_pretrained(path)
        blocks_per_seq = -(-(args.context + args.steps + 8) // 16)
        block_bytes = 2 * 16 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * 2
        weight_estimate = 2 * (12 * model_config.hidden_size**2 * model_config.num_layers)
        room = torch.cuda.mem_get_info()[0] * 0.85 - weight_estimate
        fitting = [b for b in args.batches if b * blocks_per_seq * block_bytes <= room]
        if fitting != args.batches:
            print(f"skipping batches {sorted(set(args.batches) - set(fitting))}: their KV does not fit")
            args.batches = fitting
        blocks_needed = max(args.batches) * blocks_per_seq
        for graphs in {"both": (True, False), "on": (True,), "off": (False,)}[args.graphs]:
            config = EngineConfig(
                load_format="dummy",
                num_kv_blocks=blocks_needed,
                cuda_graphs=graphs,
                max_seqs=max(args.batches),
                quantization=args.quantization,
            )
            started = time.perf_counter()
            runner = ModelRunner(None, config, model_config, model_config.max_position_embeddings)
            setup_s = time.perf_counter() - started
            weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
            for batch in tqdm(args.batches, desc=f"graphs={graphs}"):
                seconds = time_steps(runner, batch, args.context, args.steps)
                kv_bytes = batch * args.context * runner.kv_bytes_per_block / runner.block_size
                floor = (weight_bytes + kv_bytes) / bandwidth
                rows.append(
                    dict(
                        cuda_graphs=graphs,
                        batch=batch,
                        step_ms=seconds * 1e3,
                        floor_ms=floor * 1e3,
                        tokens_per_s=batch / seconds,
                        of_floor=floor / seconds,
                        setup_s=setup_s,
                    )
                )
            del runner
            torch.cuda.empty_cache()
    return rows, bandwidth


def measure_settings(args: argparse.Namespace, argv: list[str]) -> tuple[list[dict], float]:
    """Rows of every setting of the compared option (``--fusions-off`` or ``--pdl``), each
    measured by a fresh process of this script (CUDA graphs on); each row names its setting."""
    variable = SETTING_OPTIONS[args.compared]
    dropped = (*("--" + option.replace("_", "-") for option in SETTING_OPTIONS), "--graphs", "--out")
    rows, bandwidths = [], []
    child_argv = []
    skip = False
    for arg in argv:  # the same options less the compared ones, --graphs and --out
        if skip:
            skip = False
        elif arg in dropped:
            skip = True
        elif not arg.startswith(tuple(option + "=" for option in dropped)):
            child_argv.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        for index, setting in enumerate(getattr(args, args.compared)):
            rows_path = Path(tmp) / f"rows-{index}.json"
            # the batches chosen here (a repeated option's last value wins): the child's default differs
            batches = ["--batches", *map(str, args.batches)]
            command = [sys.executable, __file__, *child_argv, *batches, "--graphs", "on"]
            command += ["--rows-to", str(rows_path)]
            print(f"{variable}={setting!r}: {' '.join(command)}", flush=True)
            subprocess.run(command, env={**os.environ, variable: setting}, check=True)
            measured = json.loads(rows_path.read_text())
            bandwidths.append(measured["copy_bandwidth"])
            rows += [dict(row, setting=setting) for row in measured["rows"]]
    return rows, statistics.median(bandwidths)


def settings_table(rows: list[dict], variable: str) -> str:
    """Markdown rows of a comparison: each setting's step time against the first setting's."""
    first = rows[0]["setting"]
    baseline = {row["batch"]: row["step_ms"] for row in rows if row["setting"] == first}
    text = (
        f"| {variable} | batch | step ms | HBM floor ms | floor/step | tokens/s | vs {first or '(empty)'} |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for r in sorted(rows, key=lambda row: row["batch"]):
        versus = f"{r['step_ms'] / baseline[r['batch']] - 1:+.1%}" if r["batch"] in baseline else "-"
        text += (
            f"| {r['setting'] or '(empty)'} | {r['batch']} | {r['step_ms']:.3f} | {r['floor_ms']:.3f} | "
            f"{r['of_floor']:.1%} | {r['tokens_per_s']:.0f} | {versus} |\n"
        )
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rows_to is not None:  # one setting's process of a --fusions-off run
        rows, bandwidth = measure(args)
        args.rows_to.write_text(json.dumps(dict(rows=rows, copy_bandwidth=bandwidth)))
        return
    if args.compared:
        rows, bandwidth = measure_settings(args, argv)
    else:
        rows, bandwidth = measure(args)
    device = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.UTC)
    command = "python benchmarks/decode_step.py " + " ".join(argv)
    text = (
        f"# Decode step time, {args.shape}{', FP8 weights' if args.quantization else ''}, "
        f"context {args.context}\n\n"
        f"- command: `{command}`\n- device: {device}\n"
        f"- date: {stamp:%Y-%m-%d %H:%M} UTC\n- copy bandwidth (read+write): {bandwidth / 1e12:.2f} TB/s\n\n"
    )
    if args.compared:
        text += "CUDA graphs on; each setting measured in its own process.\n\n"
        text += settings_table(rows, SETTING_OPTIONS[args.compared])
    else:
        text += (
            "| cuda graphs | batch | step ms | HBM floor ms | floor/step | tokens/s |\n"
            "|---|---|---|---|---|---|\n"
        )
        for r in rows:
            text += (
                f"| {r['cuda_graphs']} | {r['batch']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
                f"{r['of_floor']:.0%} | {r['tokens_per_s']:.0f} |\n"
            )
    print(text)
    args.out.mkdir(exist_ok=True, parents=True)
    name = f"decode_step-{device.replace(' ', '_')}-{args.shape}{'-fp8' if args.quantization else ''}"
    name += f"{'-' + args.compared.replace('_', '-') if args.compared else ''}-{stamp:%Y%m%d-%H%M}"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(
        json.dumps(
            dict(command=command, device=device, date=stamp.isoformat(), copy_bandwidth=bandwidth, rows=rows),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
