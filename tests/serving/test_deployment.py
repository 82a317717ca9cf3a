"""A persistent deployment with two replicas: ZeroMQ clients (sync, async, another process), the
HTTP gateway over the router, overload, a replica killed mid-request, and termination.

The tests share one deployment and run in file order: the last ones kill a replica and stop it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

import fastgen
from fastgen import (
    DeploymentNotFoundError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    SamplingParams,
)
from fastgen.serving import registry
from fastgen.supervisor import pid_alive
from tests.helpers import generate_together
from tests.processes import wait_exited

from .conftest import greedy_texts
from .helpers import metric, raw_post

NAME = "toy-two-replicas"
PROMPTS = ["the engine schedules", "a paged cache of blocks", "decodes run first", "the budget"]
LONG = 200  # tokens of a request that must still be running when the test acts
MAX_SEQS, MAX_QUEUED = 2, 4  # per replica: 2 running + 4 waiting, then overload
OVERLOAD_TOKENS = 1200  # tokens of each accepted request in the overload bursts (long: CI is busy)
MII_OVERLOAD_TOKENS = 1000  # the MII client's default max_length (1024) counts the prompt too


@pytest.fixture(scope="module")
def model_path(toy_checkpoint):
    """The toy Llama with a long context, so that the overload test's accepted requests run for
    long enough that a refusal which waited for capacity would show (CI has two busy cores)."""
    return toy_checkpoint("llama", max_position_embeddings=OVERLOAD_TOKENS + 64)


@pytest.fixture(scope="module")
def deployment(model_path):
    client = fastgen.serve(
        model_path,
        deployment_name=NAME,
        replica_num=2,
        enable_restful_api=True,
        restful_api_port=0,
        dtype="float32",
        max_seqs=MAX_SEQS,
        max_queued_requests=MAX_QUEUED,
        start_timeout_s=240,
    )
    yield client
    client.terminate_server()  # idempotent: the last test already did


@pytest.fixture(scope="module")
def references(model_path):
    """(text, generated tokens, finish reason) of each prompt, greedy, 8 tokens, in this process."""
    return greedy_texts(model_path, PROMPTS, 8)


@pytest.fixture(scope="module")
def reference(references):
    return [text for text, _, _ in references]


@pytest.fixture(scope="module")
def reference_logprobs(model_path):
    """The first two prompts' greedy outputs with their top-2 log-probabilities, in this process."""
    params = SamplingParams(max_new_tokens=8, logprobs=2)
    return generate_together(model_path, [(prompt, params) for prompt in PROMPTS[:2]])


def run(coroutine, timeout_s: float = 120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def test_generate_spreads_requests_over_both_replicas(deployment, references, model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    before = [r.requests_routed for r in deployment.deployment_info().replicas]
    responses = deployment.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    assert [(r.generated_text, r.generated_length, r.finish_reason) for r in responses] == references
    assert [r.prompt_length for r in responses] == [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    reference = [text for text, _, _ in references]
    after = [r.requests_routed for r in deployment.deployment_info().replicas]
    assert [a - b for a, b in zip(after, before)] == [2, 2]
    # MII's call syntax and return_full_text
    (full,) = deployment(PROMPTS[0], max_new_tokens=8, do_sample=False, return_full_text=True)
    assert full.generated_text == PROMPTS[0] + reference[0]


def test_requests_sharing_a_prefix_go_to_the_replica_that_caches_it(deployment):
    system = "a paged cache of blocks, and the budget of every step. " * 6  # well over 32 tokens
    before = [r.requests_routed for r in deployment.deployment_info().replicas]
    for question in ("what runs first", "how are prompts split", "who is preempted"):
        (response,) = deployment.generate(system + question, max_new_tokens=2)
        assert response.generated_length == 2
    after = [r.requests_routed for r in deployment.deployment_info().replicas]
    assert sorted(a - b for a, b in zip(after, before)) == [0, 3]


def test_async_client_and_streaming(deployment, reference):
    async def main():
        responses = await deployment.agenerate(PROMPTS[:2], max_new_tokens=8, do_sample=False)
        deltas = [r async for r in deployment.astream(PROMPTS[0], max_new_tokens=8, do_sample=False)]
        return responses, deltas

    responses, deltas = run(main())
    assert [r.generated_text for r in responses] == reference[:2]
    assert "".join(d.generated_text for d in deltas) == reference[0]
    assert [d.finish_reason for d in deltas][-1] != "none"
    assert all(d.finish_reason == "none" for d in deltas[:-1])
    assert (
        "".join(d.generated_text for d in deployment.stream(PROMPTS[1], max_new_tokens=8, do_sample=False))
        == (reference[1])
    )


async def wait_idle(deployment, timeout_s: float = 60.0):
    """The deployment's stats once nothing runs and every KV block is free (the bound is slack)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = await deployment.stats()
        if stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"still running: {stats}")


def test_leaving_a_stream_cancels_the_request(deployment):
    async def main():
        before = await deployment.stats()
        async for _ in deployment.astream(PROMPTS[0], max_new_tokens=LONG, ignore_eos=True):
            break
        return before, await wait_idle(deployment)

    before, after = run(main())
    assert after.num_kv_blocks > 0
    assert after.generated_tokens - before.generated_tokens < LONG  # cancelled, not run to its length


def test_client_in_another_process_by_name_and_by_model(deployment, model_path, reference):
    code = (
        "import json, sys, fastgen\n"
        "out = []\n"
        f"for key in ({NAME!r}, {model_path!r}):\n"
        "    client = fastgen.client(key)\n"
        f"    (response,) = client.generate({PROMPTS[0]!r}, max_new_tokens=8, do_sample=False)\n"
        "    out.append(response.generated_text)\n"
        "print(json.dumps({'texts': out, 'torch': 'torch' in sys.modules}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["texts"] == [reference[0]] * 2
    assert not answer["torch"]  # a client process stays light


def test_a_client_process_dying_mid_stream_aborts_its_request(deployment):
    url = deployment.info.http_url
    aborted_before = metric(
        httpx.get(f"{url}/metrics").text, "fastgen_requests_total", 'status="abort"', unset=0.0
    )
    generated_before = run(deployment.stats()).generated_tokens
    code = (
        "import os, fastgen\n"
        f"client = fastgen.client({NAME!r})\n"
        "for i, _ in enumerate(client.stream('the engine', max_new_tokens=400, ignore_eos=True)):\n"
        "    if i == 2:\n"
        "        print('streaming', flush=True)\n"
        "        os._exit(0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.stdout.strip() == "streaming", result.stderr

    generated = run(wait_idle(deployment)).generated_tokens - generated_before
    aborted = (
        metric(httpx.get(f"{url}/metrics").text, "fastgen_requests_total", 'status="abort"') - aborted_before
    )
    assert aborted == 1 and generated < 400  # the replica stopped too, not only the server's stream


@pytest.mark.parametrize(
    "options, field",
    [
        ({"max_tokens": 3}, "max_tokens"),
        ({"top_p": 2.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_length": 2}, "max_length"),
    ],
)
def test_bad_options_are_named(deployment, options, field):
    with pytest.raises(InvalidRequestError) as info:
        deployment.generate("the engine schedules every request", **options)
    assert info.value.field == field


def test_bad_prompts_and_unknown_deployments(deployment):
    with pytest.raises(InvalidRequestError, match="prompt"):
        deployment.generate("the engine " * 400, max_new_tokens=2)
    for bad in ([], [""], "", [3]):
        with pytest.raises(InvalidRequestError) as info:
            deployment.generate(bad)
        assert info.value.field == "prompts"
    with pytest.raises(DeploymentNotFoundError, match="no-such-deployment"):
        fastgen.client("no-such-deployment")
    assert deployment.generate("x", max_new_tokens=1)[0].generated_length == 1  # still serving


def test_http_gateway_over_the_replicas(deployment, reference, reference_logprobs):
    url = deployment.info.http_url
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    response = oai.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=8, temperature=0, logprobs=2)
    choices = sorted(response.choices, key=lambda c: c.index)
    assert [c.text for c in choices] == reference[:2]
    for choice, expected in zip(choices, reference_logprobs):  # log-probabilities cross from the replicas
        logprobs = choice.logprobs
        assert logprobs.tokens == [entry.text for entry in expected.logprobs]
        want = [entry.logprob for entry in expected.logprobs]
        assert logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
        for top, entry in zip(logprobs.top_logprobs, expected.logprobs, strict=True):
            by_text: dict[str, float] = {}  # two alternatives that read the same: the likelier one
            for token, value in entry.top.items():
                by_text[entry.top_text[token]] = max(value, by_text.get(entry.top_text[token], -math.inf))
            assert top == pytest.approx(by_text, abs=1e-4)
    status, _, body = raw_post(
        url,
        f"/mii/{NAME}",
        json.dumps({"prompts": PROMPTS[0], "do_sample": False, "max_new_tokens": 8}).encode(),
    )
    assert status == 200 and json.loads(body)[0]["generated_text"] == reference[0]
    status, _, body = raw_post(url, "/mii/wrong-name", b'{"prompts": ["x"]}')
    assert status == 404 and "wrong-name" in json.loads(body)["error"]["message"]
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "fastgen_kv_blocks_total") > 0 and metric(text, "fastgen_generation_tokens_total") > 0
    assert httpx.get(f"{url}/health").status_code == 200


def test_zmq_overload_is_a_clear_error_and_accepted_requests_finish(deployment):
    capacity = 2 * (MAX_SEQS + MAX_QUEUED)

    async def one(prompt: str):
        try:
            stream = deployment.astream(prompt, max_new_tokens=MII_OVERLOAD_TOKENS, ignore_eos=True)
            deltas = [d async for d in stream]
        except Exception as exc:  # refused, or (wrongly) failed after admission: told apart below
            return exc
        return deltas[-1]

    async def main():
        return await asyncio.gather(*(one(f"the engine {i}") for i in range(capacity + 10)))

    results = run(main())
    refused = [r for r in results if isinstance(r, EngineOverloadedError)]
    admitted = [r for r in results if not isinstance(r, EngineOverloadedError)]
    assert len(refused) >= 4 and "max_queued_requests" in str(refused[0])
    # a refusal means both replicas were full (the router passes a request on when one is): at
    # least the capacity was admitted (more if some finished during the burst), and every
    # admitted request ran to its length
    assert len(admitted) >= capacity, (len(admitted), refused[:2])
    for result in admitted:
        assert not isinstance(result, Exception), result
        assert (result.generated_length, result.finish_reason) == (MII_OVERLOAD_TOKENS, "length")


def test_http_overload_answers_503_at_once_and_accepted_requests_finish(deployment):
    url = deployment.info.http_url
    body = {"prompt": "the engine", "max_tokens": OVERLOAD_TOKENS, "ignore_eos": True, "temperature": 0}
    burst = 30  # capacity: 2 replicas x (2 running + 4 waiting) = 12

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            answered: list[int] = []  # status codes in the order the responses arrived

            async def one():
                response = await client.post("/v1/completions", json=body)
                answered.append(response.status_code)
                return response

            return await asyncio.gather(*(one() for _ in range(burst))), answered

    results, answered = run(main())
    refused = [r for r in results if r.status_code == 503]
    accepted = [r for r in results if r.status_code == 200]
    assert len(refused) + len(accepted) == burst, [r.status_code for r in results]
    assert len(refused) >= burst - 2 * (MAX_SEQS + MAX_QUEUED) - 6  # a few may finish during the burst
    assert all(r.json()["error"]["code"] == "overloaded" for r in refused)
    # refusals do not wait for capacity: every one arrives before any accepted request completes
    # (each of those generates OVERLOAD_TOKENS tokens first)
    assert answered == sorted(answered, reverse=True), answered
    assert all(r.json()["usage"]["completion_tokens"] == OVERLOAD_TOKENS for r in accepted)


def test_killed_replica_fails_its_requests_is_out_of_rotation_at_once_and_comes_back(deployment, reference):
    url = deployment.info.http_url

    async def main():
        streams = [
            deployment.astream(f"the engine {i}", max_new_tokens=400, ignore_eos=True) for i in range(4)
        ]
        firsts = await asyncio.gather(*(anext(s) for s in streams))  # all four are running
        assert all(f.generated_length >= 1 for f in firsts)
        info = await deployment.ainfo()
        victim = info.replicas[1]
        assert [r.in_flight for r in info.replicas] == [2, 2]
        both = await deployment.stats()
        os.kill(victim.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_exited, victim.pid, 60)  # the moment it is gone...
        # .../health says why not both serve, stats count replica 0 alone, requests go to it alone
        async with httpx.AsyncClient(base_url=url) as http:
            down = await http.get("/health")
            one = await deployment.stats()
            kv_metric = metric((await http.get("/metrics")).text, "fastgen_kv_blocks_total")
        after_death = await deployment.agenerate(PROMPTS, max_new_tokens=8, do_sample=False)

        async def drain(stream):
            try:
                return [d async for d in stream][-1]
            except EngineDeadError as exc:
                return exc

        results = await asyncio.gather(*(drain(s) for s in streams))
        return victim, results, both, after_death, down, one, kv_metric

    victim, results, both, after_death, down, one, kv_metric = run(main(), timeout_s=120)
    failed = [r for r in results if isinstance(r, EngineDeadError)]
    assert len(failed) == 2 and all("replica 1 exited with code -9 (SIGKILL)" in str(e) for e in failed)
    assert all(r.finish_reason == "length" for r in results if not isinstance(r, Exception))
    assert [r.generated_text for r in after_death] == reference  # none was sent to the dead replica
    assert down.status_code == 503
    assert down.json()["problems"][0].startswith("replica 1 ")  # down, restarting, or starting again
    assert down.json()["problems"][0].endswith(": exited with code -9 (SIGKILL)")
    # stats (and /metrics) count the live replica alone: half the KV blocks of the two
    assert 2 * one.num_kv_blocks == both.num_kv_blocks > 0 and kv_metric == one.num_kv_blocks
    # the supervisor restarts it: both serve again
    deadline = time.monotonic() + 240  # slack; the restart's own start timeout is longer
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "replica 1 did not come back"
        time.sleep(0.05)
    replicas = deployment.deployment_info().replicas
    assert [(r.alive, r.state, r.restarts) for r in replicas] == [(True, "serving", 0), (True, "serving", 1)]
    assert replicas[1].exit_code == -signal.SIGKILL and replicas[1].pid != victim.pid
    assert not pid_alive(victim.pid)
    responses = deployment.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    assert [r.generated_text for r in responses] == reference
    assert metric(httpx.get(f"{url}/metrics").text, "fastgen_replica_restarts_total", 'replica="1"') == 1


def test_terminate_server_leaves_no_processes(deployment):
    info = deployment.deployment_info()
    pids = [info.server_pid, *(r.pid for r in info.replicas)]
    timeout_s = 60.0  # after which terminate_server kills what is left
    started = time.monotonic()
    deployment.terminate_server(timeout_s=timeout_s)
    assert time.monotonic() - started < timeout_s  # nothing had to be killed...
    assert deployment._process.returncode == 0  # ...the server ran its shutdown and exited by itself
    assert not any(pid_alive(pid) for pid in pids)
    assert registry.read(NAME) is None
    with pytest.raises(DeploymentNotFoundError):
        fastgen.client(NAME)
