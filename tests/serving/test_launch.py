"""Starting and losing deployments (never a hang), the ``fastgen generate`` command, an example."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import fastgen
from fastgen import AsyncEngine, EngineConfig, EngineDeadError
from fastgen.serving import DeploymentStartError, registry
from fastgen.supervisor import pid_alive, wait_gone
from tests.processes import descendants, gone

from .conftest import greedy_texts, start_cli_server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_serve_reports_a_replica_that_dies_while_starting(llama_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_path, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"this is not a safetensors file")
    start_timeout_s = 120
    started = time.monotonic()
    with pytest.raises(DeploymentStartError) as info:
        fastgen.serve(broken, deployment_name="broken", dtype="float32", start_timeout_s=start_timeout_s)
    message = str(info.value)
    assert time.monotonic() - started < start_timeout_s  # the exit was noticed, not the timeout
    assert "exited with code 1" in message and "replica 0" in message
    assert "SafetensorError" in message  # the end of the failing replica's log: the cause
    pids = [int(pid) for pid in re.findall(r"pid (\d+)", message)]
    assert pids and not wait_gone(pids, 10)
    assert registry.read("broken") is None


def test_serve_rejects_bad_arguments_before_starting_anything(llama_path):
    with pytest.raises(ValueError, match="unknown engine option"):
        fastgen.serve(llama_path, deployment_name="bad", no_such_option=1)
    with pytest.raises(ValueError, match="replica_num"):
        fastgen.serve(llama_path, deployment_name="bad", replica_num=0)
    with pytest.raises(ValueError, match="deployment name"):
        fastgen.serve(llama_path, deployment_name="../escape")


def test_losing_the_server_fails_requests_and_stops_replicas(llama_path):
    client = fastgen.serve(llama_path, deployment_name="doomed", dtype="float32", start_timeout_s=240)
    info = client.deployment_info()
    replica_pid = info.replicas[0].pid

    async def main():
        stream = client.astream("the engine", max_new_tokens=500, ignore_eos=True)
        await anext(stream)
        os.kill(info.server_pid, signal.SIGKILL)
        # the socket's disconnect event fails the stream (a stream that waited on would time out)
        with pytest.raises(EngineDeadError, match="lost the connection"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(main(), 60))
    # replicas poll their parent every 0.5 s; the bound is slack, the loop ends when it is gone
    assert not wait_gone([replica_pid], 60), "the replica outlived its server"
    client.terminate_server()  # cleans up what is left: the registry entry
    assert not pid_alive(info.server_pid)
    assert registry.read("doomed") is None


def test_cli_generate_streams_to_the_terminal(llama_path):
    ((text, generated, _),) = greedy_texts(llama_path, ["the engine schedules"], 8)
    command = [sys.executable, "-m", "fastgen.cli", "generate", llama_path, "the engine schedules"]
    result = subprocess.run(
        [*command, "--max-new-tokens", "8", "--dtype", "float32", "--no-async-scheduling", "--no-chat"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    assert f"{generated} generated" in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "fastgen.cli", "generate", "no-such-model", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "not a model directory" in bad.stderr


def test_embed_starlette_example(llama_path):
    spec = importlib.util.spec_from_file_location("embed_starlette", EXAMPLES / "embed_starlette.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    async def main():
        async with await AsyncEngine.start(llama_path, EngineConfig(dtype="float32")) as engine:
            transport = httpx.ASGITransport(app=example.build_app(engine))
            async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
                streamed = await client.post("/generate", json={"prompt": "the engine", "max_new_tokens": 4})
                models = await client.get("/api/v1/models")
        return streamed, models

    streamed, models = asyncio.run(asyncio.wait_for(main(), 60))
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/plain")
    assert models.json()["data"][0]["id"]


def test_cli_engine_switches_turn_features_off():
    from fastgen.cli import _engine_options, build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "model", "--no-async-scheduling", "--token-budget", "64"])
    assert _engine_options(args) == {"async_scheduling": False, "token_budget": 64}
    assert _engine_options(parser.parse_args(["generate", "model", "x", "--no-cuda-graphs"])) == {
        "cuda_graphs": False
    }


def test_cli_serve_exits_with_a_clear_message_when_its_engine_dies(llama_path):
    """One process, one engine, nothing to restart it in: ``fastgen serve`` exits non-zero, saying
    why, for whatever supervises it (systemd, a container runtime) to restart it."""
    process, url = start_cli_server(llama_path, "--dtype", "float32", "--executor", "zmq")
    try:
        assert httpx.get(f"{url}/health").status_code == 200
        (worker,) = [pid for pid in descendants(process.pid) if b"fastgen.worker" in _cmdline(pid)]
        os.kill(worker, signal.SIGKILL)
        code = process.wait(timeout=60)  # slack: the worker's exit is an event, the check is 50 ms
        message = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 1
    assert (
        "the engine cannot serve (tensor-parallel worker rank 0 exited with code -9 (SIGKILL)); exiting"
        in message
    )
    assert gone(worker) and gone(process.pid)  # the engine stopped (and reaped) its worker before exiting


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
