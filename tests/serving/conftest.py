"""Fixtures of the serving tests: a private registry directory, reference outputs, a CLI server."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import pytest

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.inputs import Prompt, prompt_token_ids
from tests.helpers import collect


@pytest.fixture(scope="session", autouse=True)
def runtime_dir(tmp_path_factory):
    """Every deployment of the test session registers in a temporary directory."""
    path = tmp_path_factory.mktemp("fastgen-runtime")
    previous = os.environ.get("FASTGEN_RUNTIME_DIR")
    os.environ["FASTGEN_RUNTIME_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FASTGEN_RUNTIME_DIR", None)
    else:
        os.environ["FASTGEN_RUNTIME_DIR"] = previous


def greedy_texts(
    path: str, prompts: list[Prompt], max_new_tokens: int, **options
) -> list[tuple[str, int, str]]:
    """(text, generated tokens, finish reason) of each prompt, run one at a time on an engine in
    this process: the reference the servers must reproduce (``options``: more `SamplingParams`)."""

    async def main():
        async with await AsyncEngine.start(path, EngineConfig(dtype="float32")) as engine:
            results = []
            for prompt in prompts:
                ids = prompt if isinstance(prompt, str) else prompt_token_ids(engine.tokenizer, prompt)
                params = SamplingParams(max_new_tokens=max_new_tokens, **options)
                token_ids, text, reason = await collect(engine, ids, params)
                results.append((text, len(token_ids), reason))
            return results

    return asyncio.run(asyncio.wait_for(main(), 60))


def start_cli_server(*args: str, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Run ``fastgen serve ARGS --port 0`` and return (process, base URL) once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fastgen.cli", "serve", *args, "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"serving .* on (http://\S+)", line)
        if match:
            return process, match.group(1)
    process.kill()
    raise RuntimeError(f"fastgen serve did not start (exit code {process.poll()}):\n{''.join(lines)}")


def stop_cli_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert process.returncode == 0
