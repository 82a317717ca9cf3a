"""Helpers shared by the engine tests."""

from __future__ import annotations

import asyncio

import torch

from fastgen import AsyncEngine, EngineConfig, RequestOutput, SamplingParams


async def collect(engine: AsyncEngine, prompt, params: SamplingParams) -> tuple[list[int], str, str]:
    """(generated token ids, text, finish reason) of one request."""
    ids: list[int] = []
    text: list[str] = []
    reason = None
    async for out in engine.generate(prompt, params):
        ids += out.token_ids
        text.append(out.text)
        reason = out.finish_reason
    return ids, "".join(text), reason


async def merged_output(engine: AsyncEngine, prompt, params: SamplingParams) -> RequestOutput:
    """One request's outputs merged into one: the deltas' text, token ids and logprobs, in order."""
    merged = None
    async for out in engine.generate(prompt, params):
        if merged is None:
            merged = out
            continue
        merged.text += out.text
        merged.token_ids += out.token_ids
        if out.logprobs is not None:
            merged.logprobs += out.logprobs
        merged.generated_tokens = out.generated_tokens
        merged.finish_reason, merged.stop_reason = out.finish_reason, out.stop_reason
    return merged


def generate_together(path: str, requests: list[tuple], **config) -> list[RequestOutput]:
    """The merged outputs of ``requests`` (prompt, params), all submitted at once to one engine."""

    async def main():
        async with await AsyncEngine.start(path, EngineConfig(dtype="float32", **config)) as engine:
            together = (merged_output(engine, prompt, params) for prompt, params in requests)
            return await asyncio.gather(*together)

    return asyncio.run(asyncio.wait_for(main(), 120))


def engine_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, **config) -> list[list[int]]:
    """Greedy outputs of fastgen for all ``prompts`` submitted at once."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)

    async def main():
        engine_config = EngineConfig(dtype="float32", **config)
        async with await AsyncEngine.start(path, engine_config) as engine:
            results = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
            stats = engine.stats()
            assert stats.num_free_kv_blocks == stats.num_kv_blocks
        return [ids for ids, _, _ in results]

    return asyncio.run(main())


_HF_MODELS: dict[str, torch.nn.Module] = {}


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy outputs of HF transformers ``generate``, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    if path not in _HF_MODELS:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # fastgen runs with ignore_eos
        _HF_MODELS[path] = model
    model = _HF_MODELS[path]
    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def collect_outputs(path: str, prompt, params: SamplingParams, **config) -> list[RequestOutput]:
    """Every `RequestOutput` of one request, unmerged."""

    async def main():
        async with await AsyncEngine.start(path, EngineConfig(dtype="float32", **config)) as engine:
            return [out async for out in engine.generate(prompt, params)]

    return asyncio.run(asyncio.wait_for(main(), 120))
