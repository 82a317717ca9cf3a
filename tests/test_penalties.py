"""Penalties and logit biases: greedy outputs equal HF transformers' logits processors (the OpenAI
presence/frequency formula written out) applied to HF's logits on the same weights, token for
token; rows that ask do not disturb rows that don't; preemption and recompute keep the outputs."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fastgen import AsyncEngine, EngineConfig, InvalidRequestError, SamplingParams
from fastgen.penalties import PenaltyTable, worst_case_trackers
from fastgen.plan import SamplingOptions, SequenceChunk
from tests.helpers import collect, generate_together
from tests.test_logprobs import check_against_hf

NEW_TOKENS = 20
PROMPTS = [[5, 80, 17, 230, 41, 17, 17, 80], list(range(3, 60)), [300, 12, 300]]
GREEDY = dict(max_new_tokens=NEW_TOKENS, ignore_eos=True)

# name -> the options of a request (each changes the toy model's greedy output)
CASES = {
    "repetition": dict(repetition_penalty=1.6),
    "repetition-below-one": dict(repetition_penalty=0.7),
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.6),
    "presence-frequency-negative": dict(presence_penalty=-0.5, frequency_penalty=0.9),
    "logit-bias": dict(logit_bias={80: 4.0, 92: -100.0, 295: -2.5}),
    "all": dict(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3, logit_bias={7: 3.0}),
}

_HF: dict[str, torch.nn.Module] = {}


def hf_penalized_greedy(path: str, prompt: list[int], options: dict) -> list[int]:
    """Greedy decoding on HF's logits, in fastgen's order: repetition penalty (HF's processor), then
    frequency and presence (OpenAI's formula), then the biases (HF's sequence-bias processor)."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    if path not in _HF:
        _HF[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = _HF[path]
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids).logits[:, -1].float()
        if options.get("repetition_penalty", 1.0) != 1.0:
            logits = RepetitionPenaltyLogitsProcessor(options["repetition_penalty"])(input_ids, logits)
        output = torch.tensor(ids[len(prompt) :], dtype=torch.int64)
        counts = torch.bincount(output, minlength=logits.shape[-1]).float()
        logits = logits - options.get("frequency_penalty", 0.0) * counts
        logits = logits - options.get("presence_penalty", 0.0) * (counts > 0).float()
        if options.get("logit_bias"):
            bias = [[[token], value] for token, value in options["logit_bias"].items()]
            logits = SequenceBiasLogitsProcessor(bias)(input_ids, logits)
        ids.append(int(logits.argmax(dim=-1)))
    return ids[len(prompt) :]


def test_penalties_and_biases_match_hf_processors_in_one_batch(llama_path):
    requests = [(prompt, SamplingParams(**GREEDY)) for prompt in PROMPTS]
    for options in CASES.values():
        requests += [(prompt, SamplingParams(**GREEDY, **options)) for prompt in PROMPTS[:2]]
    outs = generate_together(llama_path, requests, token_budget=24)
    plain = {tuple(prompt): out.token_ids for (prompt, _), out in zip(requests, outs[: len(PROMPTS)])}
    for (prompt, params), out in zip(requests[len(PROMPTS) :], outs[len(PROMPTS) :]):
        options = {name: getattr(params, name) for name in CASES["all"]}
        expected = hf_penalized_greedy(llama_path, prompt, options)
        assert out.token_ids == expected, f"{options} on a prompt of {len(prompt)} tokens"
        assert out.token_ids != plain[tuple(prompt)], f"{options} changes nothing: a weak test"


def test_rows_that_ask_do_not_change_rows_that_do_not(llama_path):
    sampled = dict(GREEDY, do_sample=True, temperature=0.8, top_k=40, seed=11)
    requests = [
        (PROMPTS[0], SamplingParams(**GREEDY)),
        (PROMPTS[1], SamplingParams(**GREEDY, **CASES["all"])),
        (PROMPTS[2], SamplingParams(**sampled)),
        (PROMPTS[0], SamplingParams(**sampled, **CASES["presence-frequency-negative"])),
        (PROMPTS[2], SamplingParams(**GREEDY, logprobs=2, repetition_penalty=1.3)),
        (PROMPTS[1], SamplingParams(**sampled, min_new_tokens=5, logit_bias={80: 2.0})),
    ]
    together = generate_together(llama_path, requests, token_budget=16)

    async def one_at_a_time():
        async with await AsyncEngine.start(llama_path, EngineConfig(dtype="float32")) as engine:
            return [(await collect(engine, prompt, params))[0] for prompt, params in requests]

    alone = asyncio.run(asyncio.wait_for(one_at_a_time(), 120))
    assert [out.token_ids for out in together] == alone
    # raw logprobs are those of the model's logits, before the penalty
    check_against_hf(llama_path, PROMPTS[2], together[4], top_n=2)


def test_preemption_and_recompute_keep_penalized_outputs(llama_path):
    # 12 blocks of 16 tokens for six 57-token prompts growing by 40: sequences are preempted and
    # recomputed from their prompt and the output so far, which then arrives in the prompt chunks
    requests = [
        (PROMPTS[1][i:], SamplingParams(max_new_tokens=40, ignore_eos=True, **options))
        for i, options in enumerate([CASES["all"], CASES["frequency"], {}, CASES["repetition"]] * 2)
    ]

    async def run(**config):
        engine_config = EngineConfig(dtype="float32", token_budget=32, **config)
        async with await AsyncEngine.start(llama_path, engine_config) as engine:
            outs = await asyncio.gather(*(collect(engine, prompt, params) for prompt, params in requests))
            return [ids for ids, _, _ in outs], engine.stats().num_preemptions

    roomy, _ = asyncio.run(run())
    tight, preemptions = asyncio.run(run(num_kv_blocks=12, block_size=16))
    assert preemptions > 0
    assert tight == roomy


def test_table_changes_only_the_rows_that_ask_and_keeps_counting():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab)
    table = PenaltyTable(1, torch.device("cpu"))  # grows past one slot
    other = table.track(SamplingOptions(0.0, 0, 1.0, None, 0, [], None, 0.0, 1.0))
    options = SamplingOptions(0.0, 0, 1.0, None, 0, [], None, 0.5, 0.25, 2.0, {3: 1.5, 49: -7.0})
    tracker = table.track(options)
    assert table.num_slots == 2 and tracker.slot != other.slot
    tracker.observe(SequenceChunk(0, [3, 4, 9, 9], 0, [], False))  # prompt 3, 4, 9 then output 9, 10
    tracker.observe(SequenceChunk(0, [10], 4, [], True))
    other.observe(SequenceChunk(1, [9, 9, 9], 0, [], True))
    adjusted = table.apply(logits.clone(), [2, 1], [tracker, other], [2, 0])
    assert torch.equal(adjusted[[0, 3]], logits[[0, 3]])
    expected = logits[2].clone()
    for token in (3, 4, 9, 10):
        expected[token] = expected[token] / 2 if expected[token] > 0 else expected[token] * 2
    expected[[9, 10]] -= 0.5 + 0.25
    expected[3] += 1.5
    expected[49] -= 7.0
    assert torch.allclose(adjusted[2], expected)
    assert torch.equal(adjusted[1], logits[1])  # the other sequence has no output yet
    # the next decodes bring the tokens sampled last (9 again, and 9 for the other): counted
    tracker.observe(SequenceChunk(0, [9], 5, [], True))
    other.observe(SequenceChunk(1, [9], 3, [], True))
    again = table.apply(logits.clone(), [0, 3], [tracker, other], [3, 1])
    logit = logits[0, 9].item()
    assert again[0, 9].item() == pytest.approx((logit / 2 if logit > 0 else logit * 2) - 0.5 - 2 * 0.25)
    assert again[3, 9].item() == pytest.approx(logits[3, 9].item() - 1.0)  # frequency 1 x once
    # a released slot is cleared for its next sequence
    table.release(tracker)
    reused = table.track(SamplingOptions(0.0, 0, 1.0, None, 0, [], None, 0.0, 0.0, 3.0))
    assert reused.slot == tracker.slot
    reused.observe(SequenceChunk(2, [7], 0, [], True))
    fresh = table.apply(logits.clone(), [0], [reused], [0])
    changed = (fresh[0] != logits[0]).nonzero().flatten().tolist()
    assert changed == ([7] if logits[0, 7] != 0 else [])
    with pytest.raises(RuntimeError, match="position"):
        reused.observe(SequenceChunk(2, [1], 9, [], True))


def test_worst_case_trackers_change_every_row():
    logits = torch.randn(3, 20)
    table = PenaltyTable(3, torch.device("cpu"))
    adjusted = table.apply(logits.clone(), [0, 1, 2], worst_case_trackers(table, 3), [1, 1, 1])
    assert (adjusted != logits).any(dim=-1).all() and table.num_slots == 3


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty="high"), "presence_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(logit_bias={5: 101}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={5: "up"}), "logit_bias"),
        (dict(logit_bias=[5]), "logit_bias"),
    ],
)
def test_invalid_penalties_are_named(options, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_options(**options)
    assert info.value.field == field


def test_logit_bias_outside_the_vocabulary_is_refused(llama_path):
    async def main():
        async with await AsyncEngine.start(llama_path, EngineConfig(dtype="float32")) as engine:
            with pytest.raises(InvalidRequestError) as info:
                engine.add_request([5, 6], SamplingParams(logit_bias={engine.model_config.vocab_size: 1.0}))
            assert info.value.field == "logit_bias"
            ids, _, _ = await collect(engine, [5, 6], SamplingParams(max_new_tokens=2, logit_bias={7: 1.0}))
            assert len(ids) == 2  # the engine keeps serving

    asyncio.run(asyncio.wait_for(main(), 60))
