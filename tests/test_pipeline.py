import pytest

import fastgen
from fastgen import InvalidRequestError


@pytest.fixture(scope="module")
def pipe(llama_path):
    pipe = fastgen.pipeline(llama_path, token_budget=32, dtype="float32")
    yield pipe
    pipe.destroy()


def test_pipeline_returns_mii_responses(pipe):
    prompts = ["DeepSpeed is", "Seattle is a city by the water and"]
    responses = pipe(prompts, max_new_tokens=8, do_sample=False, ignore_eos=True)
    assert len(responses) == 2
    for prompt, response in zip(prompts, responses):
        assert response.prompt_length == len(pipe.tokenizer(prompt)["input_ids"])
        assert response.generated_length == 8
        assert response.finish_reason == "length"
        assert str(response) == response.generated_text
    again = pipe(prompts[0], max_new_tokens=8, do_sample=False, ignore_eos=True)
    assert again[0].generated_text == responses[0].generated_text


def test_return_full_text_and_max_length(pipe):
    response = pipe("DeepSpeed is", max_length=6, do_sample=False, ignore_eos=True, return_full_text=True)[0]
    assert response.generated_text.startswith("DeepSpeed is")
    assert response.prompt_length + response.generated_length == 6


def test_sampling_options_with_mii_names(pipe):
    a = pipe("the engine", max_new_tokens=10, top_k=20, top_p=0.8, temperature=0.7, seed=5, ignore_eos=True)
    b = pipe("the engine", max_new_tokens=10, top_k=20, top_p=0.8, temperature=0.7, seed=5, ignore_eos=True)
    assert a[0].generated_text == b[0].generated_text


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
    assert pipe("still serving", max_new_tokens=2)[0].generated_length >= 1


def test_unknown_engine_option():
    with pytest.raises(ValueError, match="token_budgett"):
        fastgen.pipeline("/nonexistent", token_budgett=3)
