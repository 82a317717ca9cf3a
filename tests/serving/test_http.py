"""The HTTP gateway in front of an in-process engine: ``fastgen serve`` in its own process,
exercised with the real `openai` client, raw sockets and 200 concurrent streams."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from fastgen.inputs import ChatMessage, ChatPrompt

from .conftest import greedy_texts, start_cli_server, stop_cli_server
from .helpers import metric, raw_post, sse_events

PROMPTS = ["the engine schedules", "a paged cache of blocks"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(llama_path):
    process, url = start_cli_server(llama_path, "--dtype", "float32", "--served-model-name", "toy")
    yield url
    stop_cli_server(process)


PENALTIES = dict(presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.3, logit_bias={50: 3.0})


@pytest.fixture(scope="module")
def reference(llama_path):
    chat = ChatPrompt([ChatMessage("user", PROMPTS[0])])
    texts = greedy_texts(llama_path, [*PROMPTS, chat], MAX_TOKENS)
    penalized = greedy_texts(llama_path, [PROMPTS[0], chat], MAX_TOKENS, **PENALTIES)
    (short,) = greedy_texts(llama_path, ["x"], 2)
    return {"completions": texts[:2], "chat": texts[2], "penalized": penalized, "short": short}


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)


# -- OpenAI-compatible routes ------------------------------------------------------------------------


def test_completions_equal_engine_greedy_output(oai, reference):
    response = oai.completions.create(model="toy", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == [
        text for text, _, _ in reference["completions"]
    ]
    assert response.usage.completion_tokens == sum(n for _, n, _ in reference["completions"])
    assert response.model == "toy" and response.object == "text_completion"


def test_completions_stream(oai, reference):
    stream = oai.completions.create(
        model="toy",
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text, generated, reason = reference["completions"][0]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated


def test_chat_completions_equal_engine_greedy_output(oai, reference):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    response = oai.chat.completions.create(
        model="toy", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    text, generated, reason = reference["chat"]
    assert response.choices[0].message.content == text
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == reason
    assert response.usage.completion_tokens == generated

    stream = oai.chat.completions.create(
        model="toy", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_n_seed_and_stop(oai, reference):
    sampled = dict(model="toy", prompt=PROMPTS[0], max_tokens=6, temperature=0.8, seed=123, n=3)
    first = oai.completions.create(**sampled)
    again = oai.completions.create(**sampled)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert sorted(c.index for c in first.choices) == [0, 1, 2]

    text = reference["completions"][0][0]
    stop = text[3:5] if len(text) >= 5 else text[-1]
    cut = oai.completions.create(
        model="toy", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_penalties_and_logit_bias(oai, reference):
    options = dict(
        model="toy",
        max_tokens=MAX_TOKENS,
        temperature=0,
        presence_penalty=PENALTIES["presence_penalty"],
        frequency_penalty=PENALTIES["frequency_penalty"],
        logit_bias={str(token): bias for token, bias in PENALTIES["logit_bias"].items()},
        extra_body={"repetition_penalty": PENALTIES["repetition_penalty"]},  # vLLM's extension field
    )
    completion, chat = reference["penalized"]
    assert completion[0] != reference["completions"][0][0] and chat[0] != reference["chat"][0]
    assert oai.completions.create(prompt=PROMPTS[0], **options).choices[0].text == completion[0]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    assert oai.chat.completions.create(messages=messages, **options).choices[0].message.content == chat[0]
    streamed = oai.chat.completions.create(messages=messages, stream=True, **options)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat[0]


def test_n_choices_streamed_and_not(oai):
    sampled = dict(model="toy", max_tokens=6, temperature=0.9, seed=5, n=3, extra_body={"ignore_eos": True})
    usage_options = dict(stream=True, stream_options={"include_usage": True})
    one = oai.completions.create(model="toy", prompt=PROMPTS[1], max_tokens=1)

    full = oai.completions.create(prompt=PROMPTS[1], **sampled)
    texts = [c.text for c in sorted(full.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and len(set(texts)) > 1  # derived seeds: different samples
    assert full.usage.completion_tokens == 3 * 6 and full.usage.prompt_tokens == one.usage.prompt_tokens
    chunks = list(oai.completions.create(prompt=PROMPTS[1], **sampled, **usage_options))
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts
    assert chunks[-1].usage.completion_tokens == 3 * 6

    messages = [{"role": "user", "content": PROMPTS[1]}]
    full = oai.chat.completions.create(messages=messages, **sampled)
    texts = [c.message.content for c in sorted(full.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and len(set(texts)) > 1 and full.usage.completion_tokens == 3 * 6
    assert oai.chat.completions.create(messages=messages, **sampled).choices[2].message.content == texts[2]
    chunks = list(oai.chat.completions.create(messages=messages, **sampled, **usage_options))
    streamed, roles = ["", "", ""], []
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.append(choice.index)
    assert streamed == texts and sorted(roles) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == 3 * 6
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_logprobs(oai, reference):
    options = dict(model="toy", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, logprobs=3)
    choice = oai.completions.create(**options).choices[0]
    text, generated, _ = reference["completions"][0]
    assert choice.text == text
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == generated
    assert len(logprobs.top_logprobs) == generated
    for token, logprob, top, offset in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset
    ):
        assert 1 <= len(top) <= 3 and logprob <= 0
        assert max(top.values()) == logprob and top[token] == logprob  # greedy: the token is the top 1
        assert 0 <= offset <= len(text)
    assert logprobs.text_offset == sorted(logprobs.text_offset)

    chunks = [c for c in oai.completions.create(**options, stream=True) if c.choices]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens] == logprobs.tokens
    assert [v for lp in streamed for v in lp.token_logprobs] == logprobs.token_logprobs
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset
    seen = ""
    for chunk in chunks:  # each token arrives with the text it begins
        seen += chunk.choices[0].text
        for offset in chunk.choices[0].logprobs.text_offset if chunk.choices[0].logprobs else []:
            assert offset < len(seen) or chunk.choices[0].finish_reason

    plain = oai.completions.create(model="toy", prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_with_logprobs_scores_the_prompt(oai, reference, llama_path):
    """What evaluation harnesses do to score text: echo the prompt with its log-probabilities,
    with (max_tokens > 0) or without (max_tokens 0) generating."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = PROMPTS[1]
    ids = AutoTokenizer.from_pretrained(llama_path)(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [expected[i - 1, ids[i]].item() for i in range(1, len(ids))]
    text, generated, _ = reference["completions"][1]

    options = dict(model="toy", prompt=prompt, temperature=0, echo=True, logprobs=2)
    full = oai.completions.create(**options, max_tokens=MAX_TOKENS).choices[0]
    assert full.text == prompt + text
    lp = full.logprobs
    assert len(lp.tokens) == len(ids) + generated
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens[: len(ids)]).strip() == prompt.strip()

    scored = oai.completions.create(**options, max_tokens=0)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    assert choice.logprobs.token_logprobs == lp.token_logprobs[: len(ids)]

    chunks = [c for c in oai.completions.create(**options, max_tokens=MAX_TOKENS, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == prompt + text
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset  # generated tokens count after the echoed prompt in every chunk
    quiet = oai.completions.create(model="toy", prompt=prompt, max_tokens=0, echo=True, temperature=0)
    assert quiet.choices[0].text == prompt and quiet.choices[0].logprobs is None


def test_chat_logprobs(oai, reference):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    options = dict(model="toy", messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True)
    text, generated, _ = reference["chat"]
    response = oai.chat.completions.create(**options, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert response.choices[0].message.content == text and len(content) == generated
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8")) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
    only_sampled = oai.chat.completions.create(**options).choices[0].logprobs.content
    assert [(e.token, e.logprob, e.top_logprobs) for e in only_sampled] == [
        (e.token, e.logprob, []) for e in content
    ]

    chunks = list(oai.chat.completions.create(**options, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert chunks[0].choices[0].logprobs is None  # the role chunk


def test_stop_string_cuts_the_logprobs_with_the_text(oai, reference):
    text = reference["completions"][0][0]
    stop = text[3:5] if len(text) >= 5 else text[-1]
    options = dict(model="toy", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, logprobs=0)
    full = oai.completions.create(**options).choices[0].logprobs
    options["stop"] = [stop]
    cut = oai.completions.create(**options).choices[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    # the tokens that begin past the cut are left out, the one the stop string begins in is kept
    kept = [offset < len(cut.text) for offset in full.text_offset]
    assert not all(kept)
    assert cut.logprobs.tokens == [token for token, keep in zip(full.tokens, kept) if keep]
    assert cut.logprobs.text_offset == [offset for offset in full.text_offset if offset < len(cut.text)]
    streamed = [c.choices[0].logprobs for c in oai.completions.create(**options, stream=True) if c.choices]
    assert [t for lp in streamed if lp for t in lp.tokens] == cut.logprobs.tokens


def test_repeated_prompt_reports_cached_tokens(oai, server):
    prompt = "a shared system prompt that many requests begin with, " * 4
    before = metric(httpx.get(f"{server}/metrics").text, "fastgen_prefix_cache_hit_tokens_total")
    first, second = (
        oai.completions.create(model="toy", prompt=prompt, max_tokens=4, temperature=0) for _ in range(2)
    )
    assert first.choices[0].text == second.choices[0].text
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 32
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and second.usage.prompt_tokens - 16 <= cached < second.usage.prompt_tokens
    after = metric(httpx.get(f"{server}/metrics").text, "fastgen_prefix_cache_hit_tokens_total")
    assert after - before == cached


def test_models_and_health(server, llama_path):
    models = httpx.get(f"{server}/v1/models").json()
    context = json.loads((Path(llama_path) / "config.json").read_text())["max_position_embeddings"]
    assert models["data"][0]["id"] == "toy" and models["data"][0]["max_model_len"] == context
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


# -- MII route, raw HTTP -------------------------------------------------------------------------------


def test_mii_route(server, reference, llama_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    expected = [
        {"generated_text": text, "prompt_length": len(tokenizer(prompt)["input_ids"]), "generated_length": n}
        for prompt, (text, n, _) in zip(PROMPTS, reference["completions"])
    ]
    body = json.dumps({"prompts": PROMPTS, "max_new_tokens": MAX_TOKENS, "do_sample": False}).encode()
    status, headers, payload = raw_post(server, "/mii/toy", body)
    assert status == 200 and headers["content-type"] == "application/json"
    responses = json.loads(payload)
    assert [set(r) for r in responses] == [
        {"generated_text", "prompt_length", "generated_length", "finish_reason"}
    ] * 2
    assert [{k: r[k] for k in expected[0]} for r in responses] == expected  # the engine's greedy output
    assert all(r["finish_reason"] in ("length", "stop") for r in responses)

    streamed = json.loads(body) | {"stream": True}
    status, headers, payload = raw_post(server, "/mii/toy", json.dumps(streamed).encode())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(payload)  # byte-wise framing
    for index, want in enumerate(expected):
        mine = [e for e in events if e["index"] == index]
        assert "".join(e["generated_text"] for e in mine) == want["generated_text"]
        assert mine[-1]["generated_length"] == want["generated_length"]
        assert [e["finish_reason"] for e in mine][-1] == responses[index]["finish_reason"]
        assert all(e["finish_reason"] == "none" for e in mine[:-1])


# -- bad input ----------------------------------------------------------------------------------------

LONG = "the engine " * 400


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"", 400, None),
        ("/v1/completions", b'{"prompt": 3}', 422, "prompt"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 422, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "bogus": 1}', 422, "bogus"),
        ("/v1/completions", b'{"max_tokens": 3}', 422, "prompt"),
        ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', 400, "top_p"),
        ("/v1/completions", b'{"prompt": "x", "temperature": -0.5}', 400, "temperature"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "n": 500}', 400, "n"),
        ("/v1/completions", b'{"prompt": "x", "logprobs": 21}', 400, "logprobs"),
        ("/v1/completions", b'{"prompt": "x", "logprobs": -1}', 400, "logprobs"),
        ("/v1/completions", b'{"prompt": "x", "logprobs": 21, "echo": true}', 400, "logprobs"),
        ("/v1/completions", b'{"prompt": "x", "frequency_penalty": 2.5}', 400, "frequency_penalty"),
        ("/v1/completions", b'{"prompt": "x", "presence_penalty": "high"}', 422, "presence_penalty"),
        ("/v1/completions", b'{"prompt": "x", "repetition_penalty": 0}', 400, "repetition_penalty"),
        ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 101}}', 400, "logit_bias"),
        ("/v1/completions", b'{"prompt": "x", "logit_bias": {"five": 1}}', 400, "logit_bias"),
        ("/v1/completions", b'{"prompt": "x", "logit_bias": {"999999": 1}}', 400, "logit_bias"),
        ("/v1/completions", b'{"prompt": "x", "n": 2, "best_of": 3}', 400, "best_of"),
        ("/v1/completions", b'{"prompt": []}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": ""}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": [999999]}', 400, "prompt"),
        ("/v1/completions", json.dumps({"prompt": LONG}).encode(), 400, "prompt"),
        ("/v1/completions", json.dumps({"prompt": LONG, "stream": True}).encode(), 400, "prompt"),
        ("/v1/completions", b'{"prompt": "x", "model": "gpt-17"}', 404, None),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', 422, "role"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}',
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": -2.5}',
            400,
            "presence_penalty",
        ),
        ("/mii/toy", b'{"prompts": []}', 400, "prompts"),
        ("/mii/toy", b'{"prompts": ["x"], "max_tokens": 3}', 422, "max_tokens"),
        ("/mii/toy", b'{"prompts": ["x"], "top_k": -1}', 400, "top_k"),
        ("/mii/other-deployment", b'{"prompts": ["x"]}', 404, None),
    ],
)
def test_bad_requests_get_json_errors(server, path, body, status, param):
    code, headers, payload = raw_post(server, path, body)
    assert code == status, payload
    assert headers["content-type"] == "application/json"
    error = json.loads(payload)["error"]
    assert error["param"] == param and error["message"]


def test_server_keeps_serving_after_bad_input(oai, reference):
    text, generated, reason = reference["short"]
    response = oai.completions.create(model="toy", prompt="x", max_tokens=2, temperature=0)
    assert (response.choices[0].text, response.choices[0].finish_reason) == (text, reason)
    assert response.usage.completion_tokens == generated


# -- many streams, a quarter of them hanging up ----------------------------------------------------------


STREAM_TOKENS = 16


async def _stream(client: httpx.AsyncClient, index: int, hang_up: bool) -> int | None:
    """Tokens generated by a stream (its usage), or None when it hung up after 3 events."""
    body = {"prompt": f"the engine {index}", "stream": True, "ignore_eos": True, "temperature": 0}
    body |= {"max_tokens": 400 if hang_up else STREAM_TOKENS, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events, usage = 0, None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return usage
            events += 1
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if hang_up and events == 3:
                return None  # leaving the block closes the connection mid-stream
    raise AssertionError("the stream ended without [DONE]")


def test_200_concurrent_streams_with_disconnects_free_all_kv(server):
    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as client:
            before = (await client.get("/metrics")).text
            results = await asyncio.gather(*(_stream(client, i, hang_up=i % 4 == 0) for i in range(200)))
            completed = [r for r in results if r is not None]
            assert completed == [STREAM_TOKENS] * 150  # every one generated all its tokens
            deadline = time.monotonic() + 60  # generous: the loop ends as soon as the blocks are free
            while True:
                text = (await client.get("/metrics")).text
                idle = metric(text, "fastgen_num_requests_running") == 0
                if idle and metric(text, "fastgen_kv_blocks_used") == 0:
                    break
                assert time.monotonic() < deadline, "KV blocks were not freed"
                await asyncio.sleep(0.05)
        return before, text

    before, after = asyncio.run(main())

    def grew(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels, unset=0.0)

    assert metric(after, "fastgen_kv_blocks_total") == metric(before, "fastgen_kv_blocks_total") > 0
    assert grew("fastgen_requests_total", 'status="abort"') == 50
    assert grew("fastgen_requests_total", 'status="length"') == 150
    generated = grew("fastgen_generation_tokens_total")
    assert 150 * STREAM_TOKENS + 50 * 3 <= generated < 150 * STREAM_TOKENS + 50 * 400  # hang-ups stopped
    assert grew("fastgen_time_to_first_token_seconds_count") == 200  # each stream had a first token
    # one gap per token after the first, for every token a stream delivered (those generated after
    # a hang-up are never delivered)
    gaps = grew("fastgen_inter_token_latency_seconds_count")
    assert 150 * (STREAM_TOKENS - 1) + 50 * 2 <= gaps <= generated - 200
