"""Fuzzing of every HTTP route (issue 14's reliability suite, at CI scale).

Two generators, one property: every answer is a 4xx with a JSON error body or a well-formed 2xx
(a JSON body, or server-sent events ending in ``[DONE]`` without an error event), never a 5xx and
never a hang; and a greedy stream that runs throughout produces exactly what it produces alone.

- A boundary sweep: each numeric field of each route set, one at a time, to each value at the
  edge of what the runner holds (int32, int64, float32 limits, the vocabulary), of the wrong type,
  or null, on top of a body that samples and suppresses stop tokens (the paths where the runner
  converts those values).
- Hypothesis: valid bodies with one field set to any value (nested junk included), others changed
  within valid ranges, fields dropped or added, arbitrary JSON and bytes, varied headers and methods.

Hypothesis' examples are derandomized (the same ones every run), so CI does not flake; set
``FASTGEN_FUZZ_SEED`` to explore others and ``FASTGEN_FUZZ_EXAMPLES`` to run more.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from .helpers import sse_events
from .inprocess import served_gateway

VOCAB = 384  # the toy tokenizer's
EXAMPLES = int(os.environ.get("FASTGEN_FUZZ_EXAMPLES", "30"))
SEED = os.environ.get("FASTGEN_FUZZ_SEED")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=SEED is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
REFERENCE = {"prompt": "the engine", "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": True}


def seeded(test):
    return seed(int(SEED))(test) if SEED is not None else test


@pytest.fixture(scope="module")
def gateway(llama_path):
    # a short context bounds what any accepted request can cost
    with served_gateway(llama_path, max_model_len=32) as served:
        yield served


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def _stream_text(client: httpx.Client) -> str:
    with client.stream("POST", "/v1/completions", json=REFERENCE) as response:
        assert response.status_code == 200
        events = sse_events(response.read())
    assert all("error" not in event for event in events), events
    return "".join(event["choices"][0]["text"] for event in events)


@pytest.fixture(scope="module")
def bystander(gateway):
    """A greedy stream run again and again while the fuzzing goes on; each of its outputs must
    equal the output of the same request run alone."""
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        alone = _stream_text(client)
    outputs: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            while not stop.is_set():
                try:
                    outputs.append(_stream_text(client))
                except BaseException as exc:  # reported by the check below
                    errors.append(exc)
                    return

    thread = threading.Thread(target=run, name="bystander", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(120)
    assert not thread.is_alive(), "the bystander stream hung"
    assert not errors, errors
    assert len(outputs) >= 2, "the bystander stream did not run during the fuzzing"
    assert all(output == alone for output in outputs)


# -- values --------------------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, VOCAB - 1, VOCAB, 2**24, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63]
EDGE_INTS += [2**64 - 1, -(2**31), -(2**63)]
EDGE_FLOATS = [0.0, -0.0, 1e-45, 1e-40, 1e-6, 0.5, 1.0, 2.0, 2.5, 100.5, 1e38, 1e39, 1e308, -1e308]

ints = st.sampled_from(EDGE_INTS) | st.integers(-3, 40)
floats = st.sampled_from(EDGE_FLOATS) | st.floats(-3, 3, allow_nan=False)
texts = st.sampled_from(["", "a", "the engine", " ", "\u00e9\U0001f600", "\x00", "<s>", "</s>"]) | st.text(
    max_size=12
)
scalars = st.none() | st.booleans() | ints | floats | texts
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
small_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
edge_ids = st.lists(st.integers(0, VOCAB - 1) | st.sampled_from(EDGE_INTS), max_size=6)
texts_ok = st.sampled_from(["a", "the engine", "\u00e9\U0001f600", "</s>", "<s> hi"]) | st.text(
    min_size=1, max_size=12
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": texts_ok}
)
wild_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "tool", ""]) | texts},
    optional={
        "content": texts
        | st.none()
        | st.lists(st.fixed_dictionaries({"type": texts, "text": texts}), max_size=2),
        "name": texts,
    },
)
bias_keys = st.sampled_from(["0", "5", str(VOCAB - 1), str(VOCAB), "-1", "x", str(2**40), str(2**64)]) | texts


def field(valid: st.SearchStrategy, wild: st.SearchStrategy) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(values a client would send, cheap to serve; values near and far from those)."""
    return valid, valid | wild | anything


SAMPLING = {  # fields every route of the OpenAI API knows: (valid, wild)
    "temperature": field(st.sampled_from([0, 0.7, 1.0]), floats),
    "top_p": field(st.sampled_from([0.5, 1.0]), floats),
    "top_k": field(st.integers(0, 50), ints),
    "min_p": field(st.sampled_from([0.0, 0.1]), floats),
    "seed": field(st.integers(0, 1000), ints),
    "stop": field(st.lists(texts_ok, max_size=2), texts | st.lists(texts, max_size=20)),
    "stop_token_ids": field(st.lists(st.integers(3, VOCAB - 1), max_size=2), edge_ids),
    "presence_penalty": field(st.sampled_from([0.0, 0.5, -1.0]), floats),
    "frequency_penalty": field(st.sampled_from([0.0, 0.5, -1.0]), floats),
    "repetition_penalty": field(st.sampled_from([1.0, 1.2]), floats),
    "logit_bias": field(
        st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.integers(-5, 5)),
        st.dictionaries(bias_keys, scalars, max_size=3),
    ),
    "min_tokens": field(st.integers(0, 2), ints),
    "ignore_eos": field(st.booleans(), scalars),
    "include_stop_str_in_output": field(st.booleans(), scalars),
    "skip_special_tokens": field(st.booleans(), scalars),
    "n": field(st.integers(1, 2), ints),
    "stream": field(st.booleans(), scalars),
    "stream_options": field(
        st.none(), st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | scalars})
    ),
    "model": field(st.just("toy"), st.sampled_from(["gpt-17", ""])),
    "user": field(texts, st.nothing()),
    "max_tokens": field(st.integers(1, 4), ints),
}
COMPLETION = {
    **SAMPLING,
    "prompt": field(
        texts_ok | small_ids | st.lists(texts_ok, min_size=1, max_size=2),
        texts | edge_ids | st.lists(edge_ids, max_size=3),
    ),
    "echo": field(st.booleans(), scalars),
    "logprobs": field(st.integers(0, 3), ints),
    "best_of": field(st.none(), ints),
    "suffix": field(st.none(), texts),
}
CHAT = {
    **SAMPLING,
    "messages": field(st.lists(message, min_size=1, max_size=2), st.lists(wild_message, max_size=3)),
    "max_completion_tokens": field(st.integers(1, 4), ints),
    "logprobs": field(st.booleans(), scalars),
    "top_logprobs": field(st.integers(0, 3), ints),
}
MII = {
    "prompts": field(st.lists(texts_ok, min_size=1, max_size=2), texts | st.lists(texts, max_size=3)),
    "max_length": field(st.integers(20, 32), ints),
    "max_new_tokens": field(st.integers(1, 4), ints),
    "min_new_tokens": field(st.integers(0, 2), ints),
    "ignore_eos": field(st.booleans(), scalars),
    "return_full_text": field(st.booleans(), scalars),
    "do_sample": field(st.booleans(), scalars),
    "top_p": field(st.sampled_from([0.5, 1.0]), floats),
    "top_k": field(st.integers(0, 50), ints),
    "temperature": field(st.sampled_from([0.5, 1.0]), floats),
    "stop": field(st.lists(texts_ok, max_size=2), texts | st.lists(texts, max_size=20)),
    "seed": field(st.integers(0, 1000), ints),
    "stream": field(st.booleans(), scalars),
}
ROUTES = {
    "/v1/completions": (COMPLETION, {"prompt": "the engine", "max_tokens": 3}),
    "/v1/chat/completions": (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    "/mii/toy": (MII, {"prompts": ["the engine"], "max_new_tokens": 3}),
}


@st.composite
def bodies(draw, route: str) -> Any:
    """A body of ``route``: a valid one with a few fields set to other valid values and one field
    set to any value (or removed); now and then any JSON at all, or an unknown field."""
    fields, base = ROUTES[route]
    if draw(st.integers(0, 9)) == 0:
        return draw(anything)
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        body[name] = draw(fields[name][0])
    target = draw(st.sampled_from(sorted(fields)))
    if draw(st.integers(0, 9)) == 0:
        body.pop(target, None)
    else:
        body[target] = draw(fields[target][1])
    if draw(st.integers(0, 19)) == 0:
        body[draw(texts)] = draw(scalars)
    return body


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # floats beyond float64 do not occur; ints of any size do


def check(response: httpx.Response, route: str, seen: collections.Counter | None = None) -> None:
    """4xx with a JSON error, or a well-formed 2xx; never a 5xx. ``seen`` counts the statuses."""
    status, content = response.status_code, response.content
    if seen is not None:
        seen[status] += 1
    assert status < 500, (status, content[:500])
    if status >= 400:
        error = json.loads(content)["error"]
        assert error["message"] and isinstance(error["type"], str), content
        return
    assert status == 200, (status, content[:500])
    if response.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(content)
        assert events and all("error" not in event for event in events), content[-500:]
        return
    payload = json.loads(content)
    if route == "/mii/toy":
        assert isinstance(payload, list) and all("generated_text" in item for item in payload)
    else:
        assert payload["choices"] and "usage" in payload


# -- the boundary sweep -------------------------------------------------------------------------------

SWEEP_INTS = [-1, 0, 1, VOCAB, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
SWEEP_FLOATS = [-1.0, 0.0, 1e-45, 1e-40, 0.5, 2.5, 100.5, 1e38, 1e39, 1e308, 2**64]
SWEEP_OTHERS = [None, True, "1", [], {}, 1.5]
OPENAI_INTS = ["top_k", "seed", "n", "max_tokens", "min_tokens"]
OPENAI_FLOATS = [
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
]
SWEEP_FIELDS = {  # route -> (base body, int fields, float fields, token-id list fields)
    "/v1/completions": (
        {"prompt": "the engine", "max_tokens": 2, "min_tokens": 1, "temperature": 1.0},
        [*OPENAI_INTS, "logprobs", "best_of"],
        OPENAI_FLOATS,
        ["stop_token_ids", "prompt"],
    ),
    "/v1/chat/completions": (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "min_tokens": 1,
            "temperature": 1.0,
        },
        [*OPENAI_INTS, "max_completion_tokens", "top_logprobs"],
        OPENAI_FLOATS,
        ["stop_token_ids"],
    ),
    "/mii/toy": (
        {"prompts": ["the engine"], "max_new_tokens": 2, "min_new_tokens": 1, "do_sample": True},
        ["top_k", "seed", "max_new_tokens", "min_new_tokens", "max_length"],
        ["temperature", "top_p"],
        [],
    ),
}


def sweep_bodies(route: str) -> list[dict]:
    base, int_fields, float_fields, id_fields = SWEEP_FIELDS[route]
    bodies = []
    for name in int_fields:
        bodies += [{**base, name: value} for value in SWEEP_INTS + SWEEP_OTHERS]
    for name in float_fields:
        bodies += [{**base, name: value} for value in SWEEP_FLOATS + SWEEP_OTHERS]
    for name in id_fields:
        bodies += [{**base, name: [5, value]} for value in SWEEP_INTS + SWEEP_OTHERS]
    if route != "/mii/toy":
        bodies += [{**base, "logit_bias": {str(value): 1}} for value in SWEEP_INTS]
        bodies += [{**base, "logit_bias": {"5": value}} for value in SWEEP_FLOATS + SWEEP_OTHERS]
    return bodies + [{**body, "stream": True} for body in bodies[::3]]


@pytest.mark.parametrize("route", sorted(SWEEP_FIELDS))
def test_boundary_values_of_every_numeric_field_get_4xx_or_valid_2xx(gateway, bystander, route):
    async def main() -> list[tuple[dict, httpx.Response]]:
        limit = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:

            async def send(body: dict) -> tuple[dict, httpx.Response]:
                async with limit:
                    return body, await client.post(route, content=encode(body), headers=JSON)

            return await asyncio.gather(*(send(body) for body in sweep_bodies(route)))

    seen: collections.Counter = collections.Counter()
    for body, response in asyncio.run(main()):
        try:
            check(response, route, seen)
        except AssertionError as exc:
            raise AssertionError(f"{body}: {exc}") from None
    assert seen[200] >= 10 and seen[400] >= 10, seen


# -- hypothesis -----------------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzzed_bodies_get_4xx_or_valid_2xx(client, bystander, route):
    seen: collections.Counter = collections.Counter()

    @FUZZ
    @seeded
    @given(body=bodies(route))
    def fuzz(body: Any) -> None:
        response = client.post(route, content=encode(body), headers=JSON)
        check(response, route, seen)

    fuzz()
    # the examples reach both sides: accepted requests and refused ones
    assert seen[200] >= 3 and sum(n for status, n in seen.items() if status >= 400) >= 3, seen


HEADER_VALUES = {
    "content-type": st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", "", "application/jsonx", "*/*"]
    ),
    "host": st.sampled_from(
        ["localhost", "127.0.0.1:1", "[::1]", "evil.example", "localhost.evil.example", ""]
    ),
    "origin": st.sampled_from(["null", "http://localhost", "https://evil.example", "file://", "x"]),
    "content-encoding": st.sampled_from(["gzip", "identity"]),
    "accept": st.sampled_from(["*/*", "text/event-stream", "application/xml"]),
    "x-request-id": st.text(alphabet="abcdef0123456789-", max_size=40),
}
headers = st.fixed_dictionaries({}, optional=HEADER_VALUES)


@FUZZ
@seeded
@given(
    route=st.sampled_from([*sorted(ROUTES), "/v1/models", "/health", "/metrics", "/nope"]),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]),
    headers=headers,
    raw=st.booleans(),
    data=st.data(),
)
def test_fuzzed_headers_methods_and_raw_bytes(client, bystander, route, method, headers, raw, data):
    if raw:
        content = data.draw(st.binary(max_size=64) | st.just(b'{"prompt": "x"') | st.just(b"\xff\xfe{}"))
    else:
        content = encode(data.draw(bodies(route)) if route in ROUTES else data.draw(anything))
    response = client.request(method, route, content=content, headers=headers)
    assert response.status_code < 500, (response.status_code, response.content[:500])
    if response.status_code >= 400:
        assert "error" in json.loads(response.content), response.content
    elif route in ROUTES:
        check(response, route)
