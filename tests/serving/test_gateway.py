"""The HTTP gateway over a scripted `Backend` (no engine): what a client sees when the backend is
unhealthy, fails in the middle of a stream, or does not answer for its stats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastgen import SamplingParams, StepError
from fastgen.outputs import EngineStats, RequestOutput
from fastgen.serving import gateway
from fastgen.serving.gateway import create_app

from .helpers import metric, sse_events

HANG = "hang"  # a backend answer that never comes


class ScriptedBackend:
    """Streams ``pieces`` of text, then fails with ``error`` (or finishes when None); ``healthy``
    and ``stats`` are what `health` and `stats` answer (`HANG`: never, an exception: raised)."""

    max_model_len = 64

    def __init__(self, pieces: list[str], error: BaseException | None = None):
        self.model_names = ["toy"]
        self.pieces, self.error = pieces, error
        self.healthy: Any = True
        self.stats_answer: Any = EngineStats(1, 0, 10, 7, 0, 5, 3, 4)

    async def stream_outputs(
        self, prompt: Any, params: SamplingParams, *, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        for count, piece in enumerate(self.pieces, start=1):
            last = count == len(self.pieces) and self.error is None
            yield RequestOutput(
                request_id=request_id or "r",
                text=piece,
                token_ids=[10 + count],
                prompt_tokens=2,
                generated_tokens=count,
                finish_reason="length" if last else None,
            )
            await asyncio.sleep(0)
        if self.error is not None:
            raise self.error

    async def _answer(self, value: Any) -> Any:
        if value == HANG:
            await asyncio.Event().wait()
        if isinstance(value, BaseException):
            raise value
        return value

    async def health(self) -> bool:
        return await self._answer(self.healthy)

    async def stats(self) -> EngineStats:
        return await self._answer(self.stats_answer)


@pytest.fixture
def quick_timeouts(monkeypatch):
    """The gateway waits 0.2 s (instead of 5 s) for a backend's health and stats."""
    monkeypatch.setattr(gateway, "_BACKEND_TIMEOUT_S", 0.2)


async def call(backend: ScriptedBackend, method: str, path: str, body: dict | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(backend))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        return await client.request(method, path, json=body, timeout=30)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


@pytest.mark.parametrize("answer", [True, False, RuntimeError("replica lost"), HANG])
def test_health_is_503_unless_the_backend_says_healthy_in_time(quick_timeouts, answer):
    backend = ScriptedBackend(["x"])
    backend.healthy = answer
    response = run(call(backend, "GET", "/health"))
    if answer is True:
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
    else:
        assert (response.status_code, response.json()) == (503, {"status": "unhealthy"})


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "hi", "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("/mii/toy", {"prompts": ["hi"], "stream": True}),
    ],
)
def test_an_error_mid_stream_ends_it_with_one_error_event(path, body):
    backend = ScriptedBackend(["ab", "cd"], StepError("a forward step failed: boom"))
    response = run(call(backend, "POST", path, body))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.content)  # the framing, and exactly one [DONE] at the end
    *deltas, last = events
    assert set(last) == {"error"} and last["error"]["message"]
    assert (last["error"]["type"], last["error"]["code"]) == ("server_error", "step_failed")
    assert all("error" not in event for event in deltas)
    text = "".join(text_of(event) for event in deltas)
    assert text == "abcd"  # what was generated before the failure was delivered


def text_of(event: dict) -> str:
    if "generated_text" in event:  # MII
        return event["generated_text"]
    choice = event["choices"][0]
    return choice.get("text") or choice.get("delta", {}).get("content") or ""


def test_the_same_error_before_any_output_is_a_plain_json_error():
    backend = ScriptedBackend([], StepError("a forward step failed: boom"))
    response = run(call(backend, "POST", "/v1/completions", {"prompt": "hi", "stream": True}))
    assert response.status_code == 500 and response.json()["error"]["code"] == "step_failed"


def test_metrics_answer_when_the_stats_time_out(quick_timeouts):
    backend = ScriptedBackend(["ab", "cd"])

    async def main():
        transport = httpx.ASGITransport(app=create_app(backend))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            await client.post("/v1/completions", json={"prompt": "hi"})
            answered = await client.get("/metrics")
            backend.stats_answer = HANG
            silent = await asyncio.wait_for(client.get("/metrics"), 10)  # not held up by the backend
            await client.post("/v1/completions", json={"prompt": "hi"})
            later = await client.get("/metrics")
            return answered, silent, later

    answered, silent, later = run(main())
    assert answered.status_code == silent.status_code == later.status_code == 200
    assert metric(answered.text, "fastgen_kv_blocks_total") == 10
    # the serving metrics go on being counted and reported without the engine's stats
    assert metric(silent.text, "fastgen_requests_total", 'status="length"') == 1
    assert metric(later.text, "fastgen_requests_total", 'status="length"') == 2
    assert list(text_string_to_metric_families(later.text))  # a whole exposition
