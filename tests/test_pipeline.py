import pytest

import fastgen
from fastgen import EngineConfig, InvalidRequestError, SamplingParams
from fastgen.config import OFFLINE_TOKEN_BUDGET
from tests.helpers import generate_together

PROMPTS = ["DeepSpeed is", "Seattle is a city by the water and"]
SAMPLED = dict(max_new_tokens=10, top_k=20, top_p=0.8, temperature=0.7, ignore_eos=True)


@pytest.fixture(scope="module")
def pipe(llama_path):
    pipe = fastgen.pipeline(llama_path, token_budget=32, dtype="float32")
    yield pipe
    pipe.destroy()


@pytest.fixture(scope="module")
def reference(llama_path):
    """What an engine in this thread makes of `PROMPTS`: greedy, and sampled with `SAMPLED` and
    seeds 5 and 6 (a seed decides a request's draws whatever else runs)."""
    requests = [(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True)) for prompt in PROMPTS]
    requests += [(PROMPTS[0], SamplingParams(do_sample=True, seed=seed, **SAMPLED)) for seed in (5, 6)]
    outs = generate_together(llama_path, requests, token_budget=32)
    return {"greedy": [out.text for out in outs[:2]], "sampled": {5: outs[2].text, 6: outs[3].text}}


def test_pipeline_returns_mii_responses(pipe, reference):
    responses = pipe(PROMPTS, max_new_tokens=8, do_sample=False, ignore_eos=True)
    assert [response.generated_text for response in responses] == reference["greedy"]
    for prompt, response in zip(PROMPTS, responses):
        assert response.prompt_length == len(pipe.tokenizer(prompt)["input_ids"])
        assert response.generated_length == 8
        assert response.finish_reason == "length"
        assert str(response) == response.generated_text
    again = pipe(PROMPTS[0], max_new_tokens=8, do_sample=False, ignore_eos=True)
    assert again[0].generated_text == reference["greedy"][0]


def test_return_full_text_and_max_length(pipe):
    response = pipe("DeepSpeed is", max_length=6, do_sample=False, ignore_eos=True, return_full_text=True)[0]
    assert response.generated_text.startswith("DeepSpeed is")
    assert response.prompt_length + response.generated_length == 6


def test_sampling_options_with_mii_names(pipe, reference):
    """The options reach the engine: the pipeline samples what an engine given the same
    `SamplingParams` samples, and another seed draws something else."""
    sampled = {
        seed: pipe(PROMPTS[0], do_sample=True, seed=seed, **SAMPLED)[0].generated_text for seed in (5, 6)
    }
    assert sampled == reference["sampled"]
    assert sampled[5] != sampled[6]


@pytest.mark.parametrize(
    "options, field",
    [
        ({"max_tokens": 3}, "max_tokens"),
        ({"top_p": 2.0}, "top_p"),
        ({"temperature": 0}, "temperature"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"return_full_text": "yes"}, "return_full_text"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),  # not one of MII's generate options
    ],
)
def test_bad_options_are_named(pipe, options, field):
    with pytest.raises(InvalidRequestError) as info:
        pipe("hello", **options)
    assert info.value.field == field


def test_bad_prompts(pipe):
    with pytest.raises(InvalidRequestError, match="prompt"):
        pipe([])
    with pytest.raises(InvalidRequestError, match="prompt"):
        pipe(["fine", ""])
    assert pipe("still serving", max_new_tokens=2, ignore_eos=True)[0].generated_length == 2


def test_a_pipeline_takes_the_offline_token_budget_unless_given(pipe, llama_path):
    assert pipe.engine.config.token_budget == 32  # given
    default = fastgen.pipeline(llama_path, dtype="float32")
    try:
        assert default.engine.config.token_budget == OFFLINE_TOKEN_BUDGET > EngineConfig().token_budget
        assert default("Hi", max_new_tokens=3, ignore_eos=True)[0].generated_length == 3
    finally:
        default.destroy()


def test_unknown_engine_option():
    with pytest.raises(ValueError, match="token_budgett"):
        fastgen.pipeline("/nonexistent", token_budgett=3)
