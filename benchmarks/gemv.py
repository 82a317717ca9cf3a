"""Decode-time matmuls of Llama-2-7B at M = 1..8 rows: cuBLAS (``F.linear``) against the Triton
small-batch kernel (``fastgen.kernels.gemv``), on the GPU machine.

    python benchmarks/gemv.py                        # tables on stdout
    python benchmarks/gemv.py --out benchmarks/results    # also gemv-<device>-<date>.md there
    python benchmarks/gemv.py --variants             # also the grid of kernel variants

Weights are bf16 [N, K] (nn.Linear layout), x [M, K] bf16, no bias; with ``--fp8`` the Triton
kernel reads e4m3 weights with a float32 scale per row (``quantization="fp8"``), cuBLAS still
the bf16 ones (the matmul they replace), and ``--variants`` adds tile shapes and pipeline depths.
The weights are the only large traffic, so the figure of merit is GB/s of weight reads, next to
the device-to-device copy bandwidth of a 1 GiB tensor measured in the same run (bytes read +
written).

Per matmul: the median of per-call CUDA-event times over many calls after a warm-up; each batch
of calls is queued behind a GPU sleep so host launch cost stays out of the events, and the calls
rotate over the 32 layers' distinct weights (the LM head over 3 copies) so no weight is in the
L2 when it is read, as in a real decode step.
Decode step: 32 x (qkv + o_proj + gate_up + down) + lm_head once, (a) the sum of the per-matmul
medians and (b) the replay time of a CUDA graph of those 129 matmuls on distinct weights (how
decode runs: launch gaps included, host cost excluded).
Variants: the rule's config against split-K with a second pass instead of atomics and the other
multiply path (CUDA-core FMA vs tensor-core dot); ``--variants`` adds splits 1..8 of both paths.
The variant "rule" re-times the rule's launch: its ratio to the main table is the run's noise.
Needs ~14 GB of GPU memory (32 layers of weights); about two minutes, five with ``--variants``.
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from fastgen.kernels import gemv, quantize_rows
from fastgen.kernels.gemv import GemvConfig

DTYPE = torch.bfloat16
NUM_LAYERS = 32
LAYER = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
LM_HEAD = {"lm_head": (32000, 4096)}
SHAPES = {**LAYER, **LM_HEAD}
LM_HEAD_COPIES = 3
CALLS_PER_BATCH = 50
BATCH_SLEEP_MS = 20.0  # covers the host time of queueing a batch (<= 400 us a call)

@dataclass
class Weight:
    """One matrix: bf16, and (with ``--fp8``) its e4m3 copy with a float32 scale per row."""

    bf16: torch.Tensor
    fp8: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    @property
    def kernel_weight(self) -> torch.Tensor:
        return self.bf16 if self.fp8 is None else self.fp8

    def dequantized(self) -> torch.Tensor:
        return self.bf16.float() if self.fp8 is None else self.fp8.float() * self.scale

    def quantize(self) -> None:
        """As the engine quantizes a linear layer's weight (`quantize_linear_layers`)."""
        self.fp8, self.scale = quantize_rows(self.bf16)


Call = Callable[[torch.Tensor, Weight], torch.Tensor]


def cublas(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    return F.linear(x, weight.bf16)


def triton_rule(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    return gemv.linear_small_batch_triton(x, weight.kernel_weight, weight_scale=weight.scale)


def triton_with(config: GemvConfig) -> Call:
    return lambda x, weight: gemv.linear_small_batch_with_config(
        x, weight.kernel_weight, None, None, config, weight.scale)


class Timer:
    """CUDA-event timing of single calls, queued behind a GPU sleep (see the module doc)."""

    def __init__(self) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # warm
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        self.sleep_cycles = int(cycles * BATCH_SLEEP_MS / start.elapsed_time(end))

    def median_us(self, call: Call, x: torch.Tensor, weights: list[torch.Tensor], reps: int,
                  warmup: int = 10) -> float:
        for i in range(warmup):
            call(x, weights[i % len(weights)])
        torch.cuda.synchronize()
        times_ms: list[float] = []
        done = 0
        while done < reps:
            count = min(CALLS_PER_BATCH, reps - done)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(count)]
            torch.cuda._sleep(self.sleep_cycles)
            for i, (start, end) in enumerate(events):
                weight = weights[(done + i) % len(weights)]
                start.record()
                call(x, weight)
                end.record()
            torch.cuda.synchronize()
            times_ms += [start.elapsed_time(end) for start, end in events]
            done += count
        return statistics.median(times_ms) * 1e3


def copy_gb_per_s(timer: Timer) -> float:
    source = torch.randn(1 << 29, dtype=DTYPE, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    copy_us = timer.median_us(lambda src, dst: dst.copy_(src), source, [target], reps=30, warmup=3)
    del source, target
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / copy_us / 1e3


def make_weights(fp8: bool) -> dict[str, list[Weight]]:
    """Each layer's four matrices (distinct memory, as in a real model) and LM-head copies."""
    weights: dict[str, list[Weight]] = {name: [] for name in SHAPES}
    for name, (n, k) in SHAPES.items():
        copies = LM_HEAD_COPIES if name in LM_HEAD else NUM_LAYERS
        for _ in range(copies):
            weight = Weight(torch.empty(n, k, dtype=DTYPE, device="cuda").normal_(0.0, 0.02))
            if fp8:
                weight.quantize()
            weights[name].append(weight)
    return weights


def check(x: torch.Tensor, weight: Weight, call: Call) -> float:
    """Relative error of ``call`` against float32 math on the same inputs (must be < 1e-2)."""
    exact = F.linear(x.float(), weight.dequantized())
    error = float((call(x, weight).float() - exact).norm() / exact.norm())
    if not error < 1e-2:
        raise AssertionError(f"wrong result: relative error {error:.3g}")
    return error


def capture_step(call: Call, weights: dict[str, list[torch.Tensor]], xs: dict[int, torch.Tensor]
                 ) -> torch.cuda.CUDAGraph:
    """One decode step's matmuls as a CUDA graph (eager warm-up first, as the engine does)."""

    def step() -> None:
        for layer in range(NUM_LAYERS):
            for name, (_, k) in LAYER.items():
                call(xs[k], weights[name][layer])
        for name, (_, k) in LM_HEAD.items():
            call(xs[k], weights[name][0])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    graph.replay()
    torch.cuda.synchronize()
    times_ms = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return statistics.median(times_ms) * 1e3


def variant_configs(m: int, n: int, k: int, num_sms: int, grid: bool, weight_bytes: int = 2
                    ) -> dict[str, GemvConfig]:
    rule = gemv.choose_config(m, n, k, num_sms, weight_bytes=weight_bytes)
    found = {"rule": rule}
    if rule.split_k > 1:
        found["rule, two-pass"] = replace(rule, atomic_reduce=False)
    other = gemv.choose_config(m, n, k, num_sms, use_dot=not rule.use_dot, weight_bytes=weight_bytes)
    found["other path"] = other
    if grid and weight_bytes == 1:  # the FP8 tiles were never swept: shapes and pipeline depths
        for block_n, block_k in ((rule.block_n // 2, rule.block_k * 2), (rule.block_n, rule.block_k),
                                 (rule.block_n * 2, rule.block_k // 2)):
            for stages in (3, 4, 6):
                for split in (1, 2):
                    config = replace(rule, block_n=block_n, block_k=block_k, num_stages=stages, split_k=split)
                    if triton.cdiv(k, block_k) // split >= 2 and config not in found.values():
                        found[describe(config)] = config
    elif grid:
        block_m = triton.next_power_of_2(m)
        for use_dot in (False, True):
            block_n, block_k = gemv.path_tile(block_m, use_dot)
            for split in (1, 2, 4, 8):
                if triton.cdiv(k, block_k) // split < 2:
                    continue
                config = GemvConfig(block_n, block_k, split, use_dot)
                for candidate in (config, replace(config, atomic_reduce=False)) if split > 1 else (config,):
                    if candidate not in found.values():
                        found[describe(candidate)] = candidate
    return found


def describe(config: GemvConfig) -> str:
    path = "dot" if config.use_dot else "fma"
    text = f"{path} {config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}"
    if config.split_k > 1:
        text += f" split {config.split_k} {'atomic' if config.atomic_reduce else 'two-pass'}"
    return text


@dataclass
class Row:
    name: str
    m: int
    cublas_us: float
    triton_us: float | None
    config: str
    error: str = ""


class Report:
    def __init__(self, copy_bw: float, reps: int, element: int = 2) -> None:
        self.copy_bw = copy_bw
        self.element = element  # bytes of a weight element the Triton kernel reads
        self.reps = reps
        self.rows: list[Row] = []
        self.variant_lines: list[str] = []
        self.step_lines: list[str] = []

    def pct(self, gbps: float) -> str:
        return f"{100 * gbps / self.copy_bw:.0f}"


def time_matmuls(report: Report, timer: Timer, weights: dict[str, list[Weight]],
                 xs: dict[int, torch.Tensor], m: int, num_sms: int, grid: bool) -> None:
    """Per-matmul rows (cuBLAS and the rule's Triton launch) and the variant lines of one M."""
    for name, (n, k) in SHAPES.items():
        x, ws = xs[k], weights[name]
        weight_bytes = n * k * report.element
        row = Row(name, m, timer.median_us(cublas, x, ws, report.reps), None,
                  describe(gemv.choose_config(m, n, k, num_sms, weight_bytes=report.element)))
        try:
            check(x, ws[0], triton_rule)
            row.triton_us = timer.median_us(triton_rule, x, ws, report.reps)
        except Exception as error:  # report and go on: one failing case must not hide the rest
            traceback.print_exc()
            row.error = type(error).__name__
        report.rows.append(row)
        for label, config in variant_configs(m, n, k, num_sms, grid, report.element).items():
            try:
                call = triton_with(config)
                check(x, ws[0], call)
                us = timer.median_us(call, x, ws, report.reps)
            except Exception as error:
                traceback.print_exc()
                report.variant_lines.append(
                    f"| {name} | {m} | {label} | {describe(config)} | {type(error).__name__} | | | |")
                continue
            gbps = weight_bytes / us / 1e3
            vs_rule = f"{row.triton_us / us:.2f}" if row.triton_us else ""
            report.variant_lines.append(f"| {name} | {m} | {label} | {describe(config)} | {us:.1f} | "
                                        f"{gbps:.0f} | {report.pct(gbps)} | {vs_rule} |")


def step_sum(rows: dict[str, Row], pick: Callable[[Row], float | None]) -> float | None:
    """Milliseconds of one decode step's matmuls from per-matmul times (us)."""
    values = {name: pick(rows[name]) for name in SHAPES}
    if any(v is None for v in values.values()):
        return None
    return (NUM_LAYERS * sum(values[n] for n in LAYER) + sum(values[n] for n in LM_HEAD)) / 1e3


def time_step(report: Report, weights: dict[str, list[Weight]], xs: dict[int, torch.Tensor],
              m: int, step_bytes: int) -> None:
    rows = {r.name: r for r in report.rows if r.m == m}
    sums = {
        "cublas": step_sum(rows, lambda r: r.cublas_us),
        "triton": step_sum(rows, lambda r: r.triton_us),
        "best": step_sum(rows, lambda r: min(r.cublas_us, r.triton_us) if r.triton_us else r.cublas_us),
    }
    graphs: dict[str, float | None] = {}
    for label, call in (("cublas", cublas), ("triton", triton_rule)):
        try:
            graphs[label] = replay_us(capture_step(call, weights, xs)) / 1e3
        except Exception:
            traceback.print_exc()
            graphs[label] = None
        torch.cuda.empty_cache()

    def ms(value: float | None) -> str:
        return "error" if value is None else f"{value:.3f}"

    def gbps(value: float | None, element: int) -> str:
        return "" if value is None else f"{step_bytes * element / report.element / value / 1e6:.0f}"

    ratio = f"{graphs['cublas'] / graphs['triton']:.2f}" if graphs["cublas"] and graphs["triton"] else ""
    report.step_lines.append(
        f"| {m} | {ms(sums['cublas'])} | {ms(sums['triton'])} | {ms(sums['best'])} | "
        f"{ms(graphs['cublas'])} ({gbps(graphs['cublas'], 2)}) | {ms(graphs['triton'])} "
        f"({gbps(graphs['triton'], report.element)}) | {ratio} |")


def render(report: Report, header: str) -> str:
    lines = ["| matmul | N x K | M | cuBLAS us | GB/s | % copy | Triton us | GB/s | % copy | "
             "speedup | Triton config (rule) |", "|" + "---|" * 11]
    for r in report.rows:
        n, k = SHAPES[r.name]
        cublas_gbps = n * k * 2 / r.cublas_us / 1e3
        if r.triton_us is None:
            triton_cells = f"{r.error} | | | "
        else:
            triton_gbps = n * k * report.element / r.triton_us / 1e3
            triton_cells = (f"{r.triton_us:.1f} | {triton_gbps:.0f} | {report.pct(triton_gbps)} | "
                            f"{r.cublas_us / r.triton_us:.2f}")
        lines.append(f"| {r.name} | {n} x {k} | {r.m} | {r.cublas_us:.1f} | {cublas_gbps:.0f} | "
                     f"{report.pct(cublas_gbps)} | {triton_cells} | {r.config} |")
    step = ["| M | sum cuBLAS ms | sum Triton ms | sum best-of-both ms | graph cuBLAS ms (GB/s) | "
            "graph Triton ms (GB/s) | graph speedup |", "|" + "---|" * 7, *report.step_lines]
    variants = ["| matmul | M | variant | config | us | GB/s | % copy | rule time / this |",
                "|" + "---|" * 8, *report.variant_lines]
    return (f"# Small-batch linear: cuBLAS vs Triton (Llama-2-7B decode shapes)\n\n```\n{header}\n```\n\n"
            f"## Per matmul (GB/s of weight reads; speedup = cuBLAS time / Triton time)\n\n"
            + "\n".join(lines)
            + "\n\n## 7B decode step matmul time (sum of medians; CUDA graph replay)\n\n"
            + "\n".join(step) + "\n\n## Kernel variants\n\n" + "\n".join(variants) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for gemv-<device>-<date>.md")
    parser.add_argument("--rows", default="1,2,4,8", help="values of M")
    parser.add_argument("--reps", type=int, default=200, help="timed calls per matmul")
    parser.add_argument("--variants", action="store_true", help="also the grid of splits x paths")
    parser.add_argument("--fp8", action="store_true", help="Triton on e4m3 weights, scaled per row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gemv.py needs a CUDA GPU")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    timer = Timer()
    element = 1 if args.fp8 else 2
    report = Report(copy_gb_per_s(timer), args.reps, element)
    weights = make_weights(args.fp8)
    step_bytes = sum(n * k * element * (NUM_LAYERS if name in LAYER else 1)
                     for name, (n, k) in SHAPES.items())
    for m in [int(v) for v in args.rows.split(",")]:
        xs = {k: torch.randn(m, k, dtype=DTYPE, device="cuda") for k in {k for _, k in SHAPES.values()}}
        time_matmuls(report, timer, weights, xs, m, num_sms, args.variants)
        time_step(report, weights, xs, m, step_bytes)
        print(f"M={m} done", file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    header = (
        f"device: {device} ({num_sms} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB); date: {date}; "
        f"torch {torch.__version__}, triton {triton.__version__}\n"
        f"command: python {' '.join(sys.argv)}\n"
        f"ceiling: device copy {report.copy_bw:.0f} GB/s (1 GiB, read + write); medians of {args.reps} "
        f"calls; decode step = {NUM_LAYERS} x (qkv, o_proj, gate_up, down) + lm_head = "
        f"{step_bytes / 1e9:.2f} GB of {'e4m3' if args.fp8 else 'bf16'} weights (Triton; cuBLAS reads bf16)"
    )
    text = render(report, header)
    print(text)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
        path = out_dir / f"gemv-{slug}-{date}{'-fp8' if args.fp8 else ''}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
