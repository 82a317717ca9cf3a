"""Request bodies: OpenAI and MII options become `SamplingParams`; bad ones name the field."""

from __future__ import annotations

import msgspec
import pytest

from fastgen.errors import InvalidRequestError
from fastgen.inputs import ChatPrompt
from fastgen.logprobs import VisibleLogprobs
from fastgen.outputs import RequestOutput, TokenLogprob
from fastgen.serving import openai_api as oai
from fastgen.serving.mii_api import MiiRequest


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


def test_penalty_options_map_to_sampling_params():
    plain = completion(prompt="hi")[0].params
    assert (plain.presence_penalty, plain.frequency_penalty, plain.repetition_penalty) == (0.0, 0.0, 1.0)
    assert plain.logit_bias == {}
    options = dict(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, logit_bias={"5": -100})
    user = [{"role": "user", "content": "hi"}]
    for choice in [*completion(prompt="hi", n=2, **options), *chat(messages=user, **options)]:
        params = choice.params
        assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1)
        assert params.repetition_penalty == 1.2
        assert params.logit_bias == {5: -100.0}
    nulls = dict(presence_penalty=None, frequency_penalty=None, repetition_penalty=None, logit_bias=None)
    assert completion(prompt="hi", **nulls)[0].params == plain


def test_logprobs_options_map_to_sampling_params():
    assert completion(prompt="hi")[0].params.logprobs is None
    assert completion(prompt="hi", logprobs=0)[0].params.logprobs == 0
    assert completion(prompt="hi", logprobs=5)[0].params.logprobs == 5
    message = [{"role": "user", "content": "hi"}]
    assert chat(messages=message)[0].params.logprobs is None
    assert chat(messages=message, logprobs=False, top_logprobs=0)[0].params.logprobs is None
    assert chat(messages=message, logprobs=True)[0].params.logprobs == 0
    assert chat(messages=message, logprobs=True, top_logprobs=20)[0].params.logprobs == 20


def _entry(token_id: int, offset: int, text: str = "x") -> TokenLogprob:
    return TokenLogprob(token_id, -1.0, {token_id: -1.0, 9: -2.0}, text, {token_id: text, 9: "y"}, offset)


def _output(text: str, entries: list, finish: str | None = None, stop_reason=None) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        text=text,
        token_ids=[e.token_id for e in entries],
        prompt_tokens=1,
        generated_tokens=0,
        finish_reason=finish,
        logprobs=entries,
        stop_reason=stop_reason,
    )


def test_logprobs_are_released_with_their_text_and_cut_with_it():
    visible = VisibleLogprobs()
    a, b, c, d = _entry(1, 0, "ab"), _entry(2, 2, "c"), _entry(3, 3, "de"), _entry(4, 5, "f")
    assert visible.push(_output("ab", [a])) == [a]
    assert visible.push(_output("", [b])) == []  # its text is held back (it may begin a stop string)
    assert visible.push(_output("c", [c])) == [b]
    assert visible.push(_output("", [d], "stop", stop_reason="de")) == []  # past the cut at 3
    ended = VisibleLogprobs()
    ended.push(_output("ab", [a]))
    assert ended.push(_output("", [b, _entry(2, 2, "</s>")], "stop")) == [b, _entry(2, 2, "</s>")]


def test_logprob_response_shapes():
    entries = [_entry(1, 0, "ab"), _entry(2, 2, "é")]
    legacy = oai.completion_logprobs(entries)
    assert legacy == {
        "tokens": ["ab", "é"],
        "token_logprobs": [-1.0, -1.0],
        "top_logprobs": [{"ab": -1.0, "y": -2.0}, {"é": -1.0, "y": -2.0}],
        "text_offset": [0, 2],
    }
    content = oai.chat_logprobs(entries[1:])["content"]
    assert content == [
        {
            "token": "é",
            "logprob": -1.0,
            "bytes": [0xC3, 0xA9],
            "top_logprobs": [
                {"token": "é", "logprob": -1.0, "bytes": [0xC3, 0xA9]},
                {"token": "y", "logprob": -2.0, "bytes": [0x79]},
            ],
        }
    ]
    impossible = TokenLogprob(1, float("-inf"), {}, "x", {}, 0)
    assert oai.chat_logprobs([impossible])["content"][0]["logprob"] == -9999.0


def test_chat_content_parts_are_joined():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    (choice,) = chat(messages=[{"role": "user", "content": parts}])
    assert isinstance(choice.prompt, ChatPrompt) and choice.prompt.messages[0].content == "ab"


@pytest.mark.parametrize(
    "make, body, field",
    [
        (completion, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (completion, {"prompt": "x", "top_p": 0}, "top_p"),
        (completion, {"prompt": "x", "min_p": 1.5}, "min_p"),
        (completion, {"prompt": "x", "temperature": -1}, "temperature"),
        (completion, {"prompt": "x", "n": 0}, "n"),
        (completion, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (completion, {"prompt": "x", "logprobs": 1, "max_tokens": -1, "echo": True}, "max_tokens"),
        (completion, {"prompt": "x", "logit_bias": {"three": 1.0}}, "logit_bias"),
        (completion, {"prompt": "x", "logit_bias": {"3": 100.5}}, "logit_bias"),
        (completion, {"prompt": "x", "logit_bias": {"-3": 1.0}}, "logit_bias"),
        (completion, {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        (completion, {"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        (completion, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        (completion, {"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
        (chat, {"messages": [{"role": "user", "content": "a"}], "frequency_penalty": 3}, "frequency_penalty"),
        (chat, {"messages": [{"role": "user"}]}, "messages[0].content"),
        (completion, {"prompt": []}, "prompt"),
        (completion, {"prompt": ["a", 1]}, "prompt"),
        (chat, {"messages": []}, "messages"),
        (chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 1}, "top_logprobs"),
        (chat, {"messages": [{"role": "user"}], "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
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
