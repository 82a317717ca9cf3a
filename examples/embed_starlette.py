"""Embed an `AsyncEngine` in your own Starlette (or FastAPI) app, with streaming responses.

    python examples/embed_starlette.py [MODEL_DIR] [--port 8000]
    curl -N localhost:8000/generate -d '{"prompt": "the engine", "max_new_tokens": 32}'
    curl localhost:8000/api/v1/models

Without MODEL_DIR a tiny random model is built on the fly (runs on a CPU). Your route streams
tokens as plain text; fastgen's own gateway (OpenAI-compatible routes, /metrics) is mounted
under /api. A client that hangs up aborts its request and frees its KV cache.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Mount, Route

from fastgen import AsyncEngine, SamplingParams
from fastgen.serving import EngineBackend, create_app


def build_app(engine: AsyncEngine) -> Starlette:
    async def generate(request: Request) -> StreamingResponse:
        body = await request.json()
        params = SamplingParams(max_new_tokens=int(body.get("max_new_tokens", 32)))

        async def text():
            async for out in engine.generate(body["prompt"], params):
                yield out.text

        return StreamingResponse(text(), media_type="text/plain")

    gateway = create_app(EngineBackend(engine))
    return Starlette(routes=[Route("/generate", generate, methods=["POST"]), Mount("/api", app=gateway)])


async def main(model: str | None, port: int) -> None:
    if model is None:
        from fastgen.toy import make_toy_checkpoint

        model = str(make_toy_checkpoint(tempfile.mkdtemp(prefix="fastgen-toy-")))
    async with await AsyncEngine.start(model) as engine:
        config = uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="info")
        await uvicorn.Server(config).serve()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    asyncio.run(main(args.model, args.port))
