"""Soak: thousands of mixed requests through the HTTP gateway, counting every request's end.

    python benchmarks/soak.py                                  # 10,000 requests, a tiny model, CPU
    python benchmarks/soak.py --requests 2000 --replicas 2 --kill-replica-every-s 30
    python benchmarks/soak.py --url http://127.0.0.1:8000      # a server that runs already

Starts ``fastgen serve`` on 127.0.0.1 (a tiny random Llama built on the fly unless ``--model``,
float32 on the CPU, ``--replicas`` engines behind the router when more than one) with a KV cache
that ``--concurrency`` clients oversubscribe ``--kv-oversubscription`` times: the tokens of as
many requests as there are clients (prompt plus ``max_tokens``), over the cache's tokens. The
clients run closed loop over a seeded mix: ``/v1/completions`` and ``/v1/chat/completions``,
streamed or not, greedy or seeded sampling, some ignoring EOS; ``--disconnect-rate`` of them leave
early (a stream after a few events, a plain request after a random delay) and ``--bad-rate`` are
malformed (values out of range, a wrong content type, a chat message without content, a prompt
over the context, bad JSON). ``--kill-replica-every-s`` SIGKILLs a serving replica now and then
(the deployment restarts it).

Every request must end with a final answer (a complete response, a stream ending in ``[DONE]``
with a finish reason), a final error (an error response or event: e.g. the requests a killed
replica held), a refusal (the malformed ones: 4xx) or the client's own disconnect. A *lost*
request is one that got none of these: no answer within ``--request-timeout-s``, a connection
dropped by the server, a stream cut before ``[DONE]``, a response that is not one. Lost requests,
malformed requests not refused and a server that does not come back to idle (nothing running or
waiting, every KV block free) make the exit status 1. Reports outcomes, replica kills and
restarts (``fastgen_replica_restarts`` in ``/metrics``), latency percentiles (end to end, and time
to first token of streams) and the server's counters; writes JSON and markdown to ``--out`` with
the command, machine and date.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from metrics import percentiles
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORDS = ["the", "engine", "schedules", "a", "paged", "cache", "of", "blocks", "while", "every"]
WORDS += ["request", "streams", "tokens", "to", "client", "that", "may", "leave", "at", "any", "moment"]
WORDS += ["nothing", "is", "lost", "each", "step", "fills", "budget", "with", "decodes", "chunks"]
SYSTEM_PROMPTS = ["You are a terse assistant.", "Answer in one line.", "You explain schedulers."]
FINISH_REASONS = {"stop", "length"}


# -- the workload ---------------------------------------------------------------------------------


@dataclass
class SoakRequest:
    index: int
    path: str
    body: bytes
    stream: bool
    tokens: int  # prompt tokens (as this tokenizer counts them) + max_tokens; 0 for a malformed one
    malformed: str | None = None  # what is wrong with it: the server must refuse it (4xx)
    content_type: str = "application/json"
    disconnect_after_events: int | None = None  # a stream the client leaves after this many events
    disconnect_after_s: float | None = None  # a plain request the client leaves after this long


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _malformed(rng: random.Random, stream: bool, max_model_len: int) -> tuple[str, str, Any, str]:
    """(what, path, body, content type) of a request the server must refuse."""
    prompt = _text(rng, 8)
    chat = [{"role": "user", "content": prompt}]
    cases = [
        ("top_k beyond int32", "/v1/completions", {"prompt": prompt, "top_k": 2**31, "temperature": 0.9}),
        ("negative max_tokens", "/v1/completions", {"prompt": prompt, "max_tokens": -1}),
        ("seed beyond 63 bits", "/v1/chat/completions", {"messages": chat, "seed": 2**64 - 1}),
        ("message without content", "/v1/chat/completions", {"messages": [{"role": "user"}]}),
        ("prompt over the context", "/v1/completions", {"prompt": [5] * (max_model_len + 1)}),
        ("best_of other than n", "/v1/completions", {"prompt": prompt, "best_of": 3}),
        ("text/plain body", "/v1/completions", {"prompt": prompt}),
        ("not JSON", "/v1/chat/completions", None),
    ]
    what, path, body = rng.choice(cases)
    content_type = "text/plain" if what == "text/plain body" else "application/json"
    if body is not None:
        body = {**body, "stream": stream, "max_tokens": body.get("max_tokens", 8)}
    return what, path, body, content_type


def make_workload(
    count: int, rng: random.Random, tokenizer: Any, max_model_len: int, args: argparse.Namespace
) -> list[SoakRequest]:
    """``count`` requests of the seeded mix (see the module docstring)."""
    requests = []
    for index in range(count):
        stream = rng.random() < 0.5
        if rng.random() < args.bad_rate:
            what, path, body, content_type = _malformed(rng, stream, max_model_len)
            data = b'{"messages": [' if body is None else json.dumps(body).encode()
            requests.append(SoakRequest(index, path, data, stream, 0, what, content_type))
            continue
        max_tokens = rng.randint(1, args.max_tokens)
        body: dict[str, Any] = {"max_tokens": max_tokens, "stream": stream}
        if rng.random() < 0.5:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
        else:
            body.update(temperature=0.0)
        if rng.random() < 0.5:
            body["ignore_eos"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
        words = rng.randint(2, args.prompt_words)
        if rng.random() < 0.5:
            path = "/v1/completions"
            body["prompt"] = _text(rng, words)
            prompt_tokens = len(tokenizer(body["prompt"])["input_ids"])
        else:
            path = "/v1/chat/completions"
            body["messages"] = [
                {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                {"role": "user", "content": _text(rng, words)},
            ]
            text = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
            prompt_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        body["max_tokens"] = max_tokens = max(1, min(max_tokens, max_model_len - prompt_tokens - 8))
        request = SoakRequest(index, path, json.dumps(body).encode(), stream, prompt_tokens + max_tokens)
        if rng.random() < args.disconnect_rate:
            if stream:
                request.disconnect_after_events = rng.randint(0, 4)
            else:
                request.disconnect_after_s = rng.uniform(0.0, 1.0)
        requests.append(request)
    return requests


# -- one request ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    kind: str  # completed, failed, refused, not refused, disconnected, lost
    path: str
    stream: bool
    status: int | None = None
    detail: str = ""  # the error code, what was malformed, or why the request counts as lost
    sent_s: float = 0.0  # when it was sent, from the run's start
    latency_s: float | None = None
    ttft_s: float | None = None
    completion_tokens: int = 0


def _error_code(payload: Any) -> str | None:
    """The code (or type) of an OpenAI-style error body, None when ``payload`` is not one."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        return str(error.get("code") or error.get("type") or "error")
    return None


async def _finish_plain(request: SoakRequest, outcome: Outcome, response: httpx.Response) -> Outcome:
    outcome.status = response.status_code
    try:
        payload = json.loads(response.content)
    except ValueError:
        payload = None
    code = _error_code(payload)
    if request.malformed is not None:
        outcome.kind = "refused" if 400 <= response.status_code < 500 and code else "not refused"
        outcome.detail = request.malformed
    elif response.status_code != 200:
        outcome.kind, outcome.detail = ("failed", code) if code else ("lost", f"HTTP {response.status_code}")
    elif not payload or not payload.get("choices"):
        outcome.kind, outcome.detail = "lost", "a 200 without choices"
    elif all(choice.get("finish_reason") in FINISH_REASONS for choice in payload["choices"]):
        outcome.kind = "completed"
        outcome.completion_tokens = payload.get("usage", {}).get("completion_tokens", 0)
    else:
        outcome.kind, outcome.detail = "lost", "a response without a finish reason"
    return outcome


async def _send_stream(client: httpx.AsyncClient, request: SoakRequest, outcome: Outcome, started: float):
    headers = {"content-type": request.content_type}
    async with client.stream("POST", request.path, content=request.body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return await _finish_plain(request, outcome, response)
        outcome.status = 200
        if request.malformed is not None:
            outcome.kind, outcome.detail = "not refused", request.malformed
            return outcome
        events, finished, error, done = 0, False, None, False
        if request.disconnect_after_events == 0:
            outcome.kind = "disconnected"
            return outcome
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if (code := _error_code(event)) is not None:
                error = code
                continue
            if outcome.ttft_s is None and event.get("choices"):
                outcome.ttft_s = time.perf_counter() - started
            events += 1
            finished |= any(c.get("finish_reason") in FINISH_REASONS for c in event.get("choices", []))
            if event.get("usage"):
                outcome.completion_tokens = event["usage"].get("completion_tokens", 0)
            if request.disconnect_after_events is not None and events >= request.disconnect_after_events:
                outcome.kind = "disconnected"  # leaving the block closes the connection mid-stream
                return outcome
        if done and error is not None:
            outcome.kind, outcome.detail = "failed", error
        elif done and finished:
            outcome.kind = "completed"
        else:
            outcome.kind = "lost"
            outcome.detail = "no finish reason before [DONE]" if done else "the stream ended without [DONE]"
        return outcome


async def send(
    client: httpx.AsyncClient, request: SoakRequest, timeout_s: float, run_start: float
) -> Outcome:
    """Send ``request`` and say how it ended."""
    started = time.perf_counter()
    outcome = Outcome(request.index, "lost", request.path, request.stream, sent_s=started - run_start)
    headers = {"content-type": request.content_type}
    try:
        if request.stream:
            outcome = await asyncio.wait_for(_send_stream(client, request, outcome, started), timeout_s)
        else:
            post = client.post(request.path, content=request.body, headers=headers)
            leave_s = request.disconnect_after_s
            try:
                response = await asyncio.wait_for(
                    post, timeout_s if leave_s is None else min(leave_s, timeout_s)
                )
            except TimeoutError:
                if leave_s is None or leave_s >= timeout_s:
                    raise
                outcome.kind = "disconnected"  # the cancelled request closed its connection
                return outcome
            outcome = await _finish_plain(request, outcome, response)
    except TimeoutError:
        outcome.kind, outcome.detail = "lost", f"no final answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        outcome.kind, outcome.detail = "lost", f"{type(exc).__name__}: {exc}"
    except ValueError as exc:  # an event that is not JSON
        outcome.kind, outcome.detail = "lost", f"a malformed event: {exc}"
    if outcome.kind in ("completed", "failed"):
        outcome.latency_s = time.perf_counter() - started
    return outcome


# -- the server -------------------------------------------------------------------------------------


class Server:
    """``fastgen serve`` in a child process, its output in a log file."""

    def __init__(self, args: argparse.Namespace, model: str, num_kv_blocks: int, folder: Path):
        self.name = f"soak-{os.getpid()}"
        self.log_path = folder / "server.log"
        command = [sys.executable, "-m", "fastgen.cli", "serve", model, "--port", "0"]
        command += ["--served-model-name", self.name, "--replicas", str(args.replicas), "--dtype", "float32"]
        command += ["--num-kv-blocks", str(num_kv_blocks), "--block-size", str(args.block_size)]
        command += ["--token-budget", str(args.token_budget), "--max-seqs", str(args.max_seqs)]
        command += ["--log-level", "warning", *args.server_arg]
        self.command = command
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True
        )
        self.url = ""

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(r"serving.* on (http://\S+)", self.log_path.read_text())
            if match:
                self.url = match.group(1)
                return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fastgen serve did not start:\n{self.log_path.read_text()[-4000:]}")

    def replica_pids(self) -> list[int]:
        """The pids of the replicas that serve now (a deployment's; none for one engine in-process)."""
        import fastgen

        return [r.pid for r in fastgen.client(self.name).deployment_info().replicas if r.state == "serving"]

    def stop(self) -> int | None:
        """Stop it as a terminal's Ctrl-C would; its exit code (None if it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        self.log.close()
        return self.process.returncode


def metric_sums(text: str) -> dict[str, float]:
    """Prometheus text -> each metric name's value, summed over its labels."""
    sums: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            sums[name.split("{", 1)[0]] += float(value)
    return dict(sums)


async def wait_idle(client: httpx.AsyncClient, timeout_s: float) -> tuple[bool, dict[str, float], float]:
    """Poll ``/health`` and ``/metrics`` until the server is healthy with nothing running or waiting
    and every KV block free; returns whether it got there, the last counters and the wait."""
    started = time.monotonic()
    counters: dict[str, float] = {}
    while True:
        try:
            healthy = (await client.get("/health")).status_code == 200
            counters = metric_sums((await client.get("/metrics")).text)
        except httpx.HTTPError:
            healthy = False
        busy = sum(counters.get(name, 1) for name in _BUSY)
        if healthy and busy == 0:
            return True, counters, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return False, counters, time.monotonic() - started
        await asyncio.sleep(0.25)


_BUSY = ("fastgen_num_requests_running", "fastgen_num_requests_waiting", "fastgen_kv_blocks_used")


# -- the run ----------------------------------------------------------------------------------------


async def run_clients(
    url: str, requests: list[SoakRequest], args: argparse.Namespace, server: Server | None
) -> tuple[list[Outcome], float, list[dict]]:
    """``--concurrency`` closed-loop clients over ``requests``; returns the outcomes, the wall time
    and the replica kills."""
    limits = httpx.Limits(
        max_connections=args.concurrency + 8,
        max_keepalive_connections=args.concurrency,
        keepalive_expiry=2.0,  # below the server's 5 s idle timeout: no reuse of a closing connection
    )
    timeout = httpx.Timeout(args.request_timeout_s, connect=30.0)
    outcomes: list[Outcome] = []
    kills: list[dict] = []
    queue = collections.deque(requests)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        progress = tqdm(total=len(requests), desc="soak", unit="req", smoothing=0.05)

        async def worker() -> None:
            while queue:
                outcomes.append(await send(client, queue.popleft(), args.request_timeout_s, started))
                progress.update()

        async def killer() -> None:
            victim = 0
            while True:
                await asyncio.sleep(args.kill_replica_every_s)
                pids = await asyncio.to_thread(server.replica_pids)
                if len(pids) < 2:
                    continue  # leave one serving
                pid = pids[victim % len(pids)]
                victim += 1
                os.kill(pid, signal.SIGKILL)
                kills.append({"at_s": round(time.perf_counter() - started, 1), "pid": pid})
                progress.write(f"killed replica pid {pid}")

        started = time.perf_counter()
        killing = None
        if args.kill_replica_every_s and server is not None:
            killing = asyncio.ensure_future(killer())
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall_s = time.perf_counter() - started
        if killing is not None:
            killing.cancel()
        progress.close()
    return outcomes, wall_s, kills


def latency(values: list[float]) -> dict[str, float] | None:
    """Count, percentiles (as the serving benchmark takes them), maximum and mean, in ms."""
    if not values:
        return None
    stats = percentiles(values, (50, 90, 99))
    return {
        "count": len(values),
        **{f"{k}_ms": 1e3 * v for k, v in stats.items()},
        "max_ms": 1e3 * max(values),
    }


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    kinds = collections.Counter(o.kind for o in outcomes)
    details: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        if o.kind in ("failed", "refused", "not refused", "lost"):
            details[o.kind][f"{o.status} {o.detail}".strip()] += 1
    completed = [o for o in outcomes if o.kind == "completed"]
    by_kind = {
        "plain": latency([o.latency_s for o in completed if not o.stream]),
        "streamed": latency([o.latency_s for o in completed if o.stream]),
    }
    return {
        "outcomes": dict(kinds),
        "details": {kind: dict(counter.most_common()) for kind, counter in details.items()},
        "latency_end_to_end": latency([o.latency_s for o in completed]),
        "latency_by_kind": by_kind,
        "time_to_first_token": latency([o.ttft_s for o in completed if o.ttft_s is not None]),
        "completion_tokens": sum(o.completion_tokens for o in completed),
    }


def markdown(report: dict[str, Any]) -> str:
    summary, config = report["summary"], report["config"]
    outcomes = summary["outcomes"]
    server_line = f"`{report['server_command']}`" if report["server_command"] else report["url"]
    lines = [
        "# Soak: mixed requests through the HTTP gateway",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}; date {report['date']}",
        f"- server: {server_line}",
        f"- {config['requests']} requests, {config['concurrency']} closed-loop clients; KV cache "
        f"{config['kv_tokens']} tokens per replica x {config['replicas']}, the clients' requests hold "
        f"{config['client_tokens']} tokens: {config['oversubscription']:.1f}x oversubscribed",
        "",
        f"**Lost requests: {outcomes.get('lost', 0)}** (a request that got no final answer, error or "
        f"refusal); malformed requests not refused: {outcomes.get('not refused', 0)}; server back to "
        f"idle (healthy, nothing running or waiting, every KV block free): {report['idle']['reached']} "
        f"after {report['idle']['wait_s']:.1f} s.",
        "",
        "| outcome | requests |",
        "|---|---|",
    ]
    for kind in ("completed", "failed", "refused", "disconnected", "not refused", "lost"):
        lines.append(f"| {kind} | {outcomes.get(kind, 0)} |")
    for kind, counter in summary["details"].items():
        lines += ["", f"{kind}, by status and reason:", ""]
        lines += [f"- {reason}: {count}" for reason, count in counter.items()]
    lines += [
        "",
        f"Wall time {report['wall_s']:.1f} s: {report['requests_per_s']:.1f} requests/s, "
        f"{report['output_tokens_per_s']:.0f} output tokens/s (completed requests).",
        "",
        "| latency (completed) | count | p50 ms | p90 ms | p99 ms | max ms | mean ms |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("end to end, all", summary["latency_end_to_end"])]
    rows += [(f"end to end, {kind}", stats) for kind, stats in summary["latency_by_kind"].items()]
    rows += [("time to first token (streams)", summary["time_to_first_token"])]
    for label, stats in rows:
        if stats:
            values = " | ".join(
                f"{stats[k]:.0f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")
            )
            lines.append(f"| {label} | {stats['count']} | {values} |")
    server = report["server_counters"]
    lines += [
        "",
        f"Replicas killed: {len(report['kills'])}; restarts (`fastgen_replica_restarts`): "
        f"{server.get('fastgen_replica_restarts_total', 0):.0f}.",
    ]
    if report["kills"]:
        lines += ["", "| kill at s | pid | failed requests in flight at the kill |", "|---|---|---|"]
        lines += [f"| {k['at_s']} | {k['pid']} | {k['failed_in_flight']} |" for k in report["kills"]]
    others = report["failed_not_in_flight_at_a_kill"]
    if others:
        delays = ", ".join("no kill" if delay is None else f"{delay:g}" for delay in others)
        lines += [
            "",
            f"Failed requests in flight at no kill: {len(others)}, sent this many seconds after the last "
            f"kill before them: {delays}.",
        ]
    lines += [
        "",
        f"Server counters at the end: {server.get('fastgen_steps_total', 0):.0f} steps, "
        f"{server.get('fastgen_preemptions_total', 0):.0f} preemptions, "
        f"{server.get('fastgen_failed_steps_total', 0):.0f} failed steps, "
        f"{server.get('fastgen_generation_tokens_total', 0):.0f} generated tokens "
        f"(counters of a restarted replica start again from zero).",
        f"Server exit code after Ctrl-C: {report['server_exit_code']}; tracebacks in its log: "
        f"{report['server_log_tracebacks']}.",
        "",
    ]
    return "\n".join(lines)


def build_model(folder: Path) -> str:
    from fastgen.toy import make_toy_checkpoint

    return str(make_toy_checkpoint(folder / "toy-llama", "llama"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--model", default=None, help="a model directory (default: a tiny random Llama)")
    parser.add_argument("--url", default=None, help="soak this server instead of starting one")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--kill-replica-every-s", type=float, default=0.0, help="0: kill none")
    parser.add_argument("--kv-oversubscription", type=float, default=10.0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens is drawn from 1..this")
    parser.add_argument("--prompt-words", type=int, default=120, help="prompts have 2..this words")
    parser.add_argument("--disconnect-rate", type=float, default=0.08)
    parser.add_argument("--bad-rate", type=float, default=0.01)
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--server-arg", action="append", default=[], help="one more `fastgen serve` argument")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="fastgen-soak-") as tmp:
        folder = Path(tmp)
        model = args.model or build_model(folder)
        tokenizer = AutoTokenizer.from_pretrained(model)
        max_model_len = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
        requests = make_workload(args.requests, random.Random(args.seed), tokenizer, max_model_len, args)
        good = [r.tokens for r in requests if r.malformed is None]
        client_tokens = round(args.concurrency * statistics.fmean(good)) if good else 0
        # the cache holds the longest request, and the clients' requests oversubscribe it
        kv_tokens = max(max_model_len, client_tokens / (args.kv_oversubscription * args.replicas))
        num_kv_blocks = math.ceil(kv_tokens / args.block_size)
        kv_tokens = num_kv_blocks * args.block_size
        server = None
        if args.url is None:
            server = Server(args, model, num_kv_blocks, folder)
            url = server.wait_ready(300.0)
        else:
            url = args.url
        try:
            outcomes, wall_s, kills = asyncio.run(run_clients(url, requests, args, server))

            async def settle():
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    return await wait_idle(client, 180.0 if kills else 60.0)

            reached, counters, wait_s = asyncio.run(settle())
        finally:
            exit_code = server.stop() if server is not None else None
            log = server.log_path.read_text() if server is not None else ""
            if exit_code not in (0, None):
                print(log[-4000:], file=sys.stderr)

    summary = summarize(outcomes)
    failed = [o for o in outcomes if o.kind == "failed"]
    for kill in kills:
        kill["failed_in_flight"] = sum(o.sent_s < kill["at_s"] <= o.sent_s + o.latency_s for o in failed)
    # the other failures, each with how long after the last kill before it it was sent (None: no kill)
    after_kill = []
    for o in failed:
        if not any(o.sent_s < k["at_s"] <= o.sent_s + o.latency_s for k in kills):
            before = [o.sent_s - k["at_s"] for k in kills if k["at_s"] <= o.sent_s]
            after_kill.append(round(min(before), 2) if before else None)
    completed = summary["outcomes"].get("completed", 0)
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "url": url,
        "server_command": " ".join(["fastgen", *server.command[3:]]).replace(model, "MODEL")
        if server
        else None,
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("out",)},
            "kv_tokens": kv_tokens if server else None,
            "client_tokens": client_tokens,
            "oversubscription": client_tokens / (kv_tokens * args.replicas) if server else float("nan"),
        },
        "wall_s": wall_s,
        "requests_per_s": len(outcomes) / wall_s,
        "output_tokens_per_s": summary["completion_tokens"] / wall_s,
        "summary": summary,
        "kills": kills,
        "failed_not_in_flight_at_a_kill": after_kill,
        "idle": {"reached": reached, "wait_s": wait_s},
        "server_counters": counters,
        "server_exit_code": exit_code,
        "server_log_tracebacks": log.count("Traceback (most recent call last)"),
        "not_completed": [
            asdict(o) for o in sorted(outcomes, key=lambda o: o.index) if o.kind != "completed"
        ],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M")
    stem = f"soak-{platform.machine()}-cpu{os.cpu_count()}-{args.requests}-{stamp}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {out / stem}.md and .json")
    lost = summary["outcomes"].get("lost", 0) + summary["outcomes"].get("not refused", 0)
    ok = lost == 0 and reached and len(outcomes) == len(requests) and completed > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
