"""A tensor-parallel deployment (one replica of two worker processes) under attack and under chaos:
who may talk to it (issue 14, finding 5), then a worker killed mid-request (finding 3) and an HTTP
client killed mid-stream, then termination. Nothing may be left running, nor left a zombie.

The tests share one deployment and run in file order: the kills come after the access checks.
Waits end on events (an answer, a state change); their bounds are slack for a busy CI machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq

import fastgen
from fastgen import EngineDeadError, StepError
from fastgen.errors import AccessDeniedError
from fastgen.ipc import Seal, make_socket
from fastgen.serving import registry
from fastgen.serving.client import Client
from fastgen.serving.protocol import Control, Error, Generate, decode, encode
from fastgen.supervisor import RestartPolicy
from tests.processes import descendants, gone, zombies

from .helpers import metric
from .helpers import wait_for as poll_until

NAME = "toy-tp-chaos"
PROMPTS = ["the engine schedules", "a paged cache of blocks"]
START_TIMEOUT_S = 240.0
SLACK_S = 60.0
QUICK = RestartPolicy(first_delay_s=0.1, max_delay_s=1.0)


@pytest.fixture(scope="module")
def deployment(llama_path):
    client = fastgen.serve(
        llama_path,
        deployment_name=NAME,
        tensor_parallel=2,
        enable_restful_api=True,
        restful_api_port=0,
        dtype="float32",
        start_timeout_s=START_TIMEOUT_S,
        restart_policy=QUICK,
    )
    yield client
    client.terminate_server()  # idempotent: the last test already did


def run(coroutine, timeout_s: float = 120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def wait_for(condition, what: str, timeout_s: float = SLACK_S):
    return poll_until(condition, what, timeout_s)


def health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=10)


def worker_pids(replica_pid: int) -> list[int]:
    """The replica's tensor-parallel workers, by rank (``python -m fastgen.worker SPEC RANK``)."""
    ranks = {}
    for pid in descendants(replica_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        if b"fastgen.worker" in args:
            ranks[int(args[args.index(b"fastgen.worker") + 2])] = pid
    return [ranks[rank] for rank in sorted(ranks)]


# -- access control ---------------------------------------------------------------------------------


def test_the_registry_file_and_its_directories_are_this_users_alone(deployment, runtime_dir):
    directory = registry.deployment_dir(NAME)
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    path = directory / "deployment.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert len(bytes.fromhex(stored["secret"])) == 32
    assert deployment.deployment_info().secret is None  # the info command does not hand it out


def test_messages_without_the_key_are_refused_and_the_deployment_serves_on(deployment):
    """A process that found the port (not the registry file) asks for info, a generation and a
    shutdown: each is refused, and nothing else is answered."""

    async def main():
        socket = make_socket(zmq.DEALER)
        socket.connect(deployment.info.address)
        answers = []
        try:
            for message in (
                Control("info-1", "info"),
                Generate("gen-1", "the engine", fastgen.SamplingParams(max_new_tokens=2)),
                Control("stop-1", "shutdown"),
            ):
                await socket.send(encode(message))
                answers.append(decode(await asyncio.wait_for(socket.recv(), SLACK_S)))
            await socket.send(Seal.new().seal(encode(Control("stop-2", "shutdown"))))  # another key
            answers.append(decode(await asyncio.wait_for(socket.recv(), SLACK_S)))
        finally:
            socket.close()
        return answers

    answers = run(main())
    assert [(type(a), a.request_id, a.kind) for a in answers] == [
        (Error, "info-1", "AccessDeniedError"),
        (Error, "gen-1", "AccessDeniedError"),
        (Error, "stop-1", "AccessDeniedError"),
        (Error, "stop-2", "AccessDeniedError"),
    ]
    assert all(NAME not in a.message and str(deployment.info.server_pid) not in a.message for a in answers)
    assert deployment.generate(PROMPTS[0], max_new_tokens=2)[0].generated_length == 2  # still serving
    assert health(deployment.info.http_url).status_code == 200


def test_a_client_without_the_key_is_refused_and_one_with_it_works(deployment):
    for secret in (None, Seal.new().hex()):
        stranger = Client(msgspec.structs.replace(deployment.info, secret=secret))
        try:
            with pytest.raises(AccessDeniedError):
                stranger.generate(PROMPTS[0], max_new_tokens=2)
            with pytest.raises(AccessDeniedError):
                stranger.deployment_info()
            with pytest.raises(AccessDeniedError):
                stranger.terminate_server()
        finally:
            stranger.close()
    assert fastgen.client(NAME).generate(PROMPTS[0], max_new_tokens=2)[0].generated_length == 2


# -- chaos ------------------------------------------------------------------------------------------


def test_a_killed_worker_fails_its_requests_and_the_replica_restarts(deployment):
    url = deployment.info.http_url
    before = [r.generated_text for r in deployment.generate(PROMPTS, max_new_tokens=8, do_sample=False)]
    old_replica = deployment.deployment_info().replicas[0].pid
    old_workers = worker_pids(old_replica)
    assert len(old_workers) == 2

    async def main():
        stream = deployment.astream("the engine", max_new_tokens=400, ignore_eos=True)
        await anext(stream)  # generating
        os.kill(old_workers[1], signal.SIGKILL)
        with pytest.raises((StepError, EngineDeadError)) as failure:
            async for _ in stream:
                pass
        return failure.value

    error = run(main())
    assert "rank 1" in str(error) and "exited with code -9" in str(error)
    # /health says so at once (no engine round-trip), naming the replica and the cause
    down = wait_for(lambda: (r := health(url)).status_code == 503 and r, "/health answering 503")
    (problem,) = down.json()["problems"]
    assert problem.startswith("replica 0 ") and problem.endswith(
        "cannot serve: tensor-parallel worker rank 1 exited with code -9 (SIGKILL)"
    )
    # once the supervisor has started the next process, every process of the old one is gone
    # (reaped, not zombies): the replica stopped its workers, the server reaped the replica
    wait_for(lambda: deployment.deployment_info().replicas[0].pid != old_replica, "a new replica process")
    assert zombies(deployment.info.server_pid) == []
    assert all(gone(pid) for pid in [old_replica, *old_workers])
    # it serves again, as before
    wait_for(lambda: health(url).status_code == 200, "/health answering 200", START_TIMEOUT_S + SLACK_S)
    after = [r.generated_text for r in deployment.generate(PROMPTS, max_new_tokens=8, do_sample=False)]
    assert after == before
    (replica,) = deployment.deployment_info().replicas
    assert (replica.state, replica.restarts, replica.alive) == ("serving", 1, True)
    assert len(worker_pids(replica.pid)) == 2
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "fastgen_replica_restarts_total", 'replica="0"') == 1
    assert metric(text, "fastgen_replica_serving", 'replica="0"') == 1


def test_an_http_client_killed_mid_stream_leaves_nothing_running(deployment):
    url = deployment.info.http_url
    aborted_before = metric(
        httpx.get(f"{url}/metrics").text, "fastgen_requests_total", 'status="abort"', unset=0
    )
    generated_before = run(deployment.stats()).generated_tokens
    code = (
        "import os, httpx\n"
        f"body = {{'prompt': 'the engine', 'max_tokens': 400, 'ignore_eos': True, 'stream': True}}\n"
        f"with httpx.stream('POST', {url + '/v1/completions'!r}, json=body, timeout=120) as response:\n"
        "    for i, _ in enumerate(response.iter_lines()):\n"
        "        if i == 4:\n"
        "            print('streaming', flush=True)\n"
        "            os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "streaming" and result.returncode == -signal.SIGKILL, result.stderr

    def idle():
        stats = run(deployment.stats())
        return stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks and stats

    stats = wait_for(idle, "every KV block free again")
    aborted = (
        metric(httpx.get(f"{url}/metrics").text, "fastgen_requests_total", 'status="abort"') - aborted_before
    )
    assert aborted == 1
    assert stats.generated_tokens - generated_before < 400  # stopped on the replica too
    assert health(url).status_code == 200


def test_terminate_leaves_no_process_and_no_zombie(deployment):
    info = deployment.deployment_info()
    pids = [info.server_pid, info.replicas[0].pid, *worker_pids(info.replicas[0].pid)]
    deployment.terminate_server()
    assert deployment._process.returncode == 0
    assert all(gone(pid) for pid in pids)  # exited and reaped: no zombie either
    assert not Path(registry.runtime_dir(), NAME).exists()
