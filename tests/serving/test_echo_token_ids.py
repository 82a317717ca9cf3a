"""Prompts of token ids with ``echo``: how lm-evaluation-harness's ``local-completions`` model
scores text (issue 11, item 6).

Its loglikelihood request, as the harness builds it: ``prompt`` a batch of token-id lists,
``echo: true``, ``logprobs: 1``, ``max_tokens: 1``, ``temperature: 0``, a ``seed``. It reads each
choice's ``logprobs.token_logprobs[ctxlen:-1]`` (the continuation's tokens; the last entry is the
generated token) and compares each with ``max(top_logprobs[i].values())`` to tell greedy
continuations.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from transformers import AutoTokenizer

from .inprocess import served_gateway

TEXTS = ["the engine schedules a paged cache", "a paged cache of blocks", "the engine"]


@pytest.fixture(scope="module")
def gateway(llama_path):
    with served_gateway(llama_path) as served:
        yield served


@pytest.fixture(scope="module")
def tokenizer(llama_path):
    return AutoTokenizer.from_pretrained(llama_path)


@pytest.fixture(scope="module")
def token_prompts(tokenizer) -> list[list[int]]:
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    for text, ids in zip(TEXTS, prompts):  # the comparisons with text prompts rely on this
        assert tokenizer.decode(ids) == text and tokenizer(tokenizer.decode(ids))["input_ids"] == ids
    return prompts


def harness_body(prompt, **changes) -> dict:
    """The body of the harness's loglikelihood request."""
    body = {"model": "toy", "prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234}
    return {**body, "echo": True, **changes}


def post(gateway, body: dict) -> dict:
    response = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def by_index(response: dict) -> list[dict]:
    return sorted(response["choices"], key=lambda choice: choice["index"])


def harness_score(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """What the harness computes from one choice (sum of the continuation's log-probabilities, and
    whether every continuation token was the most likely one)."""
    logprobs = choice["logprobs"]
    continuation = logprobs["token_logprobs"][ctxlen:-1]
    tops = logprobs["top_logprobs"][ctxlen:-1]
    return sum(continuation), all(value == max(top.values()) for value, top in zip(continuation, tops))


def assert_offsets_index_the_text(choice: dict, prompt_length: int) -> None:
    """Each prompt token's text is where its offset says in the echoed text (the first token reads
    up to the second's offset)."""
    text, logprobs = choice["text"], choice["logprobs"]
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(text)
    for i in range(prompt_length):
        end = offsets[i + 1] if i + 1 < len(offsets) else len(text)
        assert text[offsets[i] : end] == tokens[i], (i, tokens[i])


def test_harness_loglikelihood_request_scores_token_ids_as_their_text(gateway, token_prompts):
    scored = by_index(post(gateway, harness_body(token_prompts)))
    as_text = by_index(post(gateway, harness_body(TEXTS)))
    assert len(scored) == len(token_prompts)
    for choice, text_choice, ids, text in zip(scored, as_text, token_prompts, TEXTS):
        logprobs = choice["logprobs"]
        assert choice["text"].startswith(text) and choice["finish_reason"] == "length"
        assert choice["text"] == text_choice["text"]
        assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt's tokens, then the one generated
        for name in ("tokens", "token_logprobs", "text_offset"):
            assert len(logprobs[name]) == len(ids) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["tokens"] == text_choice["logprobs"]["tokens"]
        assert logprobs["text_offset"] == text_choice["logprobs"]["text_offset"]
        assert logprobs["token_logprobs"][1:] == pytest.approx(
            text_choice["logprobs"]["token_logprobs"][1:], abs=1e-5
        )
        for top, text_top in zip(logprobs["top_logprobs"][1:], text_choice["logprobs"]["top_logprobs"][1:]):
            assert len(top) == 1 and top.keys() == text_top.keys()
        assert_offsets_index_the_text(choice, len(ids))
        ctxlen = len(ids) // 2
        total, _ = harness_score(choice, ctxlen)
        assert total == pytest.approx(harness_score(text_choice, ctxlen)[0], abs=1e-4) and total < 0


def test_scoring_only_and_streaming_token_ids(gateway, token_prompts):
    ids = token_prompts[0]
    full = by_index(post(gateway, harness_body([ids])))[0]

    scored = post(gateway, harness_body([ids], max_tokens=0))
    choice = by_index(scored)[0]
    assert choice["text"] == TEXTS[0] and choice["finish_reason"] == "length"
    assert scored["usage"]["completion_tokens"] == 0 and scored["usage"]["prompt_tokens"] == len(ids)
    assert choice["logprobs"]["token_logprobs"] == full["logprobs"]["token_logprobs"][: len(ids)]
    assert_offsets_index_the_text(choice, len(ids))

    async def stream() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = harness_body(ids, stream=True, max_tokens=4)
            async with client.stream("POST", f"{gateway.url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
        return [json.loads(line[len("data: ") :])["choices"][0] for line in lines]

    chunks = asyncio.run(stream())
    whole = by_index(post(gateway, harness_body(ids, max_tokens=4)))[0]
    assert "".join(chunk["text"] for chunk in chunks) == whole["text"]
    assert chunks[0]["text"].startswith(TEXTS[0])
    streamed = [v for chunk in chunks if chunk["logprobs"] for v in chunk["logprobs"]["token_logprobs"]]
    assert streamed == whole["logprobs"]["token_logprobs"]
    offsets = [o for chunk in chunks if chunk["logprobs"] for o in chunk["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]  # generated tokens count after the echoed prompt


def test_echo_of_token_ids_without_logprobs_and_with_special_tokens(gateway, token_prompts, tokenizer):
    ids = token_prompts[1]
    quiet = by_index(post(gateway, harness_body([ids], logprobs=None, max_tokens=0)))[0]
    assert quiet["text"] == TEXTS[1] and quiet["logprobs"] is None

    # the harness puts BOS (or EOS) before a context-free continuation: special tokens are not text
    with_bos = [tokenizer.bos_token_id, *ids]
    choice = by_index(post(gateway, harness_body([with_bos], max_tokens=0)))[0]
    assert choice["text"] == TEXTS[1]
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(with_bos) and logprobs["tokens"][0] == ""
    assert_offsets_index_the_text(choice, len(with_bos))
