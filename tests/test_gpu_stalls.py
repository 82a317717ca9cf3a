"""No step compiles a kernel while serving (a compile stalls its step for seconds). Run on the GPU
machine: ``python -m pytest -m gpu tests/test_gpu_stalls.py``."""

from __future__ import annotations

import asyncio
import random

import pytest

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from tests.helpers import collect

pytestmark = pytest.mark.gpu


def _random_params(rng: random.Random) -> SamplingParams:
    if rng.random() < 0.5:
        return SamplingParams(max_new_tokens=rng.randint(1, 40))
    return SamplingParams(
        max_new_tokens=rng.randint(1, 40),
        do_sample=True,
        temperature=rng.choice([0.7, 1.0]),
        top_k=rng.choice([0, 5, 50]),
        top_p=rng.choice([1.0, 0.9]),
        min_p=rng.choice([0.0, 0.05]),
        logprobs=rng.choice([None, 0, 3]),
        repetition_penalty=rng.choice([1.0, 1.1]),
        seed=rng.randint(0, 2**31),
    )


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_serving_after_start_compiles_nothing(toy_checkpoint, kv_cache_dtype):
    """Random prompt lengths (1 to 3000 tokens: split and unsplit keys, chunked prompts), batch
    sizes and sampling options, at two token budgets' worth of concurrency; prompt log-probabilities
    too (the eager path)."""
    path = toy_checkpoint("llama", max_position_embeddings=4096)
    rng = random.Random(7)

    async def run() -> int:
        config = EngineConfig(  # a set cache size: the GPU may be shared by parallel test workers
            token_budget=256, max_seqs=64, kv_cache_dtype=kv_cache_dtype, kv_cache_bytes=1 << 30
        )
        async with await AsyncEngine.start(path, config) as engine:
            assert engine.stats().kernel_compiles == 0
            for wave in range(6):
                requests = []
                for _ in range(rng.choice([1, 3, 17, 60])):
                    prompt = [rng.randrange(3, 200) for _ in range(rng.choice([1, 5, 40, 300, 1000, 3000]))]
                    params = _random_params(rng)
                    if wave == 5 and rng.random() < 0.3:
                        params = SamplingParams(max_new_tokens=2, prompt_logprobs=2)
                    requests.append(collect(engine, prompt, params))
                await asyncio.gather(*requests)
            return engine.stats().kernel_compiles

    assert asyncio.run(run()) == 0
