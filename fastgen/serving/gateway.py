"""The HTTP gateway: a Starlette app over any `Backend`, mountable in a host's own app.

Routes: ``POST /mii/{deployment_name}`` (MII's REST body), ``POST /v1/completions``,
``POST /v1/chat/completions`` (OpenAI-compatible, ``stream: true`` as server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Every response that waits on generation runs in a task raced against the client's disconnect:
when the client goes away, the task is cancelled, which aborts its engine requests and frees their
KV blocks. A request is accepted or refused as a whole before the first byte is sent, so refusals
(bad input, overload) get a real status code and a JSON error body, even for ``stream: true``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fastgen.errors import DeploymentNotFoundError
from fastgen.inputs import Prompt
from fastgen.logprobs import shift_offsets
from fastgen.streams import CollectedOutput, StreamGroup, collect_group

from . import openai_api as oai
from .backend import Backend
from .errors import ErrorInfo, ModelNotFoundError, describe_error
from .guard import HttpPolicy, RequestGuard
from .metrics import CONTENT_TYPE, ServingMetrics
from .mii_api import MiiRequest, response_dict

logger = logging.getLogger("fastgen.serving.gateway")

DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_BACKEND_TIMEOUT_S = 5.0


def create_app(
    backend: Backend, *, metrics: ServingMetrics | None = None, policy: HttpPolicy | None = None
) -> Starlette:
    """The gateway's ASGI app over ``backend`` (the caller owns the backend's life cycle).

    ``policy`` says which hosts and web origins it answers and how large a body it reads (see
    `fastgen.serving.guard`); the default answers local names and addresses only. A host app that
    mounts the gateway under another name passes its own, e.g. ``HttpPolicy(allowed_hosts=...)``.
    """
    gateway = _Gateway(backend, metrics or ServingMetrics())
    routes = [
        Route("/mii/{deployment_name}", gateway.mii, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestGuard, policy=policy or HttpPolicy())],
        exception_handlers={HTTPException: _http_exception},
    )
    app.state.backend = backend
    app.state.metrics = gateway.metrics
    return app


def sse(payload: Any) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON error response of ``exc`` (status from the one table in `errors`)."""
    info = describe_error(exc)
    return JSONResponse(info.body(), status_code=info.status)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = {"error": {"message": exc.detail, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


# -- responses raced against the client's disconnect ----------------------------------------------


class _Respond:
    """An ASGI response running ``respond(send)``, cancelled if the client disconnects first."""

    def __init__(self, respond: Callable[[Send], Awaitable[None]]):
        self._respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._respond(send))
        watch = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, watch):
                task.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)
        if not work.cancelled() and work.exception() is not None:
            raise work.exception()  # a bug: let the server log it


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, payload: Any) -> None:
    body = msgspec.json.encode(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _log_failure(what: str, exc: BaseException, info: ErrorInfo) -> None:
    """Server-side errors are logged in full here; their response names only the type."""
    if info.status >= 500:
        internal = info.code == "internal_error"
        logger.warning("%s: %r", what, exc, exc_info=exc if internal else None)


async def _send_error(send: Send, exc: BaseException) -> None:
    info = describe_error(exc)
    _log_failure("request failed", exc, info)
    await _send_json(send, info.status, info.body())


async def _respond_json(send: Send, result: Awaitable[Any]) -> None:
    try:
        payload = await result
    except Exception as exc:
        await _send_error(send, exc)
        return
    await _send_json(send, 200, payload)


async def _respond_stream(send: Send, events: AsyncIterator[bytes]) -> None:
    """Send ``events`` as an SSE stream; an error before the first event becomes a JSON error
    response, an error after it a final ``data: {"error": ...}`` event."""
    try:
        try:
            first = await anext(events)
        except Exception as exc:
            await _send_error(send, exc)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        try:
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except Exception as exc:
            info = describe_error(exc)
            _log_failure("stream failed after it started", exc, info)
            await send({"type": "http.response.body", "body": sse(info.body()) + DONE, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await events.aclose()


# -- collected outputs ----------------------------------------------------------------------------


def _usage_of(choices: list[oai.Choice], results: list[CollectedOutput], *, generated: bool = True) -> dict:
    # each prompt counts once, however many choices it has (the first choice's cache hits)
    prompts = {choice.prompt_index: result for choice, result in reversed(list(zip(choices, results)))}
    return oai.usage(
        sum(result.prompt_tokens for result in prompts.values()),
        sum(result.generated_tokens for result in results) if generated else 0,
        cached_tokens=sum(result.cached_tokens for result in prompts.values()),
    )


# -- the routes -------------------------------------------------------------------------------------


class _Gateway:
    def __init__(self, backend: Backend, metrics: ServingMetrics):
        self.backend = backend
        self.metrics = metrics

    def _group(self, jobs: list[tuple[Prompt, Any]], request_id: str) -> StreamGroup:
        streams = [
            self.metrics.track(self.backend.stream_outputs(prompt, params, request_id=f"{request_id}-{i}"))
            for i, (prompt, params) in enumerate(jobs)
        ]
        return StreamGroup(streams)

    def _refuse(self, exc: BaseException) -> Response:
        self.metrics.count_refused(exc)
        _log_failure("request refused", exc, describe_error(exc))
        return error_response(exc)

    def _model(self, requested: str | None) -> str:
        names = self.backend.model_names
        if requested is None or requested in names:
            return requested or names[0]
        raise ModelNotFoundError(f"the model {requested!r} does not exist (this server serves {names[0]!r})")

    # -- MII --------------------------------------------------------------------------------------

    async def mii(self, request: Request) -> Any:
        try:
            name = request.path_params["deployment_name"]
            if name not in self.backend.model_names:
                raise DeploymentNotFoundError(
                    f"no deployment named {name!r} here (this server serves {self.backend.model_names[0]!r})"
                )
            body = msgspec.json.decode(await request.body(), type=MiiRequest)
            prompts = body.prompt_list()
            params, full_text = body.sampling()
        except Exception as exc:
            return self._refuse(exc)
        jobs = [(prompt, params) for prompt in prompts]
        if body.streaming:
            events = self._mii_events(prompts, jobs, full_text)
            return _Respond(partial(_respond_stream, events=events))
        return _Respond(partial(_respond_json, result=self._mii_result(prompts, jobs, full_text)))

    async def _mii_result(self, prompts: list[str], jobs: list, full_text: bool) -> list[dict]:
        results = await collect_group(self._group(jobs, oai.new_id("mii")), len(prompts))
        return [response_dict(prompt, r.text, r, full_text=full_text) for prompt, r in zip(prompts, results)]

    async def _mii_events(self, prompts: list[str], jobs: list, full_text: bool) -> AsyncIterator[bytes]:
        group = self._group(jobs, oai.new_id("mii"))
        try:
            await group.start()
            started: set[int] = set()
            async for index, out in group:
                first = index not in started
                started.add(index)
                delta = response_dict(prompts[index], out.text, out, full_text=full_text, first=first)
                yield sse({"index": index, **delta})
            yield DONE
        finally:
            await group.aclose()

    # -- OpenAI completions -----------------------------------------------------------------------

    async def completions(self, request: Request) -> Any:
        try:
            body = msgspec.json.decode(await request.body(), type=oai.CompletionRequest)
            model = self._model(body.model)
            choices = oai.completion_choices(body)
        except Exception as exc:
            return self._refuse(exc)
        if body.stream:
            events = self._completion_events(body, model, choices)
            return _Respond(partial(_respond_stream, events=events))
        return _Respond(partial(_respond_json, result=self._completion(body, model, choices)))

    def _choice_group(self, prefix: str, choices: list[oai.Choice]) -> tuple[str, StreamGroup]:
        response_id = oai.new_id(prefix)
        return response_id, self._group([(c.prompt, c.params) for c in choices], response_id)

    async def _completion(self, body: oai.CompletionRequest, model: str, choices: list[oai.Choice]) -> dict:
        response_id, group = self._choice_group("cmpl", choices)
        results = await collect_group(group, len(choices))
        scoring = oai.scores_prompt_only(body)
        items = []
        for c, r in zip(choices, results):
            if not body.echo:
                items.append(oai.completion_choice(c.index, r.text, r.finish_reason, r.logprobs))
                continue
            prompt = oai.echoed_prompt(c.prompt, r.prompt_text)
            shown = body.logprobs is not None and r.prompt_logprobs is not None
            echoed = (prompt, r.prompt_logprobs) if shown else None
            text, logprobs, finish = r.text, r.logprobs, r.finish_reason
            if scoring:  # max_tokens 0: the prompt alone
                text, logprobs, finish = "", None if body.logprobs is None else [], "length"
            items.append(oai.completion_choice(c.index, prompt + text, finish, logprobs, echoed))
        usage = _usage_of(choices, results, generated=not scoring)
        return oai.completion_object(response_id, model, oai.now_s(), items, usage, False)

    async def _completion_events(
        self, body: oai.CompletionRequest, model: str, choices: list[oai.Choice]
    ) -> AsyncIterator[bytes]:
        response_id, group = self._choice_group("cmpl", choices)
        created = oai.now_s()
        results = [CollectedOutput() for _ in choices]
        try:
            await group.start()
            scoring = oai.scores_prompt_only(body)
            async for index, out in group:
                choice, result = choices[index], results[index]
                first = body.echo and not result.prompt_tokens
                logprobs = result.add(out)
                text, finish, echoed = out.text, out.finish_reason, None
                if scoring:  # the prompt alone, once
                    text, finish = "", "length" if first else None
                    logprobs = None if body.logprobs is None else []
                prompt = oai.echoed_prompt(choice.prompt, result.prompt_text)
                if first:
                    text = prompt + text
                    if body.logprobs is not None and result.prompt_logprobs is not None:
                        echoed = (prompt, result.prompt_logprobs)
                elif body.echo and logprobs:  # offsets count in the echoed text, prompt first
                    logprobs = shift_offsets(logprobs, len(prompt))
                if text or finish or logprobs or echoed:
                    item = oai.completion_choice(choice.index, text, finish, logprobs, echoed)
                    yield sse(oai.completion_object(response_id, model, created, [item], None, True))
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = _usage_of(choices, results, generated=not scoring)
                yield sse(oai.completion_object(response_id, model, created, [], usage, True))
            yield DONE
        finally:
            await group.aclose()

    # -- OpenAI chat completions ------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        try:
            body = msgspec.json.decode(await request.body(), type=oai.ChatCompletionRequest)
            model = self._model(body.model)
            choices = oai.chat_choices(body)
        except Exception as exc:
            return self._refuse(exc)
        if body.stream:
            events = self._chat_events(body, model, choices)
            return _Respond(partial(_respond_stream, events=events))
        return _Respond(partial(_respond_json, result=self._chat(model, choices)))

    async def _chat(self, model: str, choices: list[oai.Choice]) -> dict:
        response_id, group = self._choice_group("chatcmpl", choices)
        results = await collect_group(group, len(choices))
        items = [
            oai.chat_choice(c.index, r.text, r.finish_reason, r.logprobs) for c, r in zip(choices, results)
        ]
        return oai.chat_object(response_id, model, oai.now_s(), items, _usage_of(choices, results), False)

    async def _chat_events(
        self, body: oai.ChatCompletionRequest, model: str, choices: list[oai.Choice]
    ) -> AsyncIterator[bytes]:
        response_id, group = self._choice_group("chatcmpl", choices)
        created = oai.now_s()
        results = [CollectedOutput() for _ in choices]
        started: set[int] = set()
        chunk = partial(oai.chat_object, response_id, model, created)
        try:
            await group.start()
            async for index, out in group:
                logprobs = results[index].add(out)
                if index not in started:
                    started.add(index)
                    role = oai.chat_delta(index, {"role": "assistant", "content": ""}, None)
                    yield sse(chunk([role], None, True))
                if out.text or out.finish_reason or logprobs:
                    delta = {"content": out.text} if out.text else {}
                    yield sse(chunk([oai.chat_delta(index, delta, out.finish_reason, logprobs)], None, True))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse(chunk([], _usage_of(choices, results), True))
            yield DONE
        finally:
            await group.aclose()

    # -- service routes ---------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        name = self.backend.model_names[0]
        card = {
            "id": name,
            "object": "model",
            "created": oai.now_s(),
            "owned_by": "fastgen",
            "max_model_len": self.backend.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        try:
            healthy = await asyncio.wait_for(self.backend.health(), _BACKEND_TIMEOUT_S)
        except Exception:
            healthy = False
        body: dict[str, Any] = {"status": "ok" if healthy else "unhealthy"}
        problems = getattr(self.backend, "health_problems", None)  # a deployment's router names them
        if not healthy and problems is not None:
            body["problems"] = problems()
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def metrics_text(self, request: Request) -> Response:
        try:
            stats = await asyncio.wait_for(self.backend.stats(), _BACKEND_TIMEOUT_S)
        except Exception as exc:
            logger.warning("no engine stats for /metrics: %r", exc)
            stats = None
        return Response(self.metrics.render(stats), media_type=CONTENT_TYPE)
