"""AsyncEngine behaviour on the CPU: concurrency, cancellation, seeds, stop conditions, errors."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import shutil
import time

import pytest

from fastgen import (
    AsyncEngine,
    EngineConfig,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    SamplingParams,
    StepError,
    UnsupportedModelError,
)
from tests.helpers import collect


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def start(path: str, **config) -> AsyncEngine:
    return await AsyncEngine.start(path, EngineConfig(dtype="float32", **config))


async def wait_idle(engine: AsyncEngine, timeout_s: float = 60.0) -> None:
    """Until nothing runs, waits or holds a KV block (the bound is slack: it ends as soon as idle)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if (
            stats.num_running == 0
            and stats.num_waiting == 0
            and stats.num_free_kv_blocks == stats.num_kv_blocks
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


def random_prompts(count: int, seed: int, low: int = 1, high: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randint(low, high))] for _ in range(count)]


def test_concurrent_generate_from_many_tasks(llama_path):
    prompts = random_prompts(24, seed=3)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)

    async def main():
        async with await start(llama_path, token_budget=32) as engine:
            together = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
            alone = [await collect(engine, p, params) for p in prompts[:6]]
            await wait_idle(engine)
        return together, alone

    together, alone = run(main())
    assert [t[0] for t in together[:6]] == [a[0] for a in alone]
    assert all(len(ids) == 10 and reason == "length" for ids, _, reason in together)


def test_outputs_are_deltas_with_cumulative_counts(llama_path):
    async def main():
        async with await start(llama_path) as engine:
            return [
                out
                async for out in engine.generate([5, 6, 7], SamplingParams(max_new_tokens=5, ignore_eos=True))
            ]

    outs = run(main())
    assert sum(len(o.token_ids) for o in outs) == 5
    assert [o.generated_tokens for o in outs] == sorted(o.generated_tokens for o in outs)
    assert outs[-1].generated_tokens == 5 and outs[-1].finish_reason == "length"
    assert all(o.finish_reason is None for o in outs[:-1])
    assert all(o.prompt_tokens == 3 for o in outs)


@pytest.mark.parametrize("how", ["break", "cancel", "aclose"])
def test_leaving_the_iterator_aborts_and_frees_kv(llama_path, how):
    async def main():
        async with await start(llama_path, token_budget=16) as engine:
            others = [
                asyncio.create_task(collect(engine, p, SamplingParams(max_new_tokens=6, ignore_eos=True)))
                for p in random_prompts(3, seed=11)
            ]
            params = SamplingParams(max_new_tokens=400, ignore_eos=True)
            if how == "break":
                async for out in engine.generate(list(range(3, 50)), params):
                    if out.generated_tokens >= 2:
                        break
            elif how == "aclose":
                stream = engine.generate(list(range(3, 50)), params)
                await stream.__anext__()
                await stream.aclose()
            else:

                async def consume():
                    async for _ in engine.generate(list(range(3, 50)), params):
                        pass

                task = asyncio.create_task(consume())
                while engine.stats().generated_tokens < 3:
                    await asyncio.sleep(0.005)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            results = await asyncio.gather(*others)
            await wait_idle(engine)
            return results, engine.stats().generated_tokens

    results, generated = run(main())
    for ids, _, reason in results:
        assert len(ids) == 6 and reason == "length"
    assert generated < 3 * 6 + 400  # the request left early stopped early (not: ran out its length)


def test_seeded_sampling_is_reproducible_whatever_else_runs(llama_path):
    prompt = [10, 20, 30, 40]
    seeded = SamplingParams(
        max_new_tokens=16, do_sample=True, temperature=1.0, top_k=50, top_p=0.95, seed=1234, ignore_eos=True
    )

    async def main():
        async with await start(llama_path, token_budget=24) as engine:
            alone = await collect(engine, prompt, seeded)
            noise = [
                collect(engine, p, SamplingParams(max_new_tokens=12, do_sample=True, ignore_eos=True))
                for p in random_prompts(8, seed=5)
            ]
            crowded = (await asyncio.gather(collect(engine, prompt, seeded), *noise))[0]
            other_seed = await collect(engine, prompt, SamplingParams(**{**_fields(seeded), "seed": 99}))
            return alone, crowded, other_seed

    alone, crowded, other_seed = run(main())
    assert alone[0] == crowded[0]
    assert alone[0] != other_seed[0]


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__struct_fields__}


def test_stop_string_spanning_tokens_cuts_output(llama_path):
    async def main():
        async with await start(llama_path) as engine:
            prompt = engine.tokenize("the engine schedules every request")
            ids, text, _ = await collect(engine, prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))
            pieces = [engine.tokenizer.decode([t]) for t in ids]
            # a stop string made of the end of one token and the start of the next
            stop = next(
                a[-1] + b[0]
                for a, b in itertools.pairwise(pieces[2:])
                if a.isascii() and b.isascii() and a.strip() and b.strip()
            )
            deltas = []
            async for out in engine.generate(
                prompt, SamplingParams(max_new_tokens=30, stop=[stop], ignore_eos=True)
            ):
                deltas.append(out.text)
                reason = out.finish_reason
            kept = SamplingParams(
                max_new_tokens=30, stop=[stop], ignore_eos=True, include_stop_str_in_output=True
            )
            _, with_stop, _ = await collect(engine, prompt, kept)
            return text, stop, deltas, reason, with_stop

    text, stop, deltas, reason, with_stop = run(main())
    assert with_stop == text[: text.index(stop) + len(stop)]  # include_stop_str_in_output
    assert stop
    expected = text[: text.index(stop)]
    assert "".join(deltas) == expected
    assert reason == "stop"
    streamed = ""
    for delta in deltas:  # the stream never shows text past the cut
        streamed += delta
        assert expected.startswith(streamed)


def test_stop_token_ids_and_min_new_tokens(llama_path):
    """``min_new_tokens=4`` with a stop token: the first 4 tokens are the greedy ones with the stop
    token and EOS banned (a -100 logit bias: another path to the same logits), then generation
    goes on greedily, unbiased, until the stop token (kept in the ids) or EOS. Tried with the
    distinct tokens of the free greedy output as stop tokens; at least one must stop after the
    window, so that both ends are exercised."""
    prompt = [11, 12, 13, 14]

    async def main():
        async with await start(llama_path) as engine:
            free, _, _ = await collect(engine, prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
            stopped = await collect(
                engine, prompt, SamplingParams(max_new_tokens=20, stop_token_ids=[free[0]])
            )
            cases = []
            for stop in list(dict.fromkeys(free))[:5]:
                delayed = SamplingParams(max_new_tokens=20, stop_token_ids=[stop], min_new_tokens=4)
                banned = {token: -100.0 for token in (stop, *engine.eos_token_ids)}
                head, _, _ = await collect(
                    engine, prompt, SamplingParams(max_new_tokens=4, logit_bias=banned)
                )
                rest = SamplingParams(max_new_tokens=16, stop_token_ids=[stop])
                cases.append(
                    (
                        stop,
                        await collect(engine, prompt, delayed),
                        head,
                        await collect(engine, prompt + head, rest),
                    )
                )
            return free[0], stopped, cases

    first, stopped, cases = run(main())
    assert stopped[0] == [first] and stopped[2] == "stop"
    for stop, (ids, _, reason), head, (tail, _, tail_reason) in cases:
        assert len(head) == 4 and stop not in head
        assert (ids, reason) == (head + tail, tail_reason), stop
    assert any(reason == "stop" and ids[-1] == stop for stop, (ids, _, reason), _, _ in cases)


def test_max_length_counts_prompt_and_output(llama_path):
    async def main():
        async with await start(llama_path) as engine:
            return await collect(engine, list(range(3, 13)), SamplingParams(max_length=15, ignore_eos=True))

    ids, _, reason = run(main())
    assert len(ids) == 5 and reason == "length"


def test_default_stops_at_the_context_length(toy_checkpoint):
    path = toy_checkpoint("llama", max_position_embeddings=64)

    async def main():
        async with await start(path) as engine:
            return await collect(engine, list(range(3, 60)), SamplingParams(ignore_eos=True))

    ids, _, reason = run(main())
    assert len(ids) == 64 - 57 and reason == "length"


BAD_REQUESTS = [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1, 2, 384], SamplingParams(), "prompt"),  # outside the vocabulary
    ([1, -1], SamplingParams(), "prompt"),
    (list(range(3, 3 + 600)), SamplingParams(), "prompt"),  # longer than the 512-token context
    ([5] * 20, SamplingParams(max_length=10), "max_length"),
    ([5], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([5], SamplingParams(max_new_tokens=-3), "max_new_tokens"),
    ([5], SamplingParams(top_p=0.0), "top_p"),
    ([5], SamplingParams(top_p=1.5), "top_p"),
    ([5], SamplingParams(top_k=-1), "top_k"),
    ([5], SamplingParams(temperature=-0.5), "temperature"),
    ([5], SamplingParams(temperature=float("nan")), "temperature"),
    ([5], SamplingParams(min_new_tokens=5, max_new_tokens=2), "min_new_tokens"),
    ([5], SamplingParams(stop=[""]), "stop"),
    (12345, SamplingParams(), "prompt"),
]


def test_bad_requests_get_clear_errors_and_disturb_nobody(llama_path):
    async def main():
        async with await start(llama_path) as engine:
            good = asyncio.create_task(
                collect(engine, [7, 8, 9], SamplingParams(max_new_tokens=20, ignore_eos=True))
            )
            errors = []
            for prompt, params, _field in BAD_REQUESTS:
                with pytest.raises(InvalidRequestError) as info:
                    async for _ in engine.generate(prompt, params):
                        pass
                errors.append(info.value)
            result = await good
            await wait_idle(engine)
            return errors, result

    errors, (ids, _, reason) = run(main())
    for error, (_, _, field) in zip(errors, BAD_REQUESTS):
        assert isinstance(error, ValueError)
        assert error.field == field, str(error)
        assert field in str(error)
    assert len(ids) == 20 and reason == "length"


def test_unknown_sampling_options_are_named():
    with pytest.raises(InvalidRequestError, match="max_tokenz") as info:
        SamplingParams.from_options(max_tokenz=5)
    assert info.value.field == "max_tokenz"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_options(max_new_tokens="many")
    assert info.value.field == "max_new_tokens"
    assert SamplingParams.from_options(stop="x").stop == ["x"]


def test_failed_step_fails_its_requests_and_engine_keeps_serving(llama_path):
    async def main():
        async with await start(llama_path, token_budget=64) as engine:
            runner = engine.executor.runner
            original = runner.launch
            poisoned = 333

            def failing(plan, on_launched=None):
                if any(poisoned in chunk.token_ids for chunk in plan.chunks):
                    raise RuntimeError("injected failure")
                return original(plan, on_launched)

            runner.launch = failing
            with pytest.raises(StepError, match="injected failure"):
                await collect(engine, [poisoned, 4, 5], SamplingParams(max_new_tokens=5))
            after = await collect(engine, [4, 5, 6], SamplingParams(max_new_tokens=5, ignore_eos=True))
            await wait_idle(engine)
            return after, engine.is_healthy

    (ids, _, reason), healthy = run(main())
    assert len(ids) == 5 and reason == "length" and healthy


def test_queue_bound_refuses_with_overload_error(llama_path):
    async def main():
        async with await start(llama_path, max_queued_requests=2, max_seqs=1) as engine:
            params = SamplingParams(max_new_tokens=3, ignore_eos=True)
            engine.add_request([5, 6], params)  # will run at the next step: not queued
            engine.add_request([5, 7], params)
            engine.add_request([5, 8], params)
            with pytest.raises(EngineOverloadedError, match="max_queued_requests"):
                engine.add_request([5, 9], params)
            await wait_idle(engine)

    run(main())


def test_stop_aborts_running_requests(llama_path):
    async def main():
        engine = await start(llama_path)
        stream = engine.generate([5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True))
        first = await stream.__anext__()
        await engine.stop()
        rest = [out async for out in stream]
        return first, rest

    first, rest = run(main())
    assert first.finish_reason is None
    assert rest[-1].finish_reason == "abort"


def test_unsupported_model_type_lists_supported(llama_path, tmp_path):
    target = tmp_path / "weird"
    shutil.copytree(llama_path, target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "gpt_weird"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="llama, mistral"):
        run(start(str(target)))


def test_special_tokens_are_left_out_of_the_text_unless_asked(llama_path):
    async def main():
        async with await start(llama_path) as engine:
            eos = engine.eos_token_ids[0]
            bias = {eos: 100.0}  # nothing but EOS, and ignore_eos keeps generating
            texts = []
            for skip in (True, False):
                params = SamplingParams(
                    max_new_tokens=3, ignore_eos=True, logit_bias=bias, skip_special_tokens=skip
                )
                ids, text, _ = await collect(engine, [5, 6, 7], params)
                texts.append((ids, text))
            return eos, engine.tokenizer.convert_ids_to_tokens(eos), texts

    eos, eos_text, [(ids, skipped), (same_ids, kept)] = run(main())
    assert ids == same_ids == [eos] * 3
    assert skipped == "" and kept == eos_text * 3


def test_the_text_of_a_stop_token_is_left_out_unless_asked(llama_path):
    prompt = [11, 12, 13, 14]

    async def main():
        async with await start(llama_path) as engine:
            free, _, _ = await collect(engine, prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
            stop = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
            results = []
            for keep in (False, True):
                params = SamplingParams(
                    max_new_tokens=8,
                    ignore_eos=True,
                    stop_token_ids=[stop],
                    skip_special_tokens=False,
                    include_stop_str_in_output=keep,
                )
                results.append(await collect(engine, prompt, params))
            decode = engine.tokenizer.decode
            return decode([stop]), results, decode(results[0][0][:-1]), decode(results[0][0])

    stop_text, [(ids, text, reason), (same_ids, kept, _)], before, with_stop = run(main())
    assert ids == same_ids and reason == "stop" and len(ids) >= 3
    assert stop_text and text == before and kept == with_stop


def test_a_duplicate_request_id_is_refused_while_the_first_runs(llama_path):
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    async def main():
        async with await start(llama_path) as engine:
            first = engine.generate([5, 6, 7], params, request_id="req-1")
            outs = [await anext(first)]  # admitted and generating
            with pytest.raises(InvalidRequestError) as info:
                engine.add_request([8, 9], params, request_id="req-1")
            outs += [out async for out in first]
            reused = [out async for out in engine.generate([8, 9], params, request_id="req-1")]
            await wait_idle(engine)
            return info.value, outs, reused

    error, outs, reused = run(main())
    assert error.field == "request_id" and "req-1" in str(error)
    assert sum(len(out.token_ids) for out in outs) == 5 and outs[-1].finish_reason == "length"
    assert reused[-1].request_id == "req-1" and reused[-1].finish_reason == "length"  # free again once done


def test_requests_after_stop_or_death_are_refused(llama_path):
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    async def main():
        stopped = await start(llama_path)
        await stopped.stop()
        with pytest.raises(EngineDeadError, match="stopped"):
            stopped.add_request([5, 6], params)
        with pytest.raises(EngineDeadError):
            await anext(stopped.generate([5, 6], params))

        dying = await start(llama_path)

        def broken_commit(step, result):
            raise RuntimeError("bookkeeping bug")

        dying.scheduler.commit = broken_commit  # the step loop itself fails: the engine dies
        with pytest.raises(EngineDeadError, match="bookkeeping bug"):
            await collect(dying, [5, 6], params)
        healthy = dying.is_healthy
        with pytest.raises(EngineDeadError, match="bookkeeping bug"):
            dying.add_request([7, 8], params)
        await dying.stop()
        return healthy

    assert run(main()) is False


def test_abort_by_request_id(llama_path):
    async def main():
        async with await start(llama_path, token_budget=16) as engine:
            other = asyncio.create_task(
                collect(engine, [9, 10, 11], SamplingParams(max_new_tokens=12, ignore_eos=True))
            )
            stream = engine.generate(
                [5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True), request_id="long"
            )
            outs = [await anext(stream)]
            engine.abort("long")
            engine.abort("no-such-request")  # unknown ids are ignored
            outs += [out async for out in stream]
            engine.abort("long")  # and so are finished ones
            result = await other
            await wait_idle(engine)
            return outs, result

    outs, (ids, _, reason) = run(main())
    assert outs[-1].finish_reason == "abort" and outs[-1].generated_tokens < 400
    assert all(out.finish_reason is None for out in outs[:-1])
    assert len(ids) == 12 and reason == "length"  # the other request is untouched


def test_max_model_len_is_capped_to_the_kv_cache(llama_path):
    """4 blocks of 16 tokens hold 64 tokens, fewer than the model's 512-token context: prompt plus
    output are limited to 64, and prompts that do not leave room for one token (or are larger than
    the whole cache) are refused up front rather than left waiting for blocks that never come."""
    params = SamplingParams(ignore_eos=True)

    async def main():
        async with await start(llama_path, num_kv_blocks=4, block_size=16) as engine:
            assert engine.max_model_len == 64  # before anything runs that would not fit otherwise
            longest = await collect(engine, list(range(3, 3 + 63)), params)
            errors = []
            for size in (64, 200):
                with pytest.raises(InvalidRequestError) as info:
                    engine.add_request(list(range(3, 3 + size)), params)
                errors.append(info.value)
            after = await collect(engine, [5, 6, 7], params)
            await wait_idle(engine)
            return longest, errors, after

    (ids, _, reason), errors, (after, _, after_reason) = run(main())
    assert len(ids) == 1 and reason == "length"
    for error, size in zip(errors, (64, 200)):
        assert error.field == "prompt" and f"{size} tokens" in str(error) and "64" in str(error)
    assert len(after) == 64 - 3 and after_reason == "length"


@pytest.mark.parametrize("freeze_gc", [True, False])
def test_a_running_engine_holds_the_heap_frozen_and_its_stop_lifts_it(llama_path, freeze_gc):
    import gc

    async def body() -> tuple[int, int]:
        engine = await start(llama_path, freeze_gc=freeze_gc)
        try:
            await collect(engine, [1, 2, 3], SamplingParams(max_new_tokens=2))
            running = gc.get_freeze_count()
        finally:
            await engine.stop()
        return running, gc.get_freeze_count()

    gc.unfreeze()
    running, stopped = run(body())
    assert (running > 10_000) if freeze_gc else (running == 0)
    assert stopped == 0
