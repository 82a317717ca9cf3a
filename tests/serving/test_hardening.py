"""Issue 14's findings, each a test: a request that would overflow the runner is refused at the
door (and never fails the requests it would have shared a step with); web pages cannot reach a
local server (Content-Type, Host, Origin); bodies and heads are bounded in size and time; a huge
prompt is tokenized off the event loop; error bodies carry no internals; smaller checks."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import httpx
import msgspec
import pytest

from fastgen.cli import build_parser
from fastgen.config import EngineConfig
from fastgen.errors import EngineDeadError, InvalidRequestError, StepError
from fastgen.sampling_params import MAX_INT32, SamplingParams
from fastgen.serving import openai_api as oai
from fastgen.serving.gateway import create_app
from fastgen.serving.guard import HttpPolicy
from fastgen.serving.server import DeploymentSpec

from .conftest import start_cli_server, stop_cli_server
from .inprocess import EchoBackend, echo_backend, served_backend, served_gateway

VOCAB = 384  # the toy tokenizer's
SLACK_S = 10.0  # added to configured timeouts: CI is a busy 2-core machine


@pytest.fixture(scope="module")
def gateway(llama_path):
    with served_gateway(llama_path, policy=HttpPolicy(max_body_bytes=1 << 20)) as served:
        yield served


QUICK = HttpPolicy(max_body_bytes=4096, body_timeout_s=1.0, header_timeout_s=1.0, keep_alive_timeout_s=1.0)


@pytest.fixture(scope="module")
def quick():
    """The gateway over a stand-in backend, with small limits and 1 s timeouts."""
    with served_backend(echo_backend, policy=QUICK) as served:
        yield served


# -- raw HTTP ---------------------------------------------------------------------------------------


def exchange(port: int, data: bytes, *, timeout_s: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` over a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        return parse_response(read_all(sock))


def read_all(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def request_bytes(
    port: int, body: bytes, *, headers: dict[str, str] | None = None, path: str = "/v1/completions"
) -> bytes:
    fields = {
        "Host": f"127.0.0.1:{port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
    }
    fields.update(headers or {})
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items() if value is not None)
    return f"POST {path} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode("latin-1") + body


JSON = {"content-type": "application/json"}


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


# -- isolation: values the runner cannot hold are refused at the door -----------------------------------


async def _greedy_stream(client: httpx.AsyncClient, prompt: str, started: asyncio.Event | None) -> str:
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                if started is not None:
                    started.set()
    return text


def test_top_k_beyond_int32_is_refused_and_concurrent_streams_are_unharmed(gateway):
    """Issue 14, finding 1: top_k = 2**31 passed validation and overflowed the runner's int32
    tensor, failing every request in its step."""
    prompts = [f"the engine {i} schedules" for i in range(4)]

    async def main() -> tuple[list[str], list[str], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            alone = [await _greedy_stream(client, prompt, None) for prompt in prompts]
            started = [asyncio.Event() for _ in prompts]
            streams = [asyncio.ensure_future(_greedy_stream(client, p, e)) for p, e in zip(prompts, started)]
            await asyncio.gather(*(event.wait() for event in started))  # all running: share steps
            bad = {"prompt": "a paged cache", "max_tokens": 8, "temperature": 0.9, "top_k": 2**31}
            refused = await asyncio.gather(
                client.post("/v1/completions", json=bad),
                client.post("/v1/completions", json={**bad, "stream": True}),
                client.post(
                    "/mii/toy", json={"prompts": ["a paged cache"], "do_sample": True, "top_k": 2**31}
                ),
            )
            return alone, await asyncio.gather(*streams), refused

    alone, together, refused = asyncio.run(main())
    for response in refused:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "top_k"
    assert together == alone


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "x", "top_k": 2**63}, "top_k"),
        ("/v1/completions", {"prompt": "x", "seed": 2**64 - 1}, "seed"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2**31}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "min_tokens": 2**31}, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": 1e39}, "temperature"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e39}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e-40}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [2**63]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        (
            "/v1/completions",
            {"prompt": "x", "min_tokens": 1, "stop_token_ids": [VOCAB + 5]},
            "stop_token_ids",
        ),
        ("/v1/completions", {"prompt": "x", "logit_bias": {str(2**40): 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": ["s" * 513]}, "stop"),
        ("/v1/completions", {"prompt": [5, 2**40]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_k": 2**31}, "top_k"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [VOCAB]},
            "stop_token_ids",
        ),
        ("/mii/toy", {"prompts": ["x"], "max_new_tokens": 2**31}, "max_new_tokens"),
        ("/mii/toy", {"prompts": ["x"], "max_length": 2**31}, "max_length"),
        ("/mii/toy", {"prompts": ["x"], "do_sample": True, "temperature": 1e39}, "temperature"),
    ],
)
def test_values_the_runner_cannot_hold_get_400_naming_the_field(gateway, path, body, param):
    for stream in (False, True):
        response = httpx.post(f"{gateway.url}{path}", json={**body, "stream": stream}, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_sampling_params_bounds_are_the_runners():
    SamplingParams(top_k=MAX_INT32, seed=2**63 - 1, max_new_tokens=MAX_INT32, temperature=1e38).validate()
    SamplingParams(stop_token_ids=[VOCAB - 1], logit_bias={VOCAB - 1: 1.0}).validate(vocab_size=VOCAB)
    bad = [
        (dict(top_k=MAX_INT32 + 1), "top_k"),
        (dict(seed=2**63), "seed"),
        (dict(max_length=MAX_INT32 + 1), "max_length"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(stop_token_ids=[True]), "stop_token_ids"),
        (dict(logit_bias={1: float("nan")}), "logit_bias"),
    ]
    for options, field in bad:
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**options).validate()
        assert info.value.field == field, options
    for options, field in [
        (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
        (dict(logit_bias={VOCAB: 1.0}), "logit_bias"),
    ]:
        SamplingParams(
            **options
        ).validate()  # below 2**31: only the engine, which knows the vocabulary, refuses
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**options).validate(vocab_size=VOCAB)
        assert info.value.field == field


# -- web pages: Content-Type, Host, Origin ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type, status",
    [
        ("text/plain", 415),
        ("text/plain;charset=UTF-8", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        (None, 415),
        ("application/json", 200),
        ("Application/JSON; charset=utf-8", 200),
    ],
)
def test_json_routes_need_a_json_content_type(quick, content_type, status):
    body = b'{"prompt": "hello"}'
    for path in ("/v1/completions", "/mii/toy"):
        code, _, payload = exchange(
            quick.port, request_bytes(quick.port, body, headers={"Content-Type": content_type}, path=path)
        )
        assert code == status, payload
        if status == 415:
            assert error_of(payload)["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "host, status",
    [
        ("evil.example", 421),
        ("evil.example:{port}", 421),
        ("127.0.0.1.evil.example:{port}", 421),
        ("localhost:{port}", 200),
        ("LOCALHOST.:{port}", 200),
        ("127.0.0.1:{port}", 200),
        ("127.0.0.1", 200),
        ("[::1]:{port}", 200),
        (None, 200),
    ],
)
def test_only_local_host_names_are_served_by_default(quick, host, status):
    if host is None:  # HTTP/1.0 may leave Host out (HTTP/1.1 must not: h11 answers 400)
        requests = [b"GET /health HTTP/1.0\r\n\r\n"]
    else:
        host = host.format(port=quick.port)
        get = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        requests = [get, request_bytes(quick.port, b'{"prompt": "hi"}', headers={"Host": host})]
    for data in requests:
        code, _, payload = exchange(quick.port, data)
        assert code == status, payload
        if status == 421:
            assert error_of(payload)["code"] == "host_not_allowed"


def test_allowed_hosts_and_origins_are_configurable():
    async def main() -> None:
        policy = HttpPolicy(
            allowed_hosts=("api.example", "other.example:8443"), allowed_origins=("https://app.example",)
        )
        app = create_app(EchoBackend(), policy=policy)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api.example"
        ) as client:
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/health", headers={"host": "api.example:9"})).status_code == 200
            assert (await client.get("/health", headers={"host": "other.example:8443"})).status_code == 200
            assert (await client.get("/health", headers={"host": "other.example:8444"})).status_code == 421
            assert (
                await client.get("/health", headers={"host": "localhost"})
            ).status_code == 421  # not listed
            allowed = await client.post(
                "/v1/completions", json={"prompt": "hi"}, headers={"origin": "https://app.example"}
            )
            assert (
                allowed.status_code == 200
                and allowed.headers["access-control-allow-origin"] == "https://app.example"
            )
            other = await client.post(
                "/v1/completions", json={"prompt": "hi"}, headers={"origin": "https://evil.example"}
            )
            assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
        anyone = create_app(EchoBackend(), policy=HttpPolicy(allowed_hosts=("*",), allowed_origins=("*",)))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=anyone), base_url="http://whatever.example"
        ) as client:
            response = await client.get("/health", headers={"origin": "https://site.example"})
            assert response.status_code == 200

    asyncio.run(main())


def test_foreign_origins_are_refused_and_preflights_answered_only_for_allowed_ones(quick):
    own = f"http://127.0.0.1:{quick.port}"
    for origin, status in [
        ("https://evil.example", 403),
        ("null", 403),
        (f"http://localhost:{quick.port}", 403),  # another host name than the request's
        (own, 200),  # a page of this very server
    ]:
        code, headers, payload = exchange(
            quick.port, request_bytes(quick.port, b'{"prompt": "hi"}', headers={"Origin": origin})
        )
        assert code == status, (origin, payload)
        assert "access-control-allow-origin" not in headers
    preflight = (
        f"OPTIONS /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{quick.port}\r\nOrigin: https://evil.example\r\n"
        "Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n"
        "Connection: close\r\n\r\n"
    )
    code, headers, _ = exchange(quick.port, preflight.encode())
    assert code == 403 and "access-control-allow-origin" not in headers

    async def allowed_preflight() -> httpx.Response:
        app = create_app(EchoBackend(), policy=HttpPolicy(allowed_origins=("https://app.example",)))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as client:
            headers = {
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, authorization",
            }
            return await client.options("/v1/completions", headers=headers)

    response = asyncio.run(allowed_preflight())
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "content-type, authorization"


# -- bodies and heads bounded in size and time ---------------------------------------------------------


def test_a_body_over_the_limit_is_refused_by_its_content_length_before_it_is_sent(quick):
    head = request_bytes(quick.port, b"", headers={"Content-Length": str(10**9)})
    with socket.create_connection(("127.0.0.1", quick.port), timeout=60) as sock:
        sock.sendall(head)  # the head alone: the answer must not wait for the gigabyte
        code, headers, payload = parse_response(read_all(sock))
    assert code == 413 and error_of(payload)["code"] == "request_too_large"
    assert headers["connection"] == "close"


def test_a_chunked_body_is_cut_off_past_the_limit(quick):
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{quick.port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", quick.port), timeout=60) as sock:
        sock.sendall(head)
        try:
            while sent < 256 * QUICK.max_body_bytes:  # far past the limit: the server stops reading first
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = read_all(sock)
    assert received, "no answer"
    code, _, payload = parse_response(received)
    assert code == 413 and error_of(payload)["code"] == "request_too_large"


def test_a_client_that_sends_a_body_over_the_limit_sees_413_not_a_reset(quick):
    """The server stops reading at once but lingers before it closes: closing with the body
    unread would reset the connection, and a client still sending would lose the answer."""

    async def main() -> list[int]:
        body = json.dumps({"prompt": "the engine " * 800_000}).encode()  # ~9 MB (more than socket buffers)
        async with httpx.AsyncClient(base_url=quick.url, timeout=60) as client:
            responses = [await client.post("/v1/completions", content=body, headers=JSON) for _ in range(5)]
        return [response.status_code for response in responses]

    assert asyncio.run(main()) == [413] * 5


def test_refused_requests_keep_their_connection_usable(quick):
    """A refusal that is not about the body's size reads the body first and keeps the connection,
    so a pooled client's next request goes through on it."""

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=quick.url, timeout=60, limits=limits) as client:
            statuses = []
            for content_type in ["text/plain", "application/json"] * 3:
                body = json.dumps({"prompt": "x" * 2000}).encode()
                response = await client.post(
                    "/v1/completions", content=body, headers={"content-type": content_type}
                )
                statuses.append(response.status_code)
                assert response.headers.get("connection") != "close"
        return statuses

    assert asyncio.run(main()) == [415, 200] * 3


def test_a_body_shorter_than_its_content_length_times_out(quick):
    with socket.create_connection(("127.0.0.1", quick.port), timeout=QUICK.body_timeout_s + SLACK_S) as sock:
        sock.sendall(request_bytes(quick.port, b'{"prompt": ', headers={"Content-Length": "100"}))
        started = time.monotonic()
        code, _, payload = parse_response(read_all(sock))  # socket timeout: the test fails
        waited = time.monotonic() - started
    assert code == 408 and error_of(payload)["code"] == "request_timeout"
    assert QUICK.body_timeout_s * 0.5 <= waited <= QUICK.body_timeout_s + SLACK_S


@pytest.mark.parametrize("trickle", [False, True])
def test_a_head_that_never_ends_is_closed(quick, trickle):
    """Slowloris: a request head sent slowly, or never finished, holds no connection past the
    head deadline (uvicorn alone waits forever: its keep-alive timer stops at the first byte)."""
    with socket.create_connection(
        ("127.0.0.1", quick.port), timeout=QUICK.header_timeout_s + SLACK_S
    ) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{quick.port}\r\n".encode())
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < QUICK.header_timeout_s + SLACK_S:
            try:
                if trickle:
                    sock.sendall(b"X-Slow: y\r\n")
                    sock.settimeout(0.2)
                data = sock.recv(1024)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if data == b"":
                closed = True
                break
        waited = time.monotonic() - started
    assert closed, "the connection was still open"
    assert waited <= QUICK.header_timeout_s + SLACK_S


def test_an_idle_keep_alive_connection_is_closed(quick):
    with socket.create_connection(
        ("127.0.0.1", quick.port), timeout=QUICK.keep_alive_timeout_s + SLACK_S
    ) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{quick.port}\r\n\r\n".encode())
        data = read_all(sock)  # the answer, then the close
    assert parse_response(data)[0] == 200


# -- a huge prompt is tokenized off the event loop ----------------------------------------------------------


class HeldTokenizer:
    """The engine's tokenizer, except that tokenizing (or rendering) a text longer than ``long``
    characters waits until `release` is set: a stand-in for a very slow tokenization."""

    def __init__(self, tokenizer: Any, long: int):
        self._tokenizer = tokenizer
        self._long = long
        self.entered = threading.Event()
        self.release = threading.Event()

    def _hold(self, size: int) -> None:
        if size > self._long:
            self.entered.set()
            assert self.release.wait(120), "never released"

    def __call__(self, text: str, **options: Any) -> Any:
        self._hold(len(text))
        return self._tokenizer(text, **options)

    def apply_chat_template(self, messages: list[dict], **options: Any) -> Any:
        self._hold(sum(len(m["content"]) for m in messages))
        return self._tokenizer.apply_chat_template(messages, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_health_and_streams_go_on_while_a_huge_prompt_is_tokenized(gateway, route):
    long_text = "the engine schedules a paged cache. " * 600  # longer than the context, too
    body = (
        {"prompt": long_text, "max_tokens": 4}
        if route == "/v1/completions"
        else {"messages": [{"role": "user", "content": long_text}], "max_tokens": 4}
    )
    engine = gateway.engine
    held = HeldTokenizer(engine.tokenizer, long=10_000)

    async def main() -> tuple[int, int, httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            counts = [0]
            first = asyncio.Event()

            async def stream() -> None:
                request = {
                    "prompt": "the engine",
                    "max_tokens": 400,
                    "ignore_eos": True,
                    "temperature": 0,
                    "stream": True,
                }
                async with client.stream("POST", "/v1/completions", json=request) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            counts[0] += 1
                            first.set()

            streaming = asyncio.ensure_future(stream())
            await first.wait()
            huge = asyncio.ensure_future(client.post(route, json=body))
            await asyncio.to_thread(held.entered.wait, 60)
            assert held.entered.is_set(), "the huge prompt was never tokenized"
            health = await client.get("/health", timeout=30)  # a stalled loop would time out here
            before = counts[0]
            while counts[0] < before + 3 and not streaming.done():  # the stream moves on meanwhile
                await asyncio.sleep(0.01)
            assert not huge.done(), "the huge request finished while its tokenizer was held"
            moved = counts[0] - before
            held.release.set()
            streaming.cancel()  # hanging up aborts the stream
            await asyncio.gather(streaming, return_exceptions=True)
            return health.status_code, moved, await huge

    engine.tokenizer = held
    try:
        status, moved, huge = asyncio.run(main())
    finally:
        held.release.set()
        engine.tokenizer = held._tokenizer
    assert status == 200 and moved >= 3
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "prompt"  # longer than the context


# -- error bodies name the problem, not the internals -----------------------------------------------------


class FailingBackend(EchoBackend):
    """Fails every request with ``error``, after ``after`` outputs."""

    def __init__(self, error: BaseException, after: int = 0):
        self.error = error
        self.after = after

    async def stream_outputs(self, prompt: Any, params: Any, *, request_id: str | None = None):
        for _ in range(self.after):
            async for output in super().stream_outputs(prompt, params, request_id=request_id):
                output.finish_reason = None
                yield output
        raise self.error


SECRET = "/home/secret/model.bin pid 4242"


@pytest.mark.parametrize(
    "error, status, code",
    [
        (RuntimeError(f"CUDA error at {SECRET}"), 500, "internal_error"),
        (StepError(f"a forward step failed: RuntimeError('{SECRET}')"), 500, "step_failed"),
        (EngineDeadError(f"the engine stopped: {SECRET}"), 503, "engine_dead"),
    ],
)
def test_error_bodies_carry_no_internals(error, status, code):
    async def main() -> list[httpx.Response]:
        responses = []
        for after in (0, 1):
            app = create_app(FailingBackend(error, after))
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://localhost"
            ) as client:
                for path, body in [
                    ("/v1/completions", {"prompt": "hi"}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                    ("/mii/toy", {"prompts": ["hi"]}),
                ]:
                    responses.append(await client.post(path, json=body))
                    responses.append(await client.post(path, json={**body, "stream": True}))
        return responses

    for response in asyncio.run(main()):
        text = response.text
        assert (
            "secret" not in text
            and "4242" not in text
            and "Traceback" not in text
            and "RuntimeError" not in text
        )
        if response.status_code == 200:  # failed after the stream began: a last error event
            assert f'"code":"{code}"' in text and text.endswith("data: [DONE]\n\n")
        else:
            assert response.status_code == status and error_of(response.content)["code"] == code


# -- smaller: chat content, stream_options -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": None}]},
            "messages[1].content",
        ),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stream": False, "stream_options": {}},
            "stream_options",
        ),
    ],
)
def test_missing_chat_content_and_stream_options_without_stream_are_refused(quick, path, body, param):
    response = httpx.post(f"{quick.url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_chat_choices_name_the_message_without_content():
    request = oai.ChatCompletionRequest(
        messages=[oai.ChatMessageIn("user", "hi"), oai.ChatMessageIn("assistant")]
    )
    with pytest.raises(InvalidRequestError) as info:
        oai.chat_choices(request)
    assert info.value.field == "messages[1].content"


# -- fastgen serve passes its flags on ---------------------------------------------------------------------


def test_serve_flags_set_hosts_origins_and_body_limit(llama_path):
    process, url = start_cli_server(
        llama_path,
        "--dtype", "float32",
        "--allowed-hosts", "api.example,other.example:9",
        "--allowed-origins", "https://app.example",
        "--max-body-bytes", "2000",
    )  # fmt: skip
    try:
        port = int(url.rsplit(":", 1)[1])
        get = lambda host, extra="": exchange(
            port, f"GET /health HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        assert get(f"api.example:{port}")[0] == 200
        assert get("other.example:9")[0] == 200
        assert get(f"evil.example:{port}")[0] == 421
        assert get(f"localhost:{port}")[0] == 200
        status, headers, _ = get(f"localhost:{port}", "Origin: https://app.example\r\n")
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        assert get(f"localhost:{port}", "Origin: https://evil.example\r\n")[0] == 403
        small = json.dumps({"prompt": "the engine", "max_tokens": 2}).encode()
        assert exchange(port, request_bytes(port, small))[0] == 200
        large = json.dumps({"prompt": "the engine " * 200, "max_tokens": 2}).encode()
        assert exchange(port, request_bytes(port, large))[0] == 413
    finally:
        stop_cli_server(process)


def test_a_deployment_gets_the_serve_flags(monkeypatch):
    """With --replicas, fastgen serve starts a deployment: the policy travels in its spec."""
    captured: dict[str, Any] = {}

    class Started(Exception):
        pass

    def serve(model: str, **options: Any) -> None:
        captured.update(options)
        raise Started

    monkeypatch.setattr("fastgen.serving.launcher.serve", serve)
    argv = ["serve", "some-model", "--replicas", "2", "--host", "10.1.2.3", "--allowed-hosts", "api.example"]
    args = build_parser().parse_args(
        [*argv, "--allowed-origins", "https://app.example", "--max-body-bytes", "100"]
    )
    with pytest.raises(Started):
        args.func(args)
    policy = captured["restful_api_policy"]
    assert {"api.example", "10.1.2.3", "localhost"} <= set(policy.allowed_hosts)
    assert policy.allowed_origins == ("https://app.example",) and policy.max_body_bytes == 100
    spec = DeploymentSpec(name="d", model="m", engine_config=EngineConfig(), http_policy=policy)
    assert msgspec.json.decode(msgspec.json.encode(spec), type=DeploymentSpec).http_policy == policy
