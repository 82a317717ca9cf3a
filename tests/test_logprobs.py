"""Log-probabilities: the engine reports HF transformers' log-softmax of the raw logits (float32,
CPU, teacher-forced on the generated tokens), for greedy and sampled requests, in mixed batches,
through stop strings, and across the worker wire."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from fastgen import InvalidRequestError, RequestOutput, SamplingParams
from fastgen.executor.wire import ReplyCodec, StepDone
from fastgen.plan import SampleLogprobs, SequenceChunk, StepResult
from tests.helpers import generate_together as generate_all

TOLERANCE = 1e-4
PROMPTS = [[5, 80, 17, 230, 41], list(range(3, 60)), [300]]


_HF: dict[str, torch.nn.Module] = {}


def hf_logprobs(path: str, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """HF's log-softmax ``[len(generated), vocab]`` at each generated position, teacher-forced."""
    from transformers import AutoModelForCausalLM

    if path not in _HF:
        _HF[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = _HF[path](torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]


def check_against_hf(path: str, prompt: list[int], out: RequestOutput, top_n: int) -> None:
    reference = hf_logprobs(path, prompt, out.token_ids)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for position, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = reference[position]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=TOLERANCE)
        assert len(entry.top) == top_n and list(entry.top_text) == list(entry.top)
        values = list(entry.top.values())
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(row.topk(top_n).values.tolist(), abs=TOLERANCE)
        for token_id, value in entry.top.items():
            assert value == pytest.approx(row[token_id].item(), abs=TOLERANCE)
        if top_n:
            assert max(entry.top.values()) == pytest.approx(row.max().item(), abs=TOLERANCE)


def test_greedy_logprobs_equal_hf_log_softmax(llama_path):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=5)
    outs = generate_all(llama_path, [(prompt, params) for prompt in PROMPTS], token_budget=16)
    for prompt, out in zip(PROMPTS, outs):
        check_against_hf(llama_path, prompt, out, top_n=5)
        for token, entry in zip(out.token_ids, out.logprobs):  # greedy: the argmax is the top 1
            assert next(iter(entry.top)) == token and entry.top[token] == entry.logprob


def test_sampled_requests_report_raw_logprobs(llama_path):
    # temperature, top-k, top-p and min_new_tokens (EOS suppressed throughout) shape the sampling,
    # not the reported distribution
    options = dict(do_sample=True, temperature=0.5, top_k=3, top_p=0.9, seed=7, min_new_tokens=10)
    params = SamplingParams(max_new_tokens=10, logprobs=2, **options)
    (out,) = generate_all(llama_path, [(PROMPTS[0], params)])
    check_against_hf(llama_path, PROMPTS[0], out, top_n=2)


def test_mixed_batch_only_some_requests_ask(llama_path):
    greedy = dict(max_new_tokens=8, ignore_eos=True)
    sampled = dict(max_new_tokens=8, ignore_eos=True, do_sample=True, temperature=0.8, seed=3)
    requests = [
        (PROMPTS[0], SamplingParams(**greedy)),
        (PROMPTS[1], SamplingParams(**greedy, logprobs=0)),
        (PROMPTS[2], SamplingParams(**sampled, logprobs=3)),
        (PROMPTS[1], SamplingParams(**sampled)),
        (PROMPTS[0], SamplingParams(**greedy, logprobs=20)),
    ]
    outs = generate_all(llama_path, requests, token_budget=16)
    alone = [generate_all(llama_path, [request])[0] for request in requests[:4]]
    assert [out.token_ids for out in outs[:4]] == [out.token_ids for out in alone]
    assert outs[0].logprobs is None and outs[3].logprobs is None
    assert outs[4].token_ids == outs[0].token_ids  # asking for logprobs does not change the tokens
    assert all(entry.top == {} for entry in outs[1].logprobs)
    check_against_hf(llama_path, PROMPTS[1], outs[1], top_n=0)
    check_against_hf(llama_path, PROMPTS[2], outs[2], top_n=3)
    check_against_hf(llama_path, PROMPTS[0], outs[4], top_n=20)


def test_logprobs_follow_the_token_ids_and_texts_through_a_stop_string(llama_path):
    prompt = PROMPTS[1]
    params = dict(max_new_tokens=16, ignore_eos=True, logprobs=1)
    (free,) = generate_all(llama_path, [(prompt, SamplingParams(**params))])
    text = free.text
    for entry in free.logprobs:  # each token's text sits at its offset in the generated text
        if "\ufffd" not in entry.text and not entry.text.startswith("<"):
            assert text[entry.text_offset : entry.text_offset + len(entry.text)] == entry.text
    offsets = [entry.text_offset for entry in free.logprobs]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(text)
    middle = next(e for e in free.logprobs[4:] if e.text.strip() and "\ufffd" not in e.text)
    stop = middle.text.strip()[:2]
    (cut,) = generate_all(llama_path, [(prompt, SamplingParams(**params, stop=[stop]))])
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    # the token ids are not cut, and the logprobs stay aligned with them
    assert len(cut.logprobs) == len(cut.token_ids) and cut.token_ids == free.token_ids[: len(cut.token_ids)]
    assert cut.logprobs == free.logprobs[: len(cut.token_ids)]
    assert cut.logprobs[-1].text_offset + len(cut.logprobs[-1].text) > len(cut.text)


def test_stop_token_is_the_stop_reason(llama_path):
    (free,) = generate_all(llama_path, [(PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True))])
    stop_token = free.token_ids[2]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, stop_token_ids=[stop_token])
    (out,) = generate_all(llama_path, [(PROMPTS[0], params)])
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    assert free.stop_reason is None and free.finish_reason == "length"


@pytest.mark.parametrize("value", [-1, 21, "3", 1.5, True])
def test_invalid_logprobs_are_named(value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logprobs=value).validate()
    assert info.value.field == "logprobs"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_options(logprobs=value if value != "3" else "many")
    assert info.value.field == "logprobs"


def test_step_result_wire_stays_compact():
    codec = ReplyCodec()
    rows = [None, SampleLogprobs(-0.5, [12, 4], [-0.5, -1.25]), None]
    result = StepResult(9, [11, 12, 13], logprobs=rows)
    assert codec.decode(codec.encode(StepDone(0, 9, result))).result == result
    # a step in which nobody asks, nothing compiles and the device is not timed pays one byte for
    # each of the four fields
    plain = msgspec.msgpack.encode(StepResult(9, [11, 12, 13]))
    assert len(plain) == len(msgspec.msgpack.encode([9, [11, 12, 13], 0.0, 0.0])) + 4
    timed = StepResult(9, [11], prepare_s=0.5, forward_s=0.25)
    assert codec.decode(codec.encode(StepDone(0, 9, timed))).result == timed


def test_plan_chunks_without_prompt_targets_pay_one_byte_for_them():
    chunk = SequenceChunk(3, [5, 6], 0, [1], True)
    assert msgspec.msgpack.encode(chunk) == msgspec.msgpack.encode([3, [5, 6], 0, [1], True, []])
    scored = SequenceChunk(3, [5, 6], 0, [1], False, prompt_targets=[6, 7])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(scored), type=SequenceChunk) == scored


def check_prompt_logprobs_against_hf(path: str, prompt: list[int], out: RequestOutput, top_n: int) -> None:
    from transformers import AutoModelForCausalLM

    if path not in _HF:
        _HF[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(_HF[path](torch.tensor([prompt])).logits[0].float(), dim=-1)
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    offsets = [entry.text_offset for entry in entries[1:]]
    assert offsets == sorted(offsets)
    for position, entry in enumerate(entries[1:], start=1):
        row = reference[position - 1]
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(row[prompt[position]].item(), abs=TOLERANCE)
        assert list(entry.top.values()) == pytest.approx(row.topk(top_n).values.tolist(), abs=TOLERANCE)


def test_prompt_logprobs_equal_hf_across_chunks_preemption_and_the_prefix_cache(llama_path):
    long_prompt = list(range(3, 103))  # 100 tokens: split over many 16-token steps
    scored = SamplingParams(max_new_tokens=30, ignore_eos=True, prompt_logprobs=3)
    plain = SamplingParams(max_new_tokens=30, ignore_eos=True)
    requests = [(long_prompt, plain), (long_prompt, scored), (PROMPTS[0], scored), (long_prompt[:60], plain)]
    for config in ({}, {"num_kv_blocks": 12}):  # roomy, then preempting
        outs = generate_all(llama_path, requests, token_budget=16, block_size=16, **config)
        check_prompt_logprobs_against_hf(llama_path, long_prompt, outs[1], top_n=3)
        check_prompt_logprobs_against_hf(llama_path, PROMPTS[0], outs[2], top_n=3)
        assert outs[0].prompt_logprobs is None and outs[3].prompt_logprobs is None
        assert outs[1].token_ids == outs[0].token_ids  # scoring the prompt changes no output
        assert outs[1].cached_tokens == 0  # a scored prompt is computed in full


def test_prompt_logprobs_come_with_the_first_output_only(llama_path):
    from tests.helpers import collect_outputs

    params = SamplingParams(max_new_tokens=5, ignore_eos=True, prompt_logprobs=0)
    outs = collect_outputs(llama_path, PROMPTS[1], params)
    assert outs[0].prompt_logprobs is not None and len(outs[0].prompt_logprobs) == len(PROMPTS[1])
    assert all(entry is None or entry.top == {} for entry in outs[0].prompt_logprobs)
    assert all(out.prompt_logprobs is None for out in outs[1:])


def test_min_p_drops_tokens_less_likely_than_a_share_of_the_likeliest(llama_path):
    # temperature 1: the raw log-probabilities are the sampling ones, so every sampled token must
    # be within log(min_p) of the top one; without min_p some are not
    def worst_margin(min_p: float) -> float:
        params = SamplingParams(
            max_new_tokens=40, do_sample=True, temperature=1.0, min_p=min_p, seed=11, logprobs=1
        )
        (out,) = generate_all(llama_path, [(PROMPTS[1], params)])
        return min(entry.logprob - max(entry.top.values()) for entry in out.logprobs)

    assert worst_margin(0.3) >= math.log(0.3) - 1e-4
    assert worst_margin(0.0) < math.log(0.3)


@pytest.mark.parametrize("value", [-0.1, 1.5, "x"])
def test_invalid_min_p_is_named(value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_options(min_p=value)
    assert info.value.field == "min_p"
