"""Where an eager (non-graph) step spends host time: per-op launch cost of each kernel wrapper at
tiny sizes, and a CPU profile of eager decode and mixed steps of a 7B-shaped model. GPU only.

    python -m benchmarks.host_overhead
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.decode_step import GREEDY, write_config
from fastgen import kernels
from fastgen.config import EngineConfig
from fastgen.models.config import ModelConfig
from fastgen.plan import SequenceChunk, SequenceStart, StepPlan
from fastgen.runner import ModelRunner


def per_call_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def wrapper_costs() -> list[tuple[str, float]]:
    cuda = torch.device("cuda")
    x = torch.randn(1, 4096, device=cuda, dtype=torch.bfloat16)
    w = torch.ones(4096, device=cuda, dtype=torch.bfloat16)
    q = torch.randn(1, 32, 128, device=cuda, dtype=torch.bfloat16)
    k = torch.randn(1, 32, 128, device=cuda, dtype=torch.bfloat16)
    cache = torch.randn(4096, 128, device=cuda)
    positions = torch.zeros(1, dtype=torch.int64, device=cuda)
    kc = torch.zeros(64, 16, 32, 128, device=cuda, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    slots = torch.zeros(1, dtype=torch.int64, device=cuda)
    qs = torch.tensor([0, 1], dtype=torch.int32, device=cuda)
    cl = torch.tensor([100], dtype=torch.int32, device=cuda)
    bt = torch.arange(64, dtype=torch.int32, device=cuda)[None]
    gate_up = torch.randn(1, 22016, device=cuda, dtype=torch.bfloat16)
    weight = torch.randn(4096, 4096, device=cuda, dtype=torch.bfloat16)
    return [
        ("rms_norm", per_call_us(lambda: kernels.rms_norm(x, w, 1e-5))),
        ("rms_norm+residual", per_call_us(lambda: kernels.rms_norm(x, w, 1e-5, x))),
        ("apply_rotary", per_call_us(lambda: kernels.apply_rotary(positions, q, k, cache, 128))),
        ("write_kv_cache", per_call_us(lambda: kernels.write_kv_cache(k, k, kc, vc, slots))),
        (
            "paged_attention decode",
            per_call_us(
                lambda: kernels.paged_attention(
                    q, kc, vc, qs, cl, bt, scale=0.1, max_query_len=1, max_context_len=100
                )
            ),
        ),
        ("silu_and_mul", per_call_us(lambda: kernels.silu_and_mul(gate_up))),
        ("torch linear 4096x4096", per_call_us(lambda: torch.nn.functional.linear(x, weight))),
        ("torch add (baseline)", per_call_us(lambda: x + x)),
    ]


def profile_steps(runner: ModelRunner, batch: int, chunk: int) -> str:
    """CPU profile of eager steps: ``batch`` decodes plus one prompt chunk of ``chunk`` tokens."""
    blocks = 80
    starts = [SequenceStart(i, GREEDY, 1) for i in range(batch + 1)]
    first = [
        SequenceChunk(i, [7], 1000, list(range(i * blocks, (i + 1) * blocks)), True) for i in range(batch)
    ]
    runner.execute(StepPlan(0, [], starts, first))

    def step(n: int) -> None:
        chunks = [SequenceChunk(i, [7], 1001 + n, [], True) for i in range(batch)]
        if chunk:
            prompt_blocks = -(-11 * chunk // 16)  # room for all the chunks this profile runs
            new = list(range(batch * blocks, batch * blocks + prompt_blocks)) if n == 0 else []
            chunks.append(SequenceChunk(batch, [5] * chunk, n * chunk, new, False))
        runner.execute(StepPlan(n + 1, [], [], chunks))

    for n in range(3):
        step(n)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for n in range(3, 8):
        step(n)
    wall_ms = (time.perf_counter() - start) / 5 * 1e3
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for n in range(8, 11):
            step(n)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40)
    return f"eager step: {batch} decodes + chunk of {chunk}: {wall_ms:.2f} ms wall\n{table}"


def main() -> None:
    print("per-call host cost of kernel wrappers (tiny inputs, us):")
    for name, us in wrapper_costs():
        print(f"  {name:28s} {us:7.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(Path(tmp), "llama2-7b")
        config = EngineConfig(load_format="dummy", num_kv_blocks=2000, cuda_graphs=False)
        runner = ModelRunner(None, config, ModelConfig.from_pretrained(path), 4096)
        print(profile_steps(runner, batch=1, chunk=0))
        print(profile_steps(runner, batch=16, chunk=512))


if __name__ == "__main__":
    main()
