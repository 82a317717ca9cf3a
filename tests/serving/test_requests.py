"""Request bodies: OpenAI and MII options become `SamplingParams`; bad ones name the field."""

from __future__ import annotations

import msgspec
import pytest

from fastgen.errors import InvalidRequestError
from fastgen.serving import openai_api as oai
from fastgen.serving.mii_api import MiiRequest
from fastgen.serving.prompts import ChatPrompt


def completion(**body) -> list[oai.Choice]:
    return oai.completion_choices(msgspec.json.decode(msgspec.json.encode(body), type=oai.CompletionRequest))


def chat(**body) -> list[oai.Choice]:
    return oai.chat_choices(msgspec.json.decode(msgspec.json.encode(body), type=oai.ChatCompletionRequest))


def test_completion_options_map_to_sampling_params():
    (choice,) = completion(prompt="hi", max_tokens=5, temperature=0, stop="x", seed=3, top_k=4)
    params = choice.params
    assert params.greedy and params.max_new_tokens == 5 and params.stop == ["x"] and params.top_k == 4
    assert completion(prompt="hi")[0].params.max_new_tokens == 16  # OpenAI's default
    assert chat(messages=[{"role": "user", "content": "hi"}])[0].params.max_new_tokens is None


def test_n_and_prompt_lists_make_one_choice_each_with_derived_seeds():
    choices = completion(prompt=["a", "b"], n=3, seed=10, temperature=0.5)
    assert [c.index for c in choices] == list(range(6))
    assert [c.prompt_index for c in choices] == [0, 0, 0, 1, 1, 1]
    assert [c.params.seed for c in choices] == [10, 11, 12, 10, 11, 12]
    assert completion(prompt=[1, 2, 3])[0].prompt == [1, 2, 3]
    assert [c.prompt for c in completion(prompt=[[1], [2, 3]])] == [[1], [2, 3]]


def test_chat_content_parts_are_joined():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    (choice,) = chat(messages=[{"role": "user", "content": parts}])
    assert isinstance(choice.prompt, ChatPrompt) and choice.prompt.messages[0].content == "ab"


@pytest.mark.parametrize(
    "make, body, field",
    [
        (completion, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (completion, {"prompt": "x", "top_p": 0}, "top_p"),
        (completion, {"prompt": "x", "temperature": -1}, "temperature"),
        (completion, {"prompt": "x", "n": 0}, "n"),
        (completion, {"prompt": "x", "logprobs": 1}, "logprobs"),
        (completion, {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        (completion, {"prompt": []}, "prompt"),
        (completion, {"prompt": ["a", 1]}, "prompt"),
        (chat, {"messages": []}, "messages"),
        (chat, {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        (chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ],
)
def test_bad_openai_options_are_named(make, body, field):
    with pytest.raises(InvalidRequestError) as info:
        make(**body)
    assert info.value.field == field


def test_mii_body():
    raw = b'{"prompts": ["a", "b"], "max_new_tokens": 4, "do_sample": false}'
    body = msgspec.json.decode(raw, type=MiiRequest)
    params, full_text = body.sampling()
    assert body.prompt_list() == ["a", "b"] and params.max_new_tokens == 4 and params.greedy and not full_text
    assert msgspec.json.decode(b'{"prompt": "a"}', type=MiiRequest).prompt_list() == ["a"]
    for raw in (b'{"prompts": []}', b"{}", b'{"prompts": [""]}'):
        with pytest.raises(InvalidRequestError) as info:
            msgspec.json.decode(raw, type=MiiRequest).prompt_list()
        assert info.value.field == "prompts"
    with pytest.raises(InvalidRequestError) as info:
        msgspec.json.decode(b'{"prompts": "a", "top_p": 5}', type=MiiRequest).sampling()
    assert info.value.field == "top_p"
